"""How long a running generation has left: what it will still do, priced by what it has done.

A run's iterations are not alike. With feature caching most are shallow passes that cost about a tenth of the
full ones, which come every N-th iteration, at the start and at the subject switch; and after the loop the VAE
decode (seconds on a CPU) still has to run. Averaging the iterations so far and multiplying by the ones left is
wrong by a factor of three to four on the *fast* preset. So `RunClock` knows the schedule in advance
(`Workload.schedule`), measures this run's own full and cached iterations as they come, and adds the tail after
the loop, each priced as:

- a full iteration: the mean of this run's full iterations so far (iteration 0 is left out: its time also holds
  the text and photo encoding); before the first, this machine's earlier runs (`Estimator`), else the constants;
- a cached one: likewise, or a full one times this machine's cached/full ratio;
- the tail (decode, safety checker, PNGs): the estimator's, scaled by how this run's full iterations compare with
  the estimator's expectation (a machine twice as busy decodes twice as slowly).

When the run ends, `finish` hands the measured costs to the estimator, so the next run starts closer.
"""

from __future__ import annotations

import statistics

from .estimate import Estimator, Workload


class RunClock:
    """The time left of one run, from its step events (`done` iterations finished at `elapsed` seconds)."""

    def __init__(self, estimator: Estimator, work: Workload):
        self.estimator, self.work = estimator, work
        self.stamps: dict[int, float] = {}  # iterations done -> elapsed seconds when they were

    def step(self, done: int, elapsed: float) -> None:
        self.stamps[done] = elapsed

    def durations(self) -> tuple[list[float], list[float]]:
        """This run's measured (full, cached) iteration times, iteration 0 left out."""
        full, cached = [], []
        for done, elapsed in self.stamps.items():
            if not isinstance(done, int):  # the face pass's stamps
                continue
            before = self.stamps.get(done - 1)
            if done >= 2 and before is not None:  # iteration done-1 ran between the two events
                (full if self.work.is_full(done - 1) else cached).append(elapsed - before)
        return full, cached

    def costs(self) -> tuple[float, float, float]:
        """The price of a full iteration, a cached one and the tail, in seconds."""
        model_full = self.estimator.full_step_seconds(self.work)
        ratio = self.estimator.cached_ratio
        full, cached = self.durations()
        full_s = statistics.mean(full) if full else statistics.mean(cached) / ratio if cached else model_full
        cached_s = statistics.mean(cached) if cached else full_s * ratio
        tail_s = self.estimator.tail_seconds(self.work) * (full_s / model_full if model_full > 0 else 1.0)
        return full_s, cached_s, tail_s

    def seconds_left(self, done: int | None = None) -> float:
        """The loop's remaining iterations and the tail after it (`done`: the last step reported, by default)."""
        done = max((d for d in self.stamps if isinstance(d, int)), default=0) if done is None else done
        full_s, cached_s, tail_s = self.costs()
        loop = sum(full_s if self.work.is_full(i) else cached_s for i in range(done, self.work.iterations))
        return loop + tail_s

    def run_seconds(self) -> float:
        """A whole run like this one, at this run's prices (for the runs of a sweep still to come)."""
        full_s, cached_s, tail_s = self.costs()
        first = self.stamps.get(1, full_s)  # iteration 0 with the encoders before it
        rest = sum(full_s if self.work.is_full(i) else cached_s for i in range(1, self.work.iterations))
        return first + rest + tail_s

    def face_seconds_left(self, stage: str, done: int, elapsed: float) -> float:
        """In the face pass ("image 1 · face 2/3", step `done`): this face's steps left and the faces after it,
        priced by this face's own steps once there are two, else by the estimator."""
        face_s = self.estimator.face_seconds(self.work) / max(1, self.work.face_steps)
        previous = self.stamps.get((stage, done - 1))
        self.stamps[(stage, done)] = elapsed
        if previous is not None:
            face_s = elapsed - previous
        image, _, face = stage.partition(" · ")
        position, _, count = face.removeprefix("face ").partition("/")
        images_left = self.work.num_images - int(image.removeprefix("image ") or 1)
        per_image = self.work.faces // max(1, self.work.num_images)
        faces_left = int(count or 1) - int(position or 1) + images_left * per_image
        steps = max(1, self.work.face_steps)
        return (steps - done) * face_s + faces_left * steps * face_s

    def finish(self, elapsed: float) -> None:
        """The run ended at `elapsed`: tell the estimator what its iterations and its tail cost here."""
        full, cached = self.durations()
        last = self.stamps.get(self.work.iterations)
        tail = elapsed - last if last is not None and elapsed > last else None
        if full or cached:
            full_s, cached_s, _ = self.costs()
            self.estimator.observe_run(self.work, full_s if full else None, cached_s if cached else None, tail)
