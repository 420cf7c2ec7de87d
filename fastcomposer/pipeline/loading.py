"""`load_pipeline`: weights + device + dtype + sampler + safety checker -> a ready FastComposerPipeline."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import CLIPImageProcessor

from .. import config
from ..downloads import hub_unreachable
from ..inputs.prompt import load_tokenizer
from ..messages import Wording
from ..models.architecture import Architecture, build_modules, bundled_architecture, tiny_architecture, with_overrides
from ..models.checkpoint import load_into_modules, read_state_dict
from ..models.lora import LoraSpec, apply_loras, lora_file, parse_lora_spec
from ..models.weights import (
    ResolvedWeights,
    WeightsUnavailableError,
    cache_dir,
    checkpoint_sha256,
    converted_dir,
    is_converted_folder,
    resolve_weights,
    write_provenance,
)
from .devices import (  # noqa: F401  (re-exported: `loading.pick_device` and co. are used from here)
    DTYPES,
    SetupError,
    cast,
    compile_unet,
    needs_offload,
    pick_device,
    pick_dtype,
    use_memory_format,
)
from .pipeline_fastcomposer import FastComposerPipeline
from .presets import get_preset
from .schedulers import make_scheduler

logger = logging.getLogger(__name__)

SAFETY_CHECKER_MISSING = Wording(
    page="the safety checker ({repo}, ~1.2 GB) could not be loaded ({error}). Connect the server to the internet "
    "once so it can be downloaded, or start the app with --no-safety-checker (FASTCOMPOSER_DISABLE_SAFETY=1)",
    cli="the safety checker ({repo}, ~1.2 GB) could not be loaded ({error}). Connect to the internet once so it "
    "can be downloaded, or run without it with --no-safety-checker",
    api="the safety checker ({repo}, ~1.2 GB) could not be loaded ({error}). Connect to the internet once so it "
    "can be downloaded, or load without it with `safety_checker=False`",
)


def load_safety_checker(dtype: torch.dtype, allow_download: bool = True):
    """Diffusers' StableDiffusionSafetyChecker from the Hub (pinned by $FASTCOMPOSER_SAFETY_REVISION).

    Raises:
        `WeightsUnavailableError` saying how to get it or how to run without it.
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    revision = os.environ.get("FASTCOMPOSER_SAFETY_REVISION") or config.SAFETY_CHECKER_REVISION
    try:
        return StableDiffusionSafetyChecker.from_pretrained(
            config.SAFETY_CHECKER_REPO, revision=revision, dtype=dtype,
            local_files_only=not allow_download or hub_unreachable() is not None,
        )
    except Exception as e:
        raise WeightsUnavailableError(SAFETY_CHECKER_MISSING, repo=config.SAFETY_CHECKER_REPO,
                                      error=type(e).__name__) from e


def _converted_copy(resolved: ResolvedWeights, arch: Architecture, dtype: str) -> Path | None:
    """Where the converted copy (in `dtype`) of a checkpoint file lives; None for tiny and converted weights.

    Hub files by revision; local files by their path, size, mtime and the architecture they were read with.
    """
    if resolved.kind != "checkpoint":
        return None
    if resolved.origin == "hub":
        return converted_dir(resolved.revision, dtype)
    path = resolved.path
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{arch.name}|{sorted(arch.image_encoder.items())}"
    return cache_dir() / "converted" / f"local-{hashlib.sha1(key.encode()).hexdigest()[:16]}-{dtype}"


def assemble(
    modules: dict[str, torch.nn.Module], arch: Architecture, scheduler: str = "pndm"
) -> FastComposerPipeline:
    """A pipeline from built modules plus the architecture's tokenizer and sampler (no safety checker).

    It is always built with the base model's own PNDM config, which every later `use_scheduler` starts
    from, and then switched to `scheduler`.
    """
    pipe = FastComposerPipeline(
        **modules,
        tokenizer=load_tokenizer(arch.tokenizer_dir),
        scheduler=make_scheduler("pndm", arch.scheduler),
        feature_extractor=CLIPImageProcessor(**arch.feature_extractor),
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.use_scheduler(scheduler)
    return pipe


def save_converted(pipe: FastComposerPipeline, folder: Path, resolved: ResolvedWeights) -> None:
    """Save a diffusers-format copy with safetensors, atomically (a half-written folder is never used)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_provenance(tmp, resolved)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        logger.info("saved a converted copy for fast starts to %s", folder)
    except OSError as e:  # a full disk must not stop generation: the weights are loaded already
        logger.warning("could not save the converted copy (%s); the next start reads the checkpoint again", e)
        shutil.rmtree(tmp, ignore_errors=True)


def load_modules_from_checkpoint(path: Path, arch: Architecture, dtype: torch.dtype | None) -> dict:
    """Build the networks on the meta device and assign the checkpoint's tensors: weights are held once."""
    state_dict = read_state_dict(path, expected_sha256=checkpoint_sha256())
    modules = build_modules(arch, empty=True)
    load_into_modules(modules, state_dict, dtype, source=f"checkpoint {path.name}")
    return modules


def load_pipeline(
    weights: str | os.PathLike | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    scheduler: str | None = None,
    preset: str | None = None,
    safety_checker: bool = True,
    base_model: str | os.PathLike | None = None,
    image_encoder: str | os.PathLike | None = None,
    allow_download: bool = True,
    cache_converted: bool = True,
    compile: bool = False,
    offload: bool | str = "auto",
    offload_batch: int = 1,
    loras: Sequence[str | LoraSpec] = (),
) -> FastComposerPipeline:
    """Load FastComposer, ready to call.

    Args:
        weights: None (cache, then the Hub), "tiny" (random tiny model), a released-layout checkpoint file,
            or a folder made by `python -m fastcomposer convert`.
        device: "auto", "cpu", "cuda", "cuda:N" (one GPU of several) or "mps".
        dtype: "auto", "fp32", "fp16" or "bf16".
        scheduler: "pndm" (the original's), "dpm", "ddim" or "euler"; defaults to the preset's.
        preset: "original" (default), "balanced" or "fast" (see presets.py): the sampler to start with, and
            the steps and feature caching every call uses unless it says otherwise.
        safety_checker: run diffusers' StableDiffusionSafetyChecker on every image (downloaded once).
        base_model: a diffusers SD folder whose configs, tokenizer and scheduler replace the bundled ones.
        image_encoder: a CLIP folder whose `config.json` (a CLIPConfig) replaces the bundled vision config.
        allow_download: False never touches the network.
        cache_converted: after reading a checkpoint file, save a fast-loading copy in the cache.
        compile: on CUDA, compile the UNet with `torch.compile` (CUDA graphs): about a minute of warm-up on
            the first call of each image size, then faster steps. For servers, not for one-off runs.
        offload: diffusers' model CPU offload (each network moves to the GPU only while it runs): True,
            False, or "auto": on when the GPU's free memory is under what `offload_batch` images at 512 px
            need (see `needs_offload`). CUDA only.
        offload_batch: the number of images per call "auto" plans for.
        loras: LoRAs to apply, as specs `PATH_OR_HUB_REPO[:SCALE]` or [`LoraSpec`]s (see lora.py). They go on
            after the weights are loaded (a converted copy saved in the cache holds the base weights only).

    Returns:
        [`FastComposerPipeline`] on `device`, with `pipe.weights_label` naming the weights and
        `pipe.active_loras` the LoRAs applied, for metadata.

    Raises:
        `WeightsUnavailableError`, `CheckpointError`, `LoraError`, `ValueError` with messages that say how to fix
        them.
    """
    # 1. Where and how it runs, and what it needs: weights, the safety checker, LoRA files (each fails early)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    chosen = get_preset(preset)
    dtype_name = next(name for name, value in DTYPES.items() if value == torch_dtype)
    resolved = resolve_weights(weights, allow_download=allow_download, dtype=dtype_name)
    # The checker before the weights are read: if it cannot be had, fail before gigabytes are loaded for nothing.
    checker = load_safety_checker(torch_dtype, allow_download) if safety_checker else None
    lora_specs = [parse_lora_spec(spec) for spec in loras]
    for spec in lora_specs:  # a missing LoRA file or failed download, too, shows before the weights are read
        lora_file(spec, allow_download)

    # 2. The networks, from the weights that were found
    arch = with_overrides(
        tiny_architecture() if resolved.kind == "tiny" else bundled_architecture(), base_model, image_encoder
    )
    pipe, label = build_pipeline(resolved, arch, torch_dtype, dtype_name, scheduler or chosen.scheduler,
                                 cache_converted, base_model is not None)

    # 3. The safety checker, the default preset, the device (or offload), LoRAs, layout and compilation
    if checker is not None:
        pipe.register_modules(safety_checker=checker)
        pipe.register_to_config(requires_safety_checker=True)
    else:
        logger.warning("the safety checker is off: generated images are not filtered")
    pipe.default_preset = chosen.name
    place(pipe, torch_device, offload, offload_batch)
    pipe.active_loras = apply_loras(pipe, lora_specs, allow_download=allow_download) if lora_specs else []
    use_memory_format(pipe, torch_device, torch_dtype)
    if compile:
        compile_unet(pipe)
    pipe.weights_label = label
    pipe.set_progress_bar_config(disable=True)  # callers show their own progress
    logger.info("FastComposer ready: %s on %s (%s)", label, torch_device, str(torch_dtype).removeprefix("torch."))
    return pipe


def build_pipeline(
    resolved: ResolvedWeights, arch: Architecture, dtype: torch.dtype, dtype_name: str, scheduler: str,
    cache_converted: bool, own_tokenizer: bool,
) -> tuple[FastComposerPipeline, str]:
    """The pipeline from tiny, checkpoint or converted weights (on the CPU), and the label naming the weights.

    A checkpoint file read once is saved as a converted copy in the cache (when `cache_converted`), in the dtype
    it runs in, so the next start memory-maps it without converting; that copy is used when it exists.
    """
    cached = _converted_copy(resolved, arch, dtype_name)
    if resolved.kind == "checkpoint" and cache_converted and is_converted_folder(cached):
        resolved = ResolvedWeights("converted", cached, "cache", resolved.revision)
    if resolved.kind == "tiny":
        return cast(assemble(build_modules(arch, empty=False), arch, scheduler), dtype), "tiny (random weights)"
    if resolved.kind == "checkpoint":
        pipe = assemble(load_modules_from_checkpoint(resolved.path, arch, dtype), arch)
        if cache_converted:
            save_converted(pipe, cached, resolved)
        pipe.use_scheduler(scheduler)
        label = f"{config.CHECKPOINT_REPO}@{resolved.revision}" if resolved.origin == "hub" else resolved.path.name
        return pipe, label
    pipe = FastComposerPipeline.from_pretrained(resolved.path, dtype=dtype, safety_checker=None,
                                                requires_safety_checker=False)
    if own_tokenizer:  # a --base-model's tokenizer replaces the one saved in the folder
        pipe.tokenizer = load_tokenizer(arch.tokenizer_dir)
    # Samplers always start from the base model's scheduler config, never from whatever a folder saved.
    pipe.set_base_scheduler(arch.scheduler)
    pipe.use_scheduler(scheduler)
    return pipe, f"{config.CHECKPOINT_REPO}@{resolved.revision}" if resolved.revision else resolved.path.name


def place(pipe: FastComposerPipeline, device: torch.device, offload: bool | str, offload_batch: int) -> None:
    """Move the pipeline to `device`, or turn on model CPU offload on a CUDA GPU too small for it (see devices.py)."""
    if device.type == "cuda" and (offload is True or offload == "auto" and needs_offload(pipe, offload_batch, device)):
        pipe.enable_model_cpu_offload(device=device)  # weights stay in RAM; the GPU holds one network at a time
        logger.info("model CPU offload is on: slower, but fits a small GPU")
    else:
        pipe.to(device)
