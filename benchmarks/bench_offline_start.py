"""Seconds from `python app.py` to a served page on a machine that cannot reach the Hugging Face Hub.

Two starts, each in a fresh process with an empty cache, timed until the page answers:
- `as_is`: this machine as it is (here: no internet, so the Hub's name does not resolve);
- `retrying`: the same, but with an HTTPS proxy that refuses connections set, so the quick check leaves the
  verdict to huggingface_hub and its five retries (what every start did before the check: about half a minute).
Target: the page within 10 s (`as_is`). Run it where the Hub cannot be reached; elsewhere `as_is` downloads.

    python benchmarks/bench_offline_start.py --output benchmarks/results/cpu-offline-start.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_to_page(extra_env: dict, timeout_s: float = 180.0) -> dict:
    port = free_port()
    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "FASTCOMPOSER_WEIGHTS")}
        env.update(FASTCOMPOSER_CACHE=cache, HF_HOME=str(Path(cache) / "hf"), **extra_env)
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--device", "cpu"], cwd=ROOT,
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            while time.perf_counter() - start < timeout_s:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as response:
                        if response.status == 200:
                            return {"seconds_to_page": round(time.perf_counter() - start, 2)}
                except OSError:
                    time.sleep(0.2)
                if process.poll() is not None:
                    return {"error": process.stderr.read()[-500:]}
            return {"error": f"no page within {timeout_s} s"}
        finally:
            process.terminate()
            process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    report = {
        "benchmark": "bench_offline_start",
        "as_is": time_to_page({}),
        "retrying": time_to_page({"HTTPS_PROXY": f"http://127.0.0.1:{free_port()}"}),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
