"""Start-up cost: load time and peak memory, released `.bin` layout vs our converted folder.

Full SD1.5-sized networks with random weights, written in the exact layout of the released
`pytorch_model.bin` (4.5 GB, bf16/fp32 mix), then converted with `python -m fastcomposer convert`.
Each method runs in a fresh process so its peak RSS is its own:

    original        what the original code does: build the modules with random init, torch.load the
                    whole file, load_state_dict (copying), as fp32
    ours_bin        load_pipeline(pytorch_model.bin): meta-device build, memory-mapped load, assign
    ours_converted  load_pipeline(converted folder): safetensors, memory-mapped

    python benchmarks/bench_loading.py --dir /tmp/fastcomposer-bench > loading.json
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench_loading")

CHILD = r"""
import json, sys, threading, time
import psutil
sys.path.insert(0, {root!r})
peak = [0]
def watch():
    proc = psutil.Process()
    while True:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.02)
threading.Thread(target=watch, daemon=True).start()
t0 = time.perf_counter()
import torch
from fastcomposer.architecture import build_modules, bundled_architecture
from fastcomposer.loader import load_pipeline
imports = time.perf_counter() - t0
time.sleep(0.05)
base_rss = psutil.Process().memory_info().rss  # interpreter + torch + diffusers, before any weight
method, path = {method!r}, {path!r}
t0 = time.perf_counter()
if method == "original":
    from fastcomposer.checkpoint import split_released_state_dict
    modules = build_modules(bundled_architecture(), empty=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    parts, _ = split_released_state_dict(state)
    for name, module in modules.items():
        module.load_state_dict(parts[name], strict=True)
    del state, parts
    params = [p for m in modules.values() for p in m.parameters()]
else:
    pipe = load_pipeline(path, device="cpu", dtype="fp32", safety_checker=False, cache_converted=False)
    params = [p for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.image_encoder, pipe.postfuse_module)
              for p in m.parameters()]
load = time.perf_counter() - t0
t1 = time.perf_counter()
total = sum(float(p.sum()) for p in params)  # read every weight once: mmapped pages are really loaded
touch = time.perf_counter() - t1
weights = sum(p.numel() * p.element_size() for p in params)
time.sleep(0.05)
rss = peak[0]  # polled: ru_maxrss would include the parent's peak, which Linux carries across fork and exec
print(json.dumps(dict(imports_s=imports, load_s=load, touch_s=touch, ready_s=load + touch, peak_rss=rss,
                      base_rss=base_rss, weights_bytes=weights)))
"""


def prepare(folder: Path) -> None:
    """Write the released-layout checkpoint and its converted folder (skipped when present)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from fastcomposer.architecture import build_modules, bundled_architecture
    from fastcomposer.testing import released_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "pytorch_model.bin"
    if not checkpoint.exists():
        logger.info("building SD1.5-sized random modules and writing %s", checkpoint)
        torch.save(released_state_dict(build_modules(bundled_architecture(), empty=False)), checkpoint)
    converted = folder / "converted"
    if not (converted / "model_index.json").exists():
        logger.info("converting to %s", converted)
        subprocess.run([sys.executable, "-m", "fastcomposer", "convert", str(checkpoint), str(converted)],
                       cwd=ROOT, check=True)


def measure(method: str, path: Path) -> dict:
    code = CHILD.format(root=str(ROOT), method=method, path=str(path))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/fastcomposer-bench"))
    parser.add_argument("--runs", type=int, default=2, help="runs per method (the first reads a cold-ish cache)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    prepare(args.dir)
    sources = {"original": args.dir / "pytorch_model.bin", "ours_bin": args.dir / "pytorch_model.bin",
               "ours_converted": args.dir / "converted"}
    runs: dict[str, list[dict]] = {}
    for _ in range(args.runs):
        for method, path in sources.items():
            logger.info("measuring %s", method)
            runs.setdefault(method, []).append(measure(method, path))
    best = {m: min(r, key=lambda x: x["ready_s"]) for m, r in runs.items()}
    weights = best["ours_converted"]["weights_bytes"]
    gib = 2**30
    result = {
        "checkpoint_gib": round((args.dir / "pytorch_model.bin").stat().st_size / gib, 2),
        "weights_fp32_gib": round(weights / gib, 2),
        "runs": {m: [{k: round(v / gib, 2) if k.endswith(("rss", "bytes")) else round(v, 2) for k, v in r.items()}
                     for r in rs] for m, rs in runs.items()},
        "ready_s_best": {m: round(b["ready_s"], 2) for m, b in best.items()},
        "peak_rss_over_weights": {m: round(b["peak_rss"] / weights, 2) for m, b in best.items()},
        # the same without the ~0.7 GiB that importing torch, transformers and diffusers costs before any weight
        "peak_rss_above_imports_over_weights": {
            m: round((b["peak_rss"] - b["base_rss"]) / weights, 2) for m, b in best.items()
        },
        "speedup_converted_vs_original": round(best["original"]["ready_s"] / best["ours_converted"]["ready_s"], 2),
        "speedup_converted_vs_ours_bin": round(best["ours_bin"]["ready_s"] / best["ours_converted"]["ready_s"], 2),
    }
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
