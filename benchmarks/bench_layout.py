"""Layout boxes and separation: does each subject's attention stay in its box, and what does it cost per UNet step?

Random weights measure the mechanism, not the looks. With two boxes (the left and right halves):
- share: each subject's captured cross-attention inside its own box over its total, at every captured layer
  (on the layer's own grid: 32x32 and 16x16 at 512 px), the worst over layers, images and subjects. Target >= 0.95;
- leakage: a subject's share inside the other subject's box, the worst. Target <= 0.02;
- the same two figures without boxes, for comparison;
- cost: the median seconds per loop iteration (one UNet pass with guidance, one sampler step) with boxes, with
  separation, and with the self-attention masks extended to the 64x64 layers, each over a plain run's, all in one
  process, runs interleaved so drift hits all alike. Target <= 1.10.

    python benchmarks/bench_layout.py --arch tiny                  # seconds: the tiny model at 128 px
    python benchmarks/bench_layout.py --output benchmarks/results/cpu-layout-512.json   # SD1.5-sized, 512 px
    python benchmarks/bench_layout.py --device cuda                # fp16 on a GPU (add --compile for compiled)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import PIL.Image
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere

from benchmarks.bench_pipeline import device_name  # noqa: E402
from fastcomposer.models.architecture import build_modules, bundled_architecture, tiny_architecture  # noqa: E402
from fastcomposer.pipeline.layout import box_cells  # noqa: E402
from fastcomposer.pipeline.loading import assemble, cast, compile_unet, pick_device, use_memory_format  # noqa: E402

PROMPT = "a man img and a woman img sitting in a park"  # mmagic's hard case: two people of the same kind
HALVES = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]


def build(arch_name: str, device: torch.device, dtype: torch.dtype, compiled: bool):
    arch = tiny_architecture() if arch_name == "tiny" else bundled_architecture()
    pipe = cast(assemble(build_modules(arch, empty=False), arch, "dpm"), dtype).to(device)
    use_memory_format(pipe, device, dtype)
    if compiled:
        compile_unet(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def shares(attention, boxes) -> dict:
    """Per captured layer: the worst own-box share and the worst leakage into the other box."""
    per_layer = {}
    for layer, maps in attention.layer_maps.items():  # (n, k, h, w)
        grid = tuple(maps.shape[-2:])
        cells = torch.stack([box_cells(box, grid) for box in boxes])  # (k, h, w)
        total = maps.sum(dim=(-2, -1))  # (n, k)
        inside = torch.einsum("nkhw,jhw->nkj", maps, cells.float())  # (n, subject k, box j)
        share = inside / total[..., None]
        k = len(boxes)
        own = min(float(share[:, s, s].min()) for s in range(k))
        leak = max(float(share[:, s, j].max()) for s in range(k) for j in range(k) if j != s)
        per_layer[layer.removesuffix(".processor")] = {"share": round(own, 4), "leakage": round(leak, 4)}
    return {"worst_share": min(v["share"] for v in per_layer.values()),
            "worst_leakage": max(v["leakage"] for v in per_layer.values()), "layers": per_layer}


def run(pipe, photos, size: int, steps: int, **kw) -> tuple[list[float], object]:
    """One call; the seconds of each loop iteration (from the step callbacks) and the output."""
    stamps = [time.perf_counter()]

    def tick(p, i, t, tensors):
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return tensors

    out = pipe(PROMPT, photos, num_inference_steps=steps, height=size, width=size, output_type="latent",
               generator=torch.Generator().manual_seed(0), callback_on_step_end=tick, **kw)
    return [b - a for a, b in zip(stamps, stamps[1:])], out


def with_config(pipe, **changes):
    """The pipeline's layout plans with other `LayoutConfig` values (for the 64x64 self-attention variant)."""
    original = type(pipe).prepare_layout

    def prepare(parsed, boxes, separate):
        plan = original(pipe, parsed, boxes, separate)
        return plan if plan is None else dataclasses.replace(plan, config=dataclasses.replace(plan.config, **changes))

    return prepare


def measure_cost(pipe, photos, size: int, steps: int, rounds: int) -> dict:
    variants = {
        "plain": {},
        "boxes": {"boxes": HALVES},
        "separate": {"separate": True},
        "boxes_self_64": {"boxes": HALVES},
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, kw in variants.items():  # warm-up (and compilation) for each
        pipe.prepare_layout = with_config(pipe, self_factors=(1, 2, 4)) if name == "boxes_self_64" else \
            type(pipe).prepare_layout.__get__(pipe)
        run(pipe, photos, size, 2, **kw)
    for _ in range(rounds):
        for name, kw in variants.items():
            pipe.prepare_layout = with_config(pipe, self_factors=(1, 2, 4)) if name == "boxes_self_64" else \
                type(pipe).prepare_layout.__get__(pipe)
            step_times, _ = run(pipe, photos, size, steps, **kw)
            times[name] += step_times[1:]  # the first iteration also holds the prompt and photo encoding
    del pipe.prepare_layout
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "seconds_per_step": {name: round(v, 4) for name, v in median.items()},
        "ratio_boxes": round(median["boxes"] / median["plain"], 3),
        "ratio_separate": round(median["separate"] / median["plain"], 3),
        "ratio_boxes_with_64x64_self_masks": round(median["boxes_self_64"] / median["plain"], 3),
        "steps_timed_per_variant": len(times["plain"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="compile the UNet (CUDA)")
    parser.add_argument("--size", type=int, default=None, help="image side (default 512; tiny 128)")
    parser.add_argument("--steps", type=int, default=4, help="loop iterations per timed run")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs per variant, interleaved")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args()

    device = pick_device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16 if args.arch == "sd15" else torch.float32
    size = args.size or (128 if args.arch == "tiny" else 512)
    torch.manual_seed(0)
    pipe = build(args.arch, device, dtype, args.compile)
    photos = [PIL.Image.open(ROOT / "assets" / name).convert("RGB") for name in ("grace_hopper.jpg", "astronaut.png")]

    _, free = run(pipe, photos, size, args.steps, return_attention=True)
    _, boxed = run(pipe, photos, size, args.steps, return_attention=True, boxes=HALVES)
    report = {
        "benchmark": "bench_layout",
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "arch": args.arch,
        "size": size,
        "sampler": "dpm",
        "prompt": PROMPT,
        "boxes": HALVES,
        "with_boxes": shares(boxed.attention, HALVES),
        "without_boxes": shares(free.attention, HALVES),
        "cost": measure_cost(pipe, photos, size, args.steps, args.rounds),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
