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
from ..inputs.prompt import load_tokenizer
from ..messages import SETTING_NAMES, UserFacingError, Wording
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
from .pipeline_fastcomposer import FastComposerPipeline
from .presets import get_preset
from .schedulers import make_scheduler

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class SetupError(UserFacingError, ValueError):
    """A device or dtype that cannot be used here; named by flag on the command line and the page (where they are
    the app's start-up flags), by argument in Python."""


NO_DEVICE = Wording(
    page="--device {value} was asked for but {missing} is not available; use --device cpu",
    cli="--device {value} was asked for but {missing} is not available; use --device cpu",
    api="`device='{value}'` was asked for but {missing} is not available; use `device='cpu'`",
)
UNKNOWN_CHOICE = Wording.same("unknown {setting} {value!r}; choose {choices}")
SAFETY_CHECKER_MISSING = Wording(
    page="the safety checker ({repo}, ~1.2 GB) could not be loaded ({error}). Connect the server to the internet "
    "once so it can be downloaded, or start the app with --no-safety-checker (FASTCOMPOSER_DISABLE_SAFETY=1)",
    cli="the safety checker ({repo}, ~1.2 GB) could not be loaded ({error}). Connect to the internet once so it "
    "can be downloaded, or run without it with --no-safety-checker",
    api="the safety checker ({repo}, ~1.2 GB) could not be loaded ({error}). Connect to the internet once so it "
    "can be downloaded, or load without it with `safety_checker=False`",
)


def cast(pipe: FastComposerPipeline, dtype: torch.dtype) -> FastComposerPipeline:
    """Cast every network to `dtype` (diffusers' own `.to(dtype)` warns needlessly for each model)."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            torch.nn.Module.to(component, dtype=dtype)
    return pipe


def use_memory_format(pipe: FastComposerPipeline, device: torch.device, dtype: torch.dtype) -> None:
    """Channels-last convolutions where they were measured to help: bf16 on the CPU.

    On a 2-core AVX512-BF16 CPU at 512 px (benchmarks/bench_speed.py) channels-last makes a bf16 UNet step 4-11%
    and a bf16 VAE decode 17% faster. In fp32 it is a wash, and fp32 must stay exactly the original's arithmetic,
    so it keeps the default layout. On CUDA, `compile_unet` chooses the layout.
    """
    if device.type == "cpu" and dtype == torch.bfloat16:
        for network in (pipe.unet, pipe.vae):
            network.to(memory_format=torch.channels_last)


def compile_unet(pipe: FastComposerPipeline) -> FastComposerPipeline:
    """Compile the UNet (the loop's only heavy part) for CUDA; a no-op elsewhere.

    At batch 1-4 a 512 px SD1.5 step on a large GPU is bound by kernel launches, not arithmetic, so
    CUDA graphs ("reduce-overhead") and channels-last convolutions pay off; the rest runs once per call.
    """
    if pipe.device.type != "cuda":
        logger.warning("--compile only helps on CUDA; running uncompiled on %s", pipe.device.type)
        return pipe
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
    return pipe


# Peak memory above the weights for SD1.5 in fp16 at 512 px, measured on a GPU with our pipeline
# (README, "Performance": 3.2 GiB for one image, 4.6 GiB for four, weights included).
ACTIVATION_BASE_BYTES = 0.15 * 2**30
ACTIVATION_PER_IMAGE_BYTES = 0.47 * 2**30
MEMORY_MARGIN = 1.15  # the allocator's fragmentation and the CUDA context


def memory_need_bytes(pipe: FastComposerPipeline, batch: int, height: int = 512, width: int = 512) -> int:
    """Estimated GPU bytes for one call of `batch` images: the weights plus activations, with a margin."""
    weights = sum(p.numel() * p.element_size() for c in pipe.components.values() if isinstance(c, torch.nn.Module)
                  for p in c.parameters())
    scale = height * width / 512**2
    return int(MEMORY_MARGIN * (weights + ACTIVATION_BASE_BYTES + ACTIVATION_PER_IMAGE_BYTES * batch * scale))


def needs_offload(pipe: FastComposerPipeline, batch: int = 1, device: torch.device | None = None) -> bool:
    """True when `device`'s free memory (default: the current CUDA device's) is under `memory_need_bytes`."""
    free, _total = torch.cuda.mem_get_info(device)
    need = memory_need_bytes(pipe, batch)
    if free < need:
        logger.info("GPU free memory %.1f GiB < %.1f GiB needed: turning on model CPU offload", free / 2**30,
                    need / 2**30)
        return True
    return False


def pick_device(device: str = "auto") -> torch.device:
    """"auto" picks cuda, then mps, then cpu; an explicit device must exist.

    "cuda:N" names one GPU, as `accelerate` gives each process of a multi-GPU run (`PartialState().device`).
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SetupError(NO_DEVICE, value="cuda", missing="a CUDA GPU")
    if device == "mps" and not torch.backends.mps.is_available():
        raise SetupError(NO_DEVICE, value="mps", missing="Apple's MPS")
    if device.startswith("cuda:"):
        index = device.removeprefix("cuda:")
        if not index.isdigit():
            raise SetupError(UNKNOWN_CHOICE, setting=SETTING_NAMES["device"], value=device,
                             choices="auto, cpu, cuda, cuda:0, cuda:1, ... or mps")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(index) >= count:
            raise SetupError(NO_DEVICE, value=device, missing=f"GPU {index} (of {count} CUDA GPUs)")
        return torch.device(device)
    if device not in ("cpu", "cuda", "mps"):
        raise SetupError(UNKNOWN_CHOICE, setting=SETTING_NAMES["device"], value=device,
                         choices="auto, cpu, cuda or mps")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 arithmetic in hardware (AVX512-BF16 or AMX), where bf16 is about 2x fp32.

    Elsewhere PyTorch emulates bf16 and it is slower than fp32. Asks PyTorch first (its private but
    long-standing `torch.cpu._is_*_supported`), then Linux's CPU flags.
    """
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except Exception:  # noqa: BLE001 - a probe that cannot run means "unknown", not a crash
            pass
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto": fp16 on GPUs (cuda, mps); on the CPU bf16 where the hardware has it, else fp32.

    bf16 changes pixels slightly (it is not the original's arithmetic): `--dtype fp32` reproduces exactly.
    """
    if dtype == "auto":
        if device.type in ("cuda", "mps"):
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if dtype not in DTYPES:
        raise SetupError(UNKNOWN_CHOICE, setting=SETTING_NAMES["dtype"], value=dtype,
                         choices="auto, fp32, fp16 or bf16")
    if dtype == "fp16" and device.type == "cpu":
        logger.warning("fp16 on the CPU is very slow; consider --dtype fp32 or bf16")
    if dtype == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning("this CPU has no native bf16, where bf16 is slower than fp32; consider --dtype fp32")
    return DTYPES[dtype]


def load_safety_checker(dtype: torch.dtype, allow_download: bool = True):
    """Diffusers' StableDiffusionSafetyChecker from the Hub (pinned by $FASTCOMPOSER_SAFETY_REVISION).

    Raises:
        `WeightsUnavailableError` saying how to get it or how to run without it.
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    revision = os.environ.get("FASTCOMPOSER_SAFETY_REVISION") or config.SAFETY_CHECKER_REVISION
    try:
        return StableDiffusionSafetyChecker.from_pretrained(
            config.SAFETY_CHECKER_REPO, revision=revision, dtype=dtype, local_files_only=not allow_download
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
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    chosen = get_preset(preset)
    scheduler = scheduler or chosen.scheduler
    dtype_name = next(name for name, value in DTYPES.items() if value == torch_dtype)
    resolved = resolve_weights(weights, allow_download=allow_download, dtype=dtype_name)
    # The checker before the weights are read: if it cannot be had, fail before gigabytes are loaded for nothing.
    checker = load_safety_checker(torch_dtype, allow_download) if safety_checker else None
    lora_specs = [parse_lora_spec(spec) for spec in loras]
    for spec in lora_specs:  # a missing LoRA file or failed download, too, shows before the weights are read
        lora_file(spec, allow_download)
    arch = with_overrides(
        tiny_architecture() if resolved.kind == "tiny" else bundled_architecture(), base_model, image_encoder
    )
    cached = _converted_copy(resolved, arch, dtype_name)
    if resolved.kind == "checkpoint" and cache_converted:
        if is_converted_folder(cached):
            resolved = ResolvedWeights("converted", cached, "cache", resolved.revision)

    if resolved.kind == "tiny":
        pipe = cast(assemble(build_modules(arch, empty=False), arch, scheduler), torch_dtype)
        label = "tiny (random weights)"
    elif resolved.kind == "checkpoint":
        pipe = assemble(load_modules_from_checkpoint(resolved.path, arch, torch_dtype), arch)
        if cache_converted:  # in the dtype it runs in, so the next start maps it without converting
            save_converted(pipe, cached, resolved)
        pipe.use_scheduler(scheduler)
        label = f"{config.CHECKPOINT_REPO}@{resolved.revision}" if resolved.origin == "hub" else resolved.path.name
    else:
        pipe = FastComposerPipeline.from_pretrained(resolved.path, dtype=torch_dtype, safety_checker=None,
                                                    requires_safety_checker=False)
        if base_model is not None:  # its tokenizer replaces the one saved in the folder
            pipe.tokenizer = load_tokenizer(arch.tokenizer_dir)
        # Samplers always start from the base model's scheduler config, never from whatever a folder saved.
        pipe.set_base_scheduler(arch.scheduler)
        pipe.use_scheduler(scheduler)
        label = f"{config.CHECKPOINT_REPO}@{resolved.revision}" if resolved.revision else resolved.path.name

    if checker is not None:
        pipe.register_modules(safety_checker=checker)
        pipe.register_to_config(requires_safety_checker=True)
    else:
        logger.warning("the safety checker is off: generated images are not filtered")
    pipe.default_preset = chosen.name
    if torch_device.type == "cuda" and (
        offload is True or offload == "auto" and needs_offload(pipe, offload_batch, torch_device)
    ):
        pipe.enable_model_cpu_offload(device=torch_device)  # weights stay in RAM; GPU holds one network at a time
        logger.info("model CPU offload is on: slower, but fits a small GPU")
    else:
        pipe.to(torch_device)
    pipe.active_loras = apply_loras(pipe, lora_specs, allow_download=allow_download) if lora_specs else []
    use_memory_format(pipe, torch_device, torch_dtype)
    if compile:
        compile_unet(pipe)
    pipe.weights_label = label
    pipe.set_progress_bar_config(disable=True)  # callers show their own progress
    logger.info("FastComposer ready: %s on %s (%s)", label, torch_device, str(torch_dtype).removeprefix("torch."))
    return pipe
