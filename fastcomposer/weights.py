"""Where the weights come from: an explicit path, our converted cache, or the Hub, in that order.

The released checkpoint is one 4.5 GB pickle. The first load reads it (memory-mapped, safely) and
saves a diffusers-format copy with safetensors in the cache; every later start memory-maps that copy,
which is several times faster and never touches pickle again.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from . import config

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".safetensors")


class WeightsUnavailableError(RuntimeError):
    """The weights could not be found or downloaded; the message says why and how to supply them."""


@dataclass(frozen=True)
class ResolvedWeights:
    """Which weights to load."""

    kind: str  # "tiny" (random, built from configs), "checkpoint" (released layout file) or "converted" (folder)
    path: Path | None  # the file or folder; None for tiny
    origin: str  # where it came from, for logs and PNG metadata ("tiny", "local file", "cache", "hub")
    revision: str | None = None  # the Hub revision for hub/cache weights


def cache_dir() -> Path:
    """Our cache folder: $FASTCOMPOSER_CACHE, else ~/.cache/fastcomposer."""
    return Path(os.environ.get("FASTCOMPOSER_CACHE") or Path.home() / ".cache" / "fastcomposer")


def checkpoint_revision() -> str:
    """The Hub revision to use: $FASTCOMPOSER_REVISION (pin a commit hash there), else config's."""
    return os.environ.get("FASTCOMPOSER_REVISION") or config.CHECKPOINT_REVISION


def checkpoint_sha256() -> str | None:
    """The sha256 the checkpoint must have, when a maintainer pinned one in $FASTCOMPOSER_SHA256."""
    return os.environ.get("FASTCOMPOSER_SHA256") or None


def converted_dir(revision: str, dtype: str = "fp32", root: Path | None = None) -> Path:
    """Where the converted copy of the Hub checkpoint at `revision`, stored in `dtype`, lives.

    One copy per dtype: a copy already in the dtype the model runs in is memory-mapped as it is, with no
    conversion and so no second copy of any weight in memory.
    """
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in revision)
    return (root or cache_dir()) / "converted" / f"{config.CHECKPOINT_REPO.replace('/', '--')}--{safe}-{dtype}"


def is_converted_folder(path: Path) -> bool:
    """A diffusers pipeline folder saved by us (or any folder with a model_index.json)."""
    return (path / "model_index.json").is_file()


def download_checkpoint(revision: str) -> Path:
    """Download (or reuse from the Hugging Face cache) the released checkpoint; resumable, with progress.

    Raises:
        `WeightsUnavailableError` with the reason and the manual alternative.
    """
    try:
        from huggingface_hub import hf_hub_download

        logger.info("downloading %s/%s at %s (4.5 GB, once)", config.CHECKPOINT_REPO, config.CHECKPOINT_FILE, revision)
        return Path(hf_hub_download(config.CHECKPOINT_REPO, config.CHECKPOINT_FILE, revision=revision))
    except Exception as e:  # network, auth, disk: all end the same way for the user
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else 'no details'}"
        raise WeightsUnavailableError(
            f"the FastComposer weights could not be downloaded from the Hugging Face Hub ({reason}). "
            f"Download {config.CHECKPOINT_FILE} from https://huggingface.co/{config.CHECKPOINT_REPO} by hand and "
            "pass its path with --weights PATH (or FASTCOMPOSER_WEIGHTS=PATH), or use --weights tiny for a "
            "preview with random weights."
        ) from e


def resolve_weights(
    weights: str | os.PathLike | None = None, allow_download: bool = True, dtype: str = "fp32"
) -> ResolvedWeights:
    """Decide which weights to load.

    Args:
        weights: "tiny", a checkpoint file (released layout, `.bin` or `.safetensors`), a converted folder,
            or None for: $FASTCOMPOSER_WEIGHTS, then the converted cache, then the Hub.
        allow_download: when False, never touch the network.
        dtype: the dtype the model will run in ("fp32", "fp16", "bf16"): picks the matching cached copy.
    """
    weights = weights if weights is not None else os.environ.get("FASTCOMPOSER_WEIGHTS") or None
    if weights is not None and str(weights) == "tiny":
        return ResolvedWeights("tiny", None, "tiny")
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_dir():
            if not is_converted_folder(path):
                raise WeightsUnavailableError(
                    f"--weights {path} is a folder without model_index.json; pass the {config.CHECKPOINT_FILE} "
                    "file itself, or a folder made by `python -m fastcomposer convert`"
                )
            return ResolvedWeights("converted", path, "local folder")
        if path.is_file():
            if path.suffix not in CHECKPOINT_SUFFIXES:
                raise WeightsUnavailableError(
                    f"--weights {path} is not a checkpoint file (expected one of {', '.join(CHECKPOINT_SUFFIXES)})"
                )
            return ResolvedWeights("checkpoint", path, "local file")
        raise WeightsUnavailableError(f"--weights {path} does not exist")

    revision = checkpoint_revision()
    cached = converted_dir(revision, dtype)
    if is_converted_folder(cached):
        return ResolvedWeights("converted", cached, "cache", revision)
    if not allow_download:
        raise WeightsUnavailableError(
            f"no local FastComposer weights (looked in {cached}) and downloading is turned off; pass "
            "--weights PATH to the released pytorch_model.bin, or --weights tiny for a preview"
        )
    return ResolvedWeights("checkpoint", download_checkpoint(revision), "hub", revision)


def write_provenance(folder: Path, resolved: ResolvedWeights) -> None:
    """Record where a converted folder came from, so its metadata survives the conversion."""
    info = {"source": str(resolved.path), "origin": resolved.origin, "revision": resolved.revision,
            "repo": config.CHECKPOINT_REPO}
    (folder / "fastcomposer_source.json").write_text(json.dumps(info, indent=2))
