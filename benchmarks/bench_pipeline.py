"""Pipeline overhead: our FastComposerPipeline vs diffusers' plain StableDiffusionPipeline.

Both pipelines share the SAME module objects (UNet, VAE, text encoder, tokenizer), the same sampler
class and config, steps, size, guidance and seed, and both decode to numpy, so the difference is only
what our pipeline adds: one CLIP vision pass, one more text encode and the post-fuse MLP. Weights are
random (speed does not depend on their values). Runs alternate (ours, baseline, ours, ...) after one
warm-up each, so clock or thermal drift hits both alike. Target: ratio <= 1.02.

    python benchmarks/bench_pipeline.py                       # SD1.5-sized, CPU: 256 px, 20 steps
    python benchmarks/bench_pipeline.py --arch tiny           # a quick run
    python benchmarks/bench_pipeline.py --device cuda         # fp16, 512 px, 50 steps
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import diffusers
import PIL.Image
import torch
from diffusers import StableDiffusionPipeline

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere

from fastcomposer.models.architecture import build_modules, bundled_architecture, tiny_architecture  # noqa: E402
from fastcomposer.pipeline.loading import assemble, cast, pick_device, pick_dtype  # noqa: E402
from fastcomposer.pipeline.pipeline_fastcomposer import FastComposerPipeline  # noqa: E402
from fastcomposer.pipeline.schedulers import make_scheduler  # noqa: E402

logger = logging.getLogger("bench_pipeline")

OURS_PROMPT = "a photo of a woman img in a garden"
BASELINE_PROMPT = "a photo of a woman in a garden"  # the same text without the subject marker


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model (platform.processor() is empty on most Linux systems)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def one_pixel_variant(photo: PIL.Image.Image, k: int) -> PIL.Image.Image:
    """A copy differing in one pixel: the same subject, but a new photo to the pipeline's embedding cache."""
    variant = photo.copy()
    variant.putpixel((0, 0), (k % 256, k // 256 % 256, 0))
    return variant


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, int]:
    """Seconds for one call and the peak GPU memory it allocated (bytes; 0 off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()  # kernels run asynchronously: wait for them before reading the clock
    seconds = time.perf_counter() - start
    return seconds, torch.cuda.max_memory_allocated() if device.type == "cuda" else 0


def build_pipelines(
    arch_name: str, device: torch.device, dtype: torch.dtype, scheduler: str
) -> tuple[FastComposerPipeline, StableDiffusionPipeline]:
    """Our pipeline and a plain SD pipeline over the same networks; each gets its own sampler instance."""
    arch = bundled_architecture() if arch_name == "sd15" else tiny_architecture()
    ours = cast(assemble(build_modules(arch, empty=False), arch, scheduler), dtype).to(device)
    baseline = StableDiffusionPipeline(
        vae=ours.vae,
        text_encoder=ours.text_encoder,
        tokenizer=ours.tokenizer,
        unet=ours.unet,
        # Same class and config; a separate instance because samplers keep per-run state (PNDM's history).
        scheduler=make_scheduler(scheduler, arch.scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for pipe in (ours, baseline):
        pipe.set_progress_bar_config(disable=True)
    return ours, baseline


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                        help="auto: fp16 on cuda, fp32 on cpu")
    parser.add_argument("--scheduler", choices=["pndm", "dpm", "ddim", "euler"], default="pndm")
    parser.add_argument("--steps", type=int, default=None, help="default 50 on cuda, 20 on cpu")
    parser.add_argument("--size", type=int, default=None, help="image side; default 512 on cuda, 256 on cpu")
    parser.add_argument("--guidance", type=float, default=5.0, help="the app's default CFG weight")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each pipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--same-photo", action="store_true",
                        help="reuse one photo, so ours hits its subject-embedding cache after the warm-up "
                             "(default: a new photo each call, so the CLIP vision pass is timed)")
    parser.add_argument("--with-attention", action="store_true",
                        help="also time ours with return_attention=True (capture on), beside ours with it off")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    on_cuda = device.type == "cuda"
    steps = args.steps or (50 if on_cuda else 20)
    size = args.size or (512 if on_cuda else 256)

    t0 = time.perf_counter()
    ours, baseline = build_pipelines(args.arch, device, dtype, args.scheduler)
    logger.info("built %s modules on %s in %.1f s", args.arch, device, time.perf_counter() - t0)
    photo = PIL.Image.open(ROOT / "assets" / "astronaut.png").convert("RGB")
    calls = (args.repeats + 1) * (2 if args.with_attention else 1)  # ours with capture draws photos here too
    photos = iter([photo] * calls if args.same_photo else [one_pixel_variant(photo, k) for k in range(calls)])
    common = dict(num_inference_steps=steps, guidance_scale=args.guidance, height=size, width=size,
                  output_type="np")
    runs: dict[str, Callable[[], object]] = {
        # A CPU generator: the same starting noise on every device, drawn identically for both.
        "ours": lambda: ours(OURS_PROMPT, [next(photos)], generator=torch.Generator().manual_seed(args.seed),
                             **common),
        "baseline": lambda: baseline(BASELINE_PROMPT, generator=torch.Generator().manual_seed(args.seed), **common),
    }
    if args.with_attention:
        runs["ours_attention"] = lambda: ours(OURS_PROMPT, [next(photos)], return_attention=True,
                                              generator=torch.Generator().manual_seed(args.seed), **common)

    warmup = {}
    for name, fn in runs.items():  # first calls pay for allocator growth, kernel selection, lazy imports
        warmup[name], _ = timed(fn, device)
        logger.info("warm-up %s: %.2f s", name, warmup[name])
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    peaks = {name: 0 for name in runs}
    for k in range(args.repeats):
        for name, fn in runs.items():
            s, peak = timed(fn, device)
            seconds[name].append(round(s, 4))
            peaks[name] = max(peaks[name], peak)
            logger.info("run %d %s: %.2f s", k + 1, name, s)

    medians = {name: statistics.median(v) for name, v in seconds.items()}
    result = {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(),
        "arch": args.arch,
        "dtype": str(dtype).removeprefix("torch."),
        "size": size,
        "steps": steps,
        "unet_iterations": len(ours.scheduler.timesteps),  # PNDM: steps + 1
        "scheduler": args.scheduler,
        "guidance": args.guidance,
        "batch": 1,
        "subject_photo": "same each call (embedding cached)" if args.same_photo else "new each call (encoded)",
        "repeats": args.repeats,
        "warmup_s": {k: round(v, 4) for k, v in warmup.items()},
        "seconds": seconds,
        "median_s": {k: round(v, 4) for k, v in medians.items()},
        "ratio": round(medians["ours"] / medians["baseline"], 4),
        **({"attention_on_over_off": round(medians["ours_attention"] / medians["ours"], 4)}
           if "ours_attention" in medians else {}),
        "ratio_target": 1.02,
        # Other processes on a shared machine distort CPU timings; a 1-minute load above the core count says so.
        "loadavg_1min_at_end": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
    }
    if on_cuda:
        result["peak_gpu_gib"] = {k: round(v / 2**30, 3) for k, v in peaks.items()}
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
