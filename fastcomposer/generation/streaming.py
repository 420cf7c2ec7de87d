"""A generation as a stream of events: steps, previews, then the result. Closing the stream stops the run.

    >>> for event in stream_generation(pipe, request):
    ...     if isinstance(event, StepEvent):
    ...         print(f"{event.done}/{event.total}")
    ...     elif isinstance(event, ResultEvent):
    ...         images = event.result.images

`generate` reports through callbacks from inside the denoising loop; a web server (or a worker process
that sends values back one by one, as ZeroGPU's does) wants an iterator instead. So the run goes to a
thread, its callbacks put events on a queue, and the iterator hands them out as they come. Every event
is a small dataclass of numbers and PIL images, so it pickles. Closing the iterator early (`break`,
`close()`, garbage collection) sets the run's stop flag and waits for the thread: the pipeline ends after
its current step and nothing keeps running in the background.

`stream_sweep` does the same for an alpha sweep (`sweep.alpha_sweep`): a `RunEvent` before each alpha, then
that run's events, its `ResultEvent` included, so each finished cell reaches the caller as soon as it exists
(a sweep stopped at its third alpha still has its first two).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, replace

import PIL.Image

from ..config import SETTINGS, Limits
from .request import seed_of
from .run import GenerationRequest, GenerationResult, generate
from .sweep import parse_alphas


@dataclass
class StepEvent:
    """One denoising iteration finished."""

    done: int  # iterations finished
    total: int  # iterations planned
    elapsed: float  # seconds since the stream started, on the clock of the process that ran it
    stage: str = ""  # "" for the main run; "image 1 · face 2/3" for the face pass's steps


@dataclass
class PreviewEvent:
    """What the images look like so far (cheap latent previews, see previews.py)."""

    done: int
    total: int
    images: list[PIL.Image.Image]


@dataclass
class ResultEvent:
    """The run ended: with images, or `result.interrupted` when it was stopped."""

    result: GenerationResult
    elapsed: float = 0.0  # seconds since the stream started, as `StepEvent.elapsed`


@dataclass
class RunEvent:
    """A sweep's run `index` (0-based) of `total` starts, at `alpha`."""

    index: int
    total: int
    alpha: float


Event = StepEvent | PreviewEvent | ResultEvent | RunEvent


@dataclass
class _Failure:
    error: BaseException


_END = object()


def stream_generation(
    pipe,
    request: GenerationRequest,
    *,
    subjects: Sequence | None = None,
    limits: Limits = SETTINGS.limits,
    previews: bool = True,
) -> Iterator[Event]:
    """Run `generation.generate` in a thread and yield its progress as events.

    Args:
        pipe: a loaded [`FastComposerPipeline`]; one stream at a time per pipeline.
        request: the user's settings.
        subjects: prepared encoder inputs, as for `generate`.
        limits: the bounds `generate` checks.
        previews: also yield a `PreviewEvent` every `generation.PREVIEW_EVERY` iterations.

    Yields:
        `StepEvent`s and `PreviewEvent`s while the loop runs, then one `ResultEvent`.

    Raises:
        Whatever `generate` raises (`GenerationError` for bad requests and out-of-memory), in the caller's thread.
    """
    events: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    start = time.monotonic()

    def on_step(done: int, total: int) -> None:
        events.put(StepEvent(done, total, time.monotonic() - start))

    def on_stage(stage: str, done: int, total: int) -> None:
        events.put(StepEvent(done, total, time.monotonic() - start, stage))

    def on_preview(done: int, total: int, images: list[PIL.Image.Image]) -> None:
        events.put(PreviewEvent(done, total, images))

    def run() -> None:
        try:
            result = generate(pipe, request, subjects=subjects, on_step=on_step,
                              on_preview=on_preview if previews else None, stop=stop, limits=limits, on_stage=on_stage)
            events.put(ResultEvent(result, time.monotonic() - start))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            events.put(_Failure(e))
        finally:
            events.put(_END)

    thread = threading.Thread(target=run, name="fastcomposer-generate", daemon=True)
    thread.start()
    try:
        while (item := events.get()) is not _END:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()  # a consumer that left early: end the run after the current step
        thread.join()


def stream_sweep(
    pipe,
    request: GenerationRequest,
    alphas: Sequence[float],
    *,
    subjects: Sequence | None = None,
    limits: Limits = SETTINGS.limits,
    previews: bool = True,
) -> Iterator[Event]:
    """`sweep.alpha_sweep` as a stream: one seed (drawn once when the request's is -1), one run per alpha.

    Each run is `stream_generation` of the request with only alpha and the seed replaced, so each cell is the
    image a single run at that alpha gives (the same as `alpha_sweep`). Closing the stream stops the current run
    and starts no other; a run that ends interrupted ends the sweep.

    Yields:
        Per alpha, a `RunEvent`, then that run's `StepEvent`s, `PreviewEvent`s and its `ResultEvent`.

    Raises:
        ValueError: `alphas` is not a valid sweep (`sweep.parse_alphas`). Otherwise what `generate` raises.
    """
    alphas = parse_alphas(alphas)
    seed = seed_of(request.seed, limits)
    for k, alpha in enumerate(alphas):
        yield RunEvent(k, len(alphas), alpha)
        run = replace(request, alpha=alpha, seed=seed)
        with closing(stream_generation(pipe, run, subjects=subjects, limits=limits, previews=previews)) as events:
            for event in events:
                yield event
                if isinstance(event, ResultEvent) and event.result.interrupted:
                    return
