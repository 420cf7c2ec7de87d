"""Start-up cost: load time and peak RSS, released `.bin` layout vs our converted folder.

SD1.5-sized networks with random weights are written in the exact layout of the released
`pytorch_model.bin` (~4.5 GB, bf16/fp32 mix) and converted with `python -m fastcomposer convert`.
Each method is then measured in a fresh process, so its peak RSS is its own:

    original        what the original code does: build the modules with random init (standing in for its
                    from_pretrained of SD1.5), torch.load the whole file (no mmap), load_state_dict (copying)
    ours_bin        load_pipeline(pytorch_model.bin, cache_converted=False): meta-device build, mmap, assign
    ours_converted  load_pipeline(converted folder): safetensors in fp32, the copy a CPU start caches

"ready" = load + touching every memory page of every weight, so lazily mapped weights are really read.
Each method runs twice. Before the first run its files are evicted from the page cache with
posix_fadvise(DONTNEED), which needs no root and affects only these files; the second run is warm.

    python benchmarks/bench_startup.py --prepare                # write the files only (~9 GB)
    python benchmarks/bench_startup.py > startup.json           # prepare if missing, then measure

The parent process never imports torch: Linux carries a process's peak RSS across fork and exec into
the child's `ru_maxrss`, so a large parent would inflate every child's figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
METHODS = ("original", "ours_bin", "ours_converted")
PAGE = 4096
logger = logging.getLogger("bench_startup")


# -- children (fresh processes) -------------------------------------------------------------------------


def _watch_rss(peak: list[int]) -> None:
    """Poll this process's RSS every 20 ms; a daemon thread, so it dies with the process."""
    import psutil

    proc = psutil.Process()
    while True:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.02)


def _load(method: str, folder: Path) -> list:
    """Load by `method`; returns the five networks."""
    import torch

    from fastcomposer.models.architecture import build_modules, bundled_architecture
    from fastcomposer.models.checkpoint import split_released_state_dict
    from fastcomposer.pipeline.loading import load_pipeline

    if method == "original":
        modules = build_modules(bundled_architecture(), empty=False)
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        parts, _ = split_released_state_dict(state)
        for name, module in modules.items():
            module.load_state_dict(parts[name], strict=True)  # copies into the fp32 random-init tensors
        return list(modules.values())
    source = folder / "pytorch_model.bin" if method == "ours_bin" else folder / "converted-fp32"
    pipe = load_pipeline(source, device="cpu", dtype="fp32", safety_checker=False, cache_converted=False)
    return [pipe.unet, pipe.vae, pipe.text_encoder, pipe.image_encoder, pipe.postfuse_module]


def child_measure(method: str, folder: Path) -> dict:
    peak = [0]
    threading.Thread(target=_watch_rss, args=(peak,), daemon=True).start()
    t0 = time.perf_counter()
    import torch

    import fastcomposer.pipeline.loading  # noqa: F401  (its imports: diffusers, transformers)

    imports = time.perf_counter() - t0
    import psutil

    # What the libraries alone hold, so the weights' share of the peak can be told apart from it.
    rss_after_imports = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    modules = _load(method, folder)
    load = time.perf_counter() - t0
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    t0 = time.perf_counter()
    # One element per 4 KiB page: every page of a memory-mapped weight is read from the file (a
    # one-element slice would read one page per tensor), without timing a full reduction.
    with torch.no_grad():
        _ = sum(float(t.reshape(-1)[:: max(1, PAGE // t.element_size())].sum()) for t in tensors)
    touch = time.perf_counter() - t0
    time.sleep(0.05)  # let the poller take a last sample
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return dict(
        imports_s=imports, load_s=load, touch_s=touch, ready_s=load + touch,
        peak_rss_bytes=max(peak[0], ru_maxrss), polled_peak_rss_bytes=peak[0], ru_maxrss_bytes=ru_maxrss,
        rss_after_imports_bytes=rss_after_imports,
        weights_bytes=sum(t.numel() * t.element_size() for t in tensors),
        dtypes=",".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors})),
    )


def child_write_checkpoint(path: Path) -> None:
    """The released layout from random SD1.5-sized modules, written atomically (tmp name, then rename)."""
    import torch

    from fastcomposer.models.architecture import build_modules, bundled_architecture
    from fastcomposer.models.testing import released_state_dict

    tmp = path.with_name(path.name + ".tmp")
    torch.save(released_state_dict(build_modules(bundled_architecture(), empty=False)), tmp)
    tmp.rename(path)


# -- parent ---------------------------------------------------------------------------------------------


def run_child(*args: str) -> str:
    out = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"child {args} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout


def size_gib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / GIB, 3)


def prepare(folder: Path) -> dict:
    """Write `pytorch_model.bin` and `converted/` unless present; returns their sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint, converted = folder / "pytorch_model.bin", folder / "converted-fp32"
    needed = (0 if checkpoint.exists() else 4.5) + (0 if (converted / "model_index.json").exists() else 4.5)
    if needed and shutil.disk_usage(folder).free / 1e9 < needed + 1:
        raise SystemExit(f"need about {needed:.0f} GB free in {folder} for the benchmark files")
    if not checkpoint.exists():
        logger.info("writing %s (SD1.5-sized random weights, released layout)", checkpoint)
        run_child("--child", "write", str(checkpoint))
    if not (converted / "model_index.json").exists():
        if converted.exists():  # the converter refuses a non-empty folder; deleting it is the user's call
            raise SystemExit(f"{converted} is incomplete (no model_index.json); delete it and run again")
        logger.info("converting to %s", converted)
        subprocess.run([sys.executable, "-m", "fastcomposer", "convert", str(checkpoint), str(converted),
                        "--dtype", "fp32"],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return {"pytorch_model.bin_gib": size_gib(checkpoint), "converted_gib": size_gib(converted)}


def evict(path: Path) -> None:
    """Drop the file's (or folder's files') clean pages from the page cache, without root."""
    for p in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure_all(folder: Path, runs: int, cold: bool) -> dict:
    sources = {"original": folder / "pytorch_model.bin", "ours_bin": folder / "pytorch_model.bin",
               "ours_converted": folder / "converted-fp32"}
    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    for k in range(runs):
        for method in METHODS:
            if cold and k == 0:
                evict(sources[method])
            logger.info("run %d: %s", k + 1, method)
            results[method].append(json.loads(run_child("--child", method, str(folder)).splitlines()[-1]))
            logger.info("  ready in %.1f s, peak RSS %.2f GiB", results[method][-1]["ready_s"],
                        results[method][-1]["peak_rss_bytes"] / GIB)
    return results


def summarise(files: dict, results: dict[str, list[dict]], cold: bool) -> dict:
    weights = results["ours_converted"][0]["weights_bytes"]
    runs = len(results["original"])
    labels = ["first", "second", *[f"run{k + 1}" for k in range(2, runs)]][:runs]

    def rounded(r: dict) -> dict:  # *_bytes -> *_gib, seconds to 0.01
        return {(k.removesuffix("_bytes") + "_gib" if k.endswith("_bytes") else k):
                (round(v / GIB, 3) if k.endswith("_bytes") else round(v, 2) if isinstance(v, float) else v)
                for k, v in r.items()}

    def peak(m: str, minus_imports: bool = False) -> float:
        return max(r["peak_rss_bytes"] - (r["rss_after_imports_bytes"] if minus_imports else 0) for r in results[m])

    def ratio(key: str, k: int) -> float:
        return round(results["original"][k][key] / results["ours_converted"][k][key], 2)

    return {
        "cpu": _cpu_name(), "cores": os.cpu_count(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "torch": version("torch"), "diffusers": version("diffusers"), "transformers": version("transformers"),
        "files": files, "weights_fp32_gib": round(weights / GIB, 3),
        "first_run_cache": "files evicted from the page cache (posix_fadvise DONTNEED)" if cold
        else "not evicted: the first run may find the files cached by earlier runs",
        "second_run_cache": "warm (files read by the first runs)",
        "runs": {m: dict(zip(labels, map(rounded, rs))) for m, rs in results.items()},
        "ready_original_over_converted": {labels[k]: ratio("ready_s", k) for k in range(runs)},
        "load_original_over_converted": {labels[k]: ratio("load_s", k) for k in range(runs)},
        "peak_rss_over_weights": {m: round(peak(m) / weights, 2) for m in METHODS},
        # Diagnostic: the peak less what the process held after importing torch/diffusers/transformers.
        "peak_rss_minus_imports_over_weights": {m: round(peak(m, minus_imports=True) / weights, 2) for m in METHODS},
        "targets": {"ready_original_over_converted": ">= 3", "peak_rss_over_weights": "<= 1.2"},
    }


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/fastcomposer-bench"),
                        help="where the ~9 GB of benchmark files go (default /tmp/fastcomposer-bench)")
    parser.add_argument("--prepare", action="store_true", help="only write the files and print their sizes")
    parser.add_argument("--runs", type=int, default=2, help="runs per method")
    parser.add_argument("--no-evict", action="store_true", help="do not evict the files before the first runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one measurement in this process
    parser.add_argument("target", nargs="?", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.child:
        sys.path.insert(0, str(ROOT))
        if args.child == "write":
            child_write_checkpoint(args.target)
        else:
            json.dump(child_measure(args.child, args.target), sys.stdout)
        return
    files = prepare(args.dir)
    result = files if args.prepare else summarise(files, measure_all(args.dir, args.runs, not args.no_evict),
                                                  not args.no_evict)
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
