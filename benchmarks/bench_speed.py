"""Speed on the machines people have: presets, precision, feature caching and previews, against today's default.

Everything runs in ONE process on SD1.5-sized networks with random weights (speed does not depend on the
values), and every figure is also given as a ratio against a baseline measured in the same run:

    unet_step   one UNet call (CFG batch 2) at --size: fp32 vs bf16, each also in channels-last memory
    cache       the denoising loop at equal steps: DeepCache interval 3 vs none (bf16, DPM++)
    end_to_end  one image through `generation.generate` as the web page runs it (face crop, CLIP, loop,
                VAE decode, previews on): the page's CPU default (*fast*, auto dtype) and *balanced* vs
                today's default (*original*: PNDM 50 steps, fp32), at --size
    small       256 px, 20 steps: *fast* (cache on) and DPM++ without cache

    python benchmarks/bench_speed.py                  # all sections, 512 px (about 25 minutes on 2 cores)
    python benchmarks/bench_speed.py --only unet_step cache
    python benchmarks/bench_speed.py --arch tiny      # a quick check of the script

CPU timings are only meaningful on an otherwise idle machine: the JSON records the load average.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import PIL.Image
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_pipeline import device_name  # noqa: E402
from fastcomposer.generation.run import GenerationRequest, generate  # noqa: E402
from fastcomposer.inputs.faces import FaceCropper  # noqa: E402
from fastcomposer.models.architecture import build_modules, bundled_architecture, tiny_architecture  # noqa: E402
from fastcomposer.pipeline.loading import assemble, cast, cpu_has_native_bf16, pick_dtype, use_memory_format  # noqa: E402
from fastcomposer.pipeline.presets import resolve  # noqa: E402

logger = logging.getLogger("bench_speed")
SECTIONS = ("unet_step", "cache", "end_to_end", "small")


def clock(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(fn, repeats: int) -> float:
    """The median of `repeats` timed calls after one untimed warm-up."""
    fn()
    return statistics.median(clock(fn) for _ in range(repeats))


def build(arch_name: str, dtype: torch.dtype):
    """A pipeline laid out as `load_pipeline` lays it out on the CPU (memory format included)."""
    arch = bundled_architecture() if arch_name == "sd15" else tiny_architecture()
    pipe = cast(assemble(build_modules(arch, empty=False), arch), dtype)
    use_memory_format(pipe, torch.device("cpu"), dtype)
    return pipe


def unet_step(pipes: dict, size: int, repeats: int) -> dict:
    """Seconds per UNet call at batch 2 (classifier-free guidance), per dtype and memory format."""
    out = {}
    for name, pipe in pipes.items():
        unet = pipe.unet
        latent = size // pipe.vae_scale_factor
        x = torch.randn(2, unet.config.in_channels, latent, latent, dtype=unet.dtype)
        cond = torch.randn(2, 77, unet.config.cross_attention_dim, dtype=unet.dtype)
        t = torch.tensor(500)
        for layout in ("contiguous", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            unet.to(memory_format=fmt)
            with torch.no_grad():
                s = best_of(partial(unet, x.to(memory_format=fmt), t, encoder_hidden_states=cond), repeats)
            out[f"{name}_{layout}"] = round(s, 3)
            logger.info("unet step %s %s: %.2f s", name, layout, s)
        use_memory_format(pipe, torch.device("cpu"), unet.dtype) if name == "bf16" else \
            unet.to(memory_format=torch.contiguous_format)
    out["bf16_speedup"] = round(out["fp32_contiguous"] / out["bf16_contiguous"], 3)
    # What ships: fp32 stays contiguous (the reproduction path); bf16 on the CPU runs channels-last.
    out["bf16_as_shipped_speedup"] = round(out["fp32_contiguous"] / out["bf16_channels_last"], 3)
    out["bf16_speedup_target"] = 1.6
    for name in pipes:
        out[f"{name}_channels_last_speedup"] = round(out[f"{name}_contiguous"] / out[f"{name}_channels_last"], 3)
    return out


def vae_decode(pipes: dict, size: int) -> dict:
    """Seconds for one VAE decode of one image, per dtype and memory format."""
    out = {}
    for name, pipe in pipes.items():
        vae = pipe.vae
        latent = size // pipe.vae_scale_factor
        z = torch.randn(1, vae.config.latent_channels, latent, latent, dtype=vae.dtype)
        for layout in ("contiguous", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            vae.to(memory_format=fmt)
            with torch.no_grad():
                s = best_of(partial(vae.decode, z.to(memory_format=fmt)), 1)
            out[f"{name}_{layout}"] = round(s, 3)
            logger.info("vae decode %s %s: %.2f s", name, layout, s)
        vae.to(memory_format=torch.contiguous_format)
        use_memory_format(pipe, torch.device("cpu"), vae.dtype)
    return out


def loop_seconds(pipe, photo, size: int, steps: int, interval: int, scheduler: str) -> float:
    pipe.use_scheduler(scheduler)
    return clock(lambda: pipe("a photo of a woman img in a garden", [photo], num_inference_steps=steps,
                              cache_interval=interval, height=size, width=size, output_type="latent",
                              generator=torch.Generator().manual_seed(0)))


def cache(pipe, photo, size: int, steps: int) -> dict:
    """The denoising loop (latents out, no decode) at equal steps, with and without DeepCache."""
    loop_seconds(pipe, photo, size, 2, 1, "dpm")  # warm-up (and the photo's embedding is cached from here on)
    plain = loop_seconds(pipe, photo, size, steps, 1, "dpm")
    cached = loop_seconds(pipe, photo, size, steps, 3, "dpm")
    logger.info("loop %d steps: %.1f s plain, %.1f s with cache interval 3", steps, plain, cached)
    return {"steps": steps, "scheduler": "dpm", "plain_s": round(plain, 2), "interval3_s": round(cached, 2),
            "speedup": round(plain / cached, 3), "speedup_target": 1.8}


def page_run(pipe, photo, cropper, preset: str, size: int) -> tuple[float, int, int]:
    """One image as the web page makes it; returns seconds, steps reported and previews shown."""
    plan = resolve(preset)
    request = GenerationRequest(prompt="a photo of a woman img in a garden", images=[photo], height=size,
                                width=size, num_inference_steps=plan.num_inference_steps, scheduler=plan.scheduler,
                                cache_interval=plan.cache_interval, preset=preset, seed=0)
    events = {"steps": 0, "previews": 0}

    def on_step(done, total):
        events["steps"] += 1

    def on_preview(done, total, images):
        events["previews"] += 1

    seconds = clock(lambda: generate(pipe, request, on_step=on_step, on_preview=on_preview,
                                     crop_fn=lambda im, name: cropper.crop(im, name=name)))
    return seconds, events["steps"], events["previews"]


def end_to_end(pipes: dict, auto: str, photo, cropper, size: int) -> dict:
    out = {}
    runs = [("original_fp32", "fp32", "original"), (f"fast_{auto}", auto, "fast"), (f"balanced_{auto}", auto,
                                                                                       "balanced")]
    for label, dtype, preset in runs:
        seconds, steps, previews = page_run(pipes[dtype], photo, cropper, preset, size)
        out[label] = {"seconds": round(seconds, 1), "progress_events": steps, "previews": previews}
        logger.info("end to end %s: %.1f s (%d progress events, %d previews)", label, seconds, steps, previews)
    base = out["original_fp32"]["seconds"]
    for label, _, _ in runs[1:]:
        out[label]["ratio_vs_original_fp32"] = round(out[label]["seconds"] / base, 3)
    out["fast_target"] = "<= 1/6 of original_fp32 and <= 90 s at 512 px"
    return out


def small(pipe, photo, cropper) -> dict:
    out = {}
    for label, preset, interval in (("fast_20_steps", "fast", None), ("dpm_20_steps_no_cache", "fast", 1)):
        plan = resolve(preset, cache_interval=interval)
        request = GenerationRequest(prompt="a photo of a woman img in a garden", images=[photo], height=256,
                                    width=256, num_inference_steps=20, scheduler=plan.scheduler,
                                    cache_interval=plan.cache_interval, seed=0)
        seconds = clock(partial(generate, pipe, request, crop_fn=lambda im, name: cropper.crop(im, name=name)))
        out[label] = round(seconds, 1)
        logger.info("256 px, 20 steps, %s: %.1f s", label, seconds)
    out["target_s"] = 25
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cache-steps", type=int, default=20, help="loop steps for the cache comparison")
    parser.add_argument("--repeats", type=int, default=2, help="timed UNet calls per variant")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, default=list(SECTIONS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("fastcomposer").setLevel(logging.ERROR)

    auto = "bf16" if pick_dtype("auto", torch.device("cpu")) == torch.bfloat16 else "fp32"
    t0 = time.perf_counter()
    pipes = {"fp32": build(args.arch, torch.float32)}
    pipes["bf16"] = build(args.arch, torch.bfloat16)
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    logger.info("built %s pipelines in %.0f s", args.arch, time.perf_counter() - t0)
    photo = PIL.Image.open(ROOT / "assets" / "astronaut.png").convert("RGB")
    cropper = FaceCropper(allow_download=False)

    result = {
        "machine": device_name(torch.device("cpu")), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "arch": args.arch, "size": args.size, "native_bf16": cpu_has_native_bf16(), "auto_dtype": auto,
    }
    if "unet_step" in args.only:
        result["unet_step"] = unet_step(pipes, args.size, args.repeats)
        result["vae_decode"] = vae_decode(pipes, args.size)
    if "cache" in args.only:
        result["cache"] = cache(pipes[auto], photo, args.size, args.cache_steps)
    if "end_to_end" in args.only:
        result["end_to_end"] = end_to_end(pipes, auto, photo, cropper, args.size)
    if "small" in args.only:
        result["small_256"] = small(pipes[auto], photo, cropper)
    result["loadavg_1min_at_end"] = round(os.getloadavg()[0], 2)
    result["cpu_count"] = os.cpu_count()
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
