"""The command line end to end, load included: `--preset fast` against the default of before presets.

Each run is a fresh `python -m fastcomposer generate` process on SD1.5-sized random weights in a converted
folder (written by `bench_startup.py --prepare`), timed from process start to exit, one after another in
this script's run:

    before      --dtype fp32            the default before presets and auto-bf16 (PNDM, 50 steps, fp32)
    best_flags  --dtype bf16 --scheduler dpm --steps 20    the fastest flags that existed before
    fast        --preset fast           (auto dtype: bf16 on CPUs with native bf16)

    python benchmarks/bench_startup.py --prepare     # once: /tmp/fastcomposer-bench/converted-fp32
    python benchmarks/bench_cli.py                   # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "before": ["--dtype", "fp32"],
    "best_flags": ["--dtype", "bf16", "--scheduler", "dpm", "--steps", "20"],
    "fast": ["--preset", "fast"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="/tmp/fastcomposer-bench/converted-fp32", help="a converted folder")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--only", nargs="*", choices=list(RUNS), default=list(RUNS))
    args = parser.parse_args()
    if not (Path(args.weights) / "model_index.json").is_file():
        sys.exit(f"{args.weights} is not a converted folder: run benchmarks/bench_startup.py --prepare first")

    result: dict = {"size": args.size, "weights": "SD1.5-sized random weights (converted folder, fp32)"}
    with tempfile.TemporaryDirectory() as out:
        for name in args.only:
            command = [sys.executable, "-m", "fastcomposer", "generate", "--prompt", "a photo of a woman img hiking",
                       "--image", str(ROOT / "assets" / "astronaut.png"), "--output", f"{out}/{name}.png",
                       "--weights", args.weights, "--no-safety-checker", "--device", "cpu", "--seed", "0",
                       "--height", str(args.size), "--width", str(args.size), *RUNS[name]]
            env = {**os.environ, "FASTCOMPOSER_FACE_DETECTOR": "opencv", "HF_HUB_OFFLINE": "1"}
            start = time.perf_counter()
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                sys.exit(f"{name} failed: {done.stderr.strip()}")
            result[name] = {"flags": " ".join(RUNS[name]), "seconds": round(seconds, 1)}
            print(f"{name}: {seconds:.1f} s", file=sys.stderr)
    if "before" in result:
        for name in ("best_flags", "fast"):
            if name in result:
                result[name]["speedup_vs_before"] = round(result["before"]["seconds"] / result[name]["seconds"], 2)
    result["fast_target"] = ">= 5x faster than before"
    result["loadavg_1min_at_end"] = round(os.getloadavg()[0], 2)
    result["cpu_count"] = os.cpu_count()
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
