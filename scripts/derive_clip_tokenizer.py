"""Derive the bundled CLIP tokenizer files from OpenAI's BPE merge list.

The CLIP ViT-L/14 tokenizer used by Stable Diffusion 1.5 is fully defined by
`bpe_simple_vocab_16e6.txt.gz` (MIT licence, shipped in the `open_clip_torch` and `clip-anytorch`
wheels). This script rebuilds `vocab.json` and `merges.txt` from it exactly the way OpenAI's
`SimpleTokenizer` builds its vocabulary, so the package needs no tokenizer download.

Usage:
    pip download --no-deps open_clip_torch==3.3.0 -d /tmp/oc
    unzip -o /tmp/oc/open_clip_torch-*.whl 'open_clip/bpe_simple_vocab_16e6.txt.gz' -d /tmp/oc
    python scripts/derive_clip_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

EXPECTED_MD5 = "933b7abbbbde62c36f02f0e6ccde464f"  # the file OpenAI published with CLIP
NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary is 49408 = 256 bytes x2 + merges + 2 specials
OUT_DIR = Path(__file__).resolve().parents[1] / "fastcomposer" / "configs" / "tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (as CLIP uses it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def derive(bpe_gz: Path, out_dir: Path) -> None:
    digest = hashlib.md5(bpe_gz.read_bytes()).hexdigest()
    if digest != EXPECTED_MD5:
        raise SystemExit(f"{bpe_gz} has md5 {digest}, expected {EXPECTED_MD5}: not OpenAI's CLIP BPE file")
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header

    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    logger.info("wrote %d tokens and %d merges to %s", len(vocab), len(merges), out_dir)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bpe_gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    args = parser.parse_args()
    derive(args.bpe_gz, args.out)
