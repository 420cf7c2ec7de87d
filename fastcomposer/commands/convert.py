"""`python -m fastcomposer convert IN OUT`: the released checkpoint as a fast-loading folder (safetensors)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import UserError


def add_parser(sub) -> None:
    c = sub.add_parser("convert", help="convert the released pytorch_model.bin into a fast-loading folder")
    c.add_argument("input", help="the released checkpoint (pytorch_model.bin) or a .safetensors in its layout")
    c.add_argument("output", help="folder to write (diffusers layout, safetensors)")
    c.add_argument("--base-model", default=None, metavar="DIR", help="configs of another base model")
    c.add_argument("--image-encoder", default=None, metavar="DIR", help="config of another CLIP image encoder")
    c.add_argument("--dtype", choices=["same", "fp32", "fp16", "bf16"], default="fp32",
                   help="store weights as (default fp32: lossless, and loads as-is on a CPU; fp16 for GPUs); "
                   "'same' keeps the file's bf16/fp32 mix, which must then be loaded with an explicit dtype")
    c.add_argument("-v", "--verbose", action="store_true", help="more log output")



def run(args: argparse.Namespace) -> int:
    from ..messages import message_for
    from ..models.architecture import build_modules, bundled_architecture, with_overrides
    from ..models.checkpoint import CheckpointError, load_into_modules, read_state_dict
    from ..models.weights import ResolvedWeights, write_provenance
    from ..pipeline.loading import assemble

    source, out = Path(args.input), Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new folder")
    try:
        arch = with_overrides(bundled_architecture(), args.base_model, args.image_encoder)
        modules = build_modules(arch, empty=True)
        from ..pipeline.loading import DTYPES

        dtype = None if args.dtype == "same" else DTYPES[args.dtype]
        load_into_modules(modules, read_state_dict(source), dtype=dtype, source=f"checkpoint {source.name}")
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise UserError(message_for(e, "cli")) from None
    pipe = assemble(modules, arch)
    pipe.save_pretrained(out, safe_serialization=True)
    write_provenance(out, ResolvedWeights("checkpoint", source, "local file"))
    sys.stdout.write(f"{out}\n")
    return 0
