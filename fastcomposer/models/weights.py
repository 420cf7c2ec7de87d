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

from .. import config
from ..downloads import cache_dir, hub_unreachable
from ..messages import UserFacingError, Wording

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".safetensors")


class WeightsUnavailableError(UserFacingError, RuntimeError):
    """The weights could not be found or downloaded; the message says why and how to supply them, worded for
    the page's preview banner (no paths), the command line (its flags) and Python (`load_pipeline`'s arguments)."""


# How to supply the weights by hand, as each audience does it (the app takes the command line's flags too).
SUPPLY_WEIGHTS = Wording(
    page="start the app with --weights PATH (or FASTCOMPOSER_WEIGHTS=PATH)",
    cli="pass its path with --weights PATH (or FASTCOMPOSER_WEIGHTS=PATH), or use --weights tiny for a preview "
    "with random weights",
    api="pass its path as `weights=PATH` (or set FASTCOMPOSER_WEIGHTS=PATH), or use `weights='tiny'` for a "
    "preview with random weights",
)
DOWNLOAD_FAILED = Wording(
    page="the FastComposer weights could not be downloaded from the Hugging Face Hub ({error}). Download {file} "
    "from {url} by hand and {supply}.",
    cli="the FastComposer weights could not be downloaded from the Hugging Face Hub ({reason}). Download {file} "
    "from {url} by hand and {supply}.",
    api="the FastComposer weights could not be downloaded from the Hugging Face Hub ({reason}). Download {file} "
    "from {url} by hand and {supply}.",
)
FOLDER_WITHOUT_INDEX = Wording(
    page="the weights folder has no model_index.json; give the {file} file itself, or a folder made by "
    "`python -m fastcomposer convert`",
    cli="--weights {path} is a folder without model_index.json; pass the {file} file itself, or a folder made by "
    "`python -m fastcomposer convert`",
    api="`weights` ({path}) is a folder without model_index.json; pass the {file} file itself, or a folder made "
    "by `python -m fastcomposer convert`",
)
NOT_A_CHECKPOINT = Wording(
    page="the weights file is not a checkpoint file (expected one of {suffixes})",
    cli="--weights {path} is not a checkpoint file (expected one of {suffixes})",
    api="`weights` ({path}) is not a checkpoint file (expected one of {suffixes})",
)
NO_SUCH_WEIGHTS = Wording(
    page="the weights file given with --weights (or FASTCOMPOSER_WEIGHTS) does not exist",
    cli="--weights {path} does not exist",
    api="`weights` ({path}) does not exist",
)
NOTHING_LOCAL = Wording(
    page="no local FastComposer weights and downloading is turned off; {supply}, where PATH is the released {file}",
    cli="no local FastComposer weights (looked in {cached}) and downloading is turned off; pass --weights PATH to "
    "the released {file}, or --weights tiny for a preview",
    api="no local FastComposer weights (looked in {cached}) and `allow_download=False`; pass `weights=PATH` to "
    "the released {file}, or `weights='tiny'` for a preview",
)


@dataclass(frozen=True)
class ResolvedWeights:
    """Which weights to load."""

    kind: str  # "tiny" (random, built from configs), "checkpoint" (released layout file) or "converted" (folder)
    path: Path | None  # the file or folder; None for tiny
    origin: str  # where it came from, for logs and PNG metadata ("tiny", "local file", "cache", "hub")
    revision: str | None = None  # the Hub revision for hub/cache weights


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
    offline = hub_unreachable()
    try:
        from huggingface_hub import hf_hub_download

        if offline:  # only what the Hugging Face cache already holds: no retries against a missing network
            return Path(hf_hub_download(config.CHECKPOINT_REPO, config.CHECKPOINT_FILE, revision=revision,
                                        local_files_only=True))
        logger.info("downloading %s/%s at %s (4.5 GB, once)", config.CHECKPOINT_REPO, config.CHECKPOINT_FILE, revision)
        return Path(hf_hub_download(config.CHECKPOINT_REPO, config.CHECKPOINT_FILE, revision=revision))
    except Exception as e:  # network, auth, disk: all end the same way for the user
        reason = offline or f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else 'no details'}"
        raise WeightsUnavailableError(  # the page gets only the error's type: its text can hold cache paths
            DOWNLOAD_FAILED, reason=reason, error=offline or type(e).__name__, file=config.CHECKPOINT_FILE,
            url=f"https://huggingface.co/{config.CHECKPOINT_REPO}", supply=SUPPLY_WEIGHTS,
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
                raise WeightsUnavailableError(FOLDER_WITHOUT_INDEX, path=str(path), file=config.CHECKPOINT_FILE)
            return ResolvedWeights("converted", path, "local folder")
        if path.is_file():
            if path.suffix not in CHECKPOINT_SUFFIXES:
                suffixes = ", ".join(CHECKPOINT_SUFFIXES)
                raise WeightsUnavailableError(NOT_A_CHECKPOINT, path=str(path), suffixes=suffixes)
            return ResolvedWeights("checkpoint", path, "local file")
        raise WeightsUnavailableError(NO_SUCH_WEIGHTS, path=str(path))

    revision = checkpoint_revision()
    cached = converted_dir(revision, dtype)
    if is_converted_folder(cached):
        return ResolvedWeights("converted", cached, "cache", revision)
    if not allow_download:
        raise WeightsUnavailableError(NOTHING_LOCAL, cached=str(cached), file=config.CHECKPOINT_FILE,
                                      supply=SUPPLY_WEIGHTS)
    return ResolvedWeights("checkpoint", download_checkpoint(revision), "hub", revision)


def write_provenance(folder: Path, resolved: ResolvedWeights) -> None:
    """Record where a converted folder came from, so its metadata survives the conversion."""
    info = {"source": str(resolved.path), "origin": resolved.origin, "revision": resolved.revision,
            "repo": config.CHECKPOINT_REPO}
    (folder / "fastcomposer_source.json").write_text(json.dumps(info, indent=2))
