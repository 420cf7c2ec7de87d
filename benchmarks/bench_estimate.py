"""Is the time left on the progress bar honest? One *fast* run at 512 px, as the page runs it, on this machine.

The run (SD1.5-sized random weights, bf16 on a CPU, DPM++ 20 steps with feature caching, previews on) streams its
step events; at each step the page's clock (`generation/time_left.py`, starting from a fresh estimator as on a new
server) says how long is left, and the run's own end says how long actually was. The figure: the worst ratio of
stated to actual time left from the third step on (target: between 0.67 and 1.5), beside what the old rule (the
average iteration so far times the iterations left, no decode) said. The event stream is also written to
tests/fixtures, where `tests/test_time_left.py` replays it.

    python benchmarks/bench_estimate.py --output benchmarks/results/cpu-estimate-fast-512.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import PIL.Image
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere

from benchmarks.bench_layout import build  # noqa: E402
from benchmarks.bench_pipeline import device_name  # noqa: E402
from fastcomposer.generation.estimate import Estimator, Hardware, Workload  # noqa: E402
from fastcomposer.generation.request import GenerationRequest  # noqa: E402
from fastcomposer.generation.streaming import ResultEvent, StepEvent, stream_generation  # noqa: E402
from fastcomposer.generation.time_left import RunClock  # noqa: E402
from fastcomposer.pipeline.presets import PRESETS  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "events-fast-512-cpu.json"


def replay(recording: dict, estimator: Estimator) -> list[dict]:
    """At each step of a recorded run: the clock's time left, the old rule's, and what actually remained."""
    work = Workload(**{**recording["workload"], "schedule": tuple(recording["workload"]["schedule"])})
    clock = RunClock(estimator, work)
    end = recording["end"]
    rows = []
    for done, elapsed in recording["steps"]:
        clock.step(done, elapsed)
        first_done, first_elapsed = recording["steps"][0]
        per_step = (elapsed - first_elapsed) / (done - first_done) if done > first_done else None
        rows.append({"step": done, "elapsed": round(elapsed, 3), "actual_left": round(end - elapsed, 3),
                     "stated_left": round(clock.seconds_left(done), 3),
                     "old_rule_left": None if per_step is None else round(per_step * (work.iterations - done), 3)})
    return rows


def worst(rows: list[dict], key: str, from_step: int = 3) -> tuple[float, float]:
    ratios = [r[key] / r["actual_left"] for r in rows if r["step"] >= from_step and r[key] is not None
              and r["actual_left"] > 0]
    return round(min(ratios), 3), round(max(ratios), 3)


def record_run(size: int) -> dict:
    preset = PRESETS["fast"]
    torch.manual_seed(0)
    pipe = build("sd15", torch.device("cpu"), torch.bfloat16, False)
    photo = PIL.Image.open(ROOT / "assets" / "astronaut.png").convert("RGB")
    request = GenerationRequest(prompt="a woman img reading in a garden", images=[photo], face_crop=False,
                                num_inference_steps=preset.num_inference_steps, scheduler=preset.scheduler,
                                cache_interval=preset.cache_interval, height=size, width=size, seed=1)
    steps, end = [], None
    start = time.perf_counter()
    for event in stream_generation(pipe, request, previews=True):  # as the page runs it
        if isinstance(event, StepEvent):
            steps.append([event.done, event.elapsed])
        elif isinstance(event, ResultEvent):
            end = event.elapsed
    work = Workload.of(preset.scheduler, preset.num_inference_steps, preset.cache_interval, size, size)
    return {"device": device_name(torch.device("cpu")), "threads": torch.get_num_threads(), "dtype": "bf16",
            "wall_seconds": round(time.perf_counter() - start, 3), "steps": steps, "end": end,
            "workload": {**work.__dict__, "schedule": list(work.schedule)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--output", default=None, help="also write the report here")
    parser.add_argument("--replay", action="store_true", help="replay the recorded fixture instead of running")
    args = parser.parse_args()
    if args.replay:
        recording = json.loads(FIXTURE.read_text())
    else:
        recording = record_run(args.size)
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        FIXTURE.write_text(json.dumps(recording, indent=1) + "\n")
    rows = replay(recording, Estimator(Hardware("cpu", "bf16", recording["threads"])))
    report = {"benchmark": "bench_estimate", "device": recording["device"], "threads": recording["threads"],
              "preset": "fast", "size": args.size, "run_seconds": recording["end"],
              "worst_ratio_from_step_3": worst(rows, "stated_left"),
              "old_rule_worst_ratio_from_step_3": worst(rows, "old_rule_left"), "steps": rows}
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
