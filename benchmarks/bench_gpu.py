"""GPU figures in one run: pipeline overhead vs diffusers' StableDiffusionPipeline, samplers, memory.

Full SD1.5-sized networks with random weights (speed does not depend on the values), fp16, 512 px.
Our FastComposerPipeline and a plain StableDiffusionPipeline share the same module objects, scheduler
config and step count; runs alternate (ours, baseline, ours, ...) so clock drift hits both alike.

    python benchmarks/bench_gpu.py --steps 50 --repeats 3 > gpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import PIL.Image
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers import StableDiffusionPipeline  # noqa: E402

from fastcomposer.models.architecture import build_modules, bundled_architecture  # noqa: E402
from fastcomposer.pipeline.loading import assemble, cast, compile_unet  # noqa: E402
from fastcomposer.pipeline.schedulers import make_scheduler  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import timed  # noqa: E402  (the same timer as the general pipeline benchmark)

logger = logging.getLogger("bench_gpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scheduler", default="pndm")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="compile our UNet (the baseline stays eager)")
    parser.add_argument("--preset", choices=["original", "balanced", "fast"], default=None,
                        help="take sampler, steps and cache interval from a preset (overrides --steps/--scheduler); "
                        "the baseline runs the same sampler and steps without the cache")
    args = parser.parse_args()
    cache_interval = 1
    if args.preset:
        from fastcomposer.pipeline.presets import resolve

        plan = resolve(args.preset)
        args.scheduler, args.steps, cache_interval = plan.scheduler, plan.num_inference_steps, plan.cache_interval
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    arch = bundled_architecture()
    t0 = time.perf_counter()
    ours = cast(assemble(build_modules(arch, empty=False), arch, args.scheduler), dtype).to(device)
    logger.info("built SD1.5-sized random modules in %.1f s", time.perf_counter() - t0)
    ours.set_progress_bar_config(disable=True)
    baseline = StableDiffusionPipeline(
        vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer, unet=ours.unet,
        scheduler=make_scheduler(args.scheduler, arch.scheduler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    baseline.set_progress_bar_config(disable=True)
    photo = PIL.Image.open(ROOT / "assets" / "astronaut.png").convert("RGB")
    common = dict(num_inference_steps=args.steps, guidance_scale=5.0, height=args.size, width=args.size,
                  num_images_per_prompt=args.num_images, output_type="np")

    def run_ours():
        ours("a photo of a woman img in a garden", [photo], generator=torch.Generator().manual_seed(0),
             cache_interval=cache_interval, **common)

    def run_baseline():
        baseline("a photo of a woman in a garden", generator=torch.Generator().manual_seed(0), **common)

    if args.compile:
        eager_unet = ours.unet
        compile_unet(ours)
        baseline.unet = eager_unet  # channels-last is shared (same weights), compilation is not
    t0 = time.perf_counter()
    run_ours()
    run_ours()  # CUDA graphs are recorded on the second call
    warmup_ours = time.perf_counter() - t0
    run_baseline()  # warm-up: kernels, cuDNN autotuning, allocator
    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    peaks: dict[str, int] = {"ours": 0, "baseline": 0}
    for _ in range(args.repeats):
        for name, fn in (("ours", run_ours), ("baseline", run_baseline)):
            seconds, peak = timed(fn, device)
            times[name].append(round(seconds, 4))
            peaks[name] = max(peaks[name], peak)
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": args.dtype, "size": args.size, "steps": args.steps,
        "scheduler": args.scheduler, "num_images": args.num_images, "compiled": args.compile,
        "preset": args.preset, "cache_interval": cache_interval,
        "warmup_ours_s": round(warmup_ours, 1), "seconds": times, "median_s": medians,
        "ratio_ours_over_baseline": round(medians["ours"] / medians["baseline"], 4),
        "seconds_per_iteration_ours": round(medians["ours"] / len(ours.scheduler.timesteps), 4),
        "peak_gpu_gib": {k: round(v / 2**30, 3) for k, v in peaks.items()},
    }
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
