"""The progress bar's time left (generation/time_left.py): against a recorded run, and against its formula."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastcomposer.generation.estimate import Estimator, Hardware, Workload
from fastcomposer.generation.time_left import RunClock

# A *fast* run at 512 px on SD1.5-sized random weights, bf16, on this project's 2-core CPU, recorded by
# `benchmarks/bench_estimate.py` through the same event stream the page reads.
RECORDING = json.loads((Path(__file__).parent / "fixtures" / "events-fast-512-cpu.json").read_text())


def recorded_work() -> Workload:
    return Workload(**{**RECORDING["workload"], "schedule": tuple(RECORDING["workload"]["schedule"])})


def test_the_stated_time_left_stays_within_a_third_of_what_remained():
    """From the third step on, stated / actual time left is between 0.67 and 1.5, on a fresh estimator (a new
    server: nothing learnt yet)."""
    clock = RunClock(Estimator(Hardware("cpu", "bf16", RECORDING["threads"])), recorded_work())
    end = RECORDING["end"]
    ratios = {}
    for done, elapsed in RECORDING["steps"]:
        clock.step(done, elapsed)
        if done >= 3:
            ratios[done] = clock.seconds_left() / (end - elapsed)
    assert ratios and all(0.67 <= r <= 1.5 for r in ratios.values()), ratios
    # the rule it replaces (the average iteration so far times the iterations left, no decode) was far off
    (first_done, first_elapsed), (done, elapsed) = RECORDING["steps"][0], RECORDING["steps"][2]
    old = (elapsed - first_elapsed) / (done - first_done) * (RECORDING["workload"]["iterations"] - done)
    assert old / (end - elapsed) < 0.5


def test_the_clock_prices_each_kind_of_iteration_by_this_runs_own():
    work = Workload.of("dpm", 10, 3, alpha=0.7)  # full at 0, 3, then 4 (the switch), 7
    assert [i for i in range(10) if work.is_full(i)] == [0, 3, 4, 7]
    estimator = Estimator(Hardware("cpu", "bf16", 2))
    clock = RunClock(estimator, work)
    # written out: iteration 0 ends at 5.0 (encoders included: not a price); 1, 2 cached (0.5 s); 3, 4 full (4 s)
    for done, elapsed in [(1, 5.0), (2, 5.5), (3, 6.0), (4, 10.0), (5, 14.0)]:
        clock.step(done, elapsed)
    full, cached = clock.durations()
    assert full == [4.0, 4.0] and cached == [0.5, 0.5]
    tail = estimator.tail_seconds(work) * 4.0 / estimator.full_step_seconds(work)
    left = 0.5 + 0.5 + 4.0 + 0.5 + 0.5 + tail  # iterations 5, 6, 7 (full), 8, 9, then the tail
    assert clock.seconds_left() == pytest.approx(left)
    assert clock.run_seconds() == pytest.approx(5.0 + 0.5 + 0.5 + 4.0 + 4.0 + 0.5 + 0.5 + 4.0 + 0.5 + 0.5 + tail)


def test_before_any_measurement_the_estimator_prices_the_schedule():
    work = Workload.of("dpm", 20, 3)
    estimator = Estimator(Hardware("cpu", "bf16", 2))
    clock = RunClock(estimator, work)
    full = estimator.full_step_seconds(work)
    want = sum(full if work.is_full(i) else full * estimator.cached_ratio for i in range(20))
    assert clock.seconds_left(0) == pytest.approx(want + estimator.tail_seconds(work))
    clock.step(1, 3.0)
    clock.step(2, 3.5)  # one cached iteration of 0.5 s: a full one is priced at 0.5 / the cached ratio
    full_s, cached_s, _ = clock.costs()
    assert cached_s == pytest.approx(0.5) and full_s == pytest.approx(0.5 / estimator.cached_ratio)


def test_a_finished_run_teaches_the_estimator_its_costs_and_the_estimates_follow():
    work = recorded_work()
    estimator = Estimator(Hardware("cpu", "bf16", RECORDING["threads"]))
    before = estimator.seconds(work)
    clock = RunClock(estimator, work)
    for done, elapsed in RECORDING["steps"]:
        clock.step(done, elapsed)
    full_s, cached_s, _ = clock.costs()
    clock.finish(RECORDING["end"])
    assert estimator.runs == 1
    assert estimator.full_step_seconds(work) == pytest.approx(full_s)  # the first run replaces the constants
    assert estimator.cached_ratio == pytest.approx(cached_s / full_s)
    tail = RECORDING["end"] - RECORDING["steps"][-1][1]
    assert estimator.tail_seconds(work) == pytest.approx(tail)
    # the "about N s per image" line and ZeroGPU's reservation use the same model
    loop = sum(full_s if work.is_full(i) else cached_s for i in range(work.iterations))
    photos = estimator.speed * estimator.model.encode_photo * work.photos
    assert estimator.seconds(work) == pytest.approx(photos + loop + tail)
    assert abs(estimator.seconds(work) - RECORDING["end"]) < abs(before - RECORDING["end"]) or \
        abs(estimator.seconds(work) - RECORDING["end"]) / RECORDING["end"] < 0.15
