"""Where and in what precision the pipeline runs: device and dtype choice, memory layout, compilation, offload."""

from __future__ import annotations

import logging

import torch

from ..messages import SETTING_NAMES, UserFacingError, Wording
from .pipeline_fastcomposer import FastComposerPipeline

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
