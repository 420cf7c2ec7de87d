"""Where the pipeline runs: in this process, or on a ZeroGPU worker (`spaces.GPU`), through one code path.

ZeroGPU (the `spaces` package, 0.51) runs a decorated function in a process forked from this one and
sends its arguments and results pickled (spaces/zero/wrappers.py). What follows from its source:

- The decorated function, `run_generation`, takes only small picklable values: a key, the request with
  its prepared photos, LoRA specs, and the alphas of a sweep. It finds the pipeline in module state
  (`ENGINES`), filled at start-up in the main process, which the fork inherits; a pipeline or a closure
  among the arguments would be pickled (or fail to be) on every call.
- It is a generator. spaces' `generator_function_wrapper` sends each yielded value to the main process
  as it comes, so steps, previews and the result stream back. Its `gr.Progress` forwarding (the patched
  `Queue.set_progress`) is meant for plain functions, and its own source marks it "not working properly"
  for generators; so the progress bar is drawn in the main process, from the yielded steps.
- Closing it is Stop. On the main side's GeneratorExit spaces sets the worker's stop event, and the worker
  closes our generator after its next yield; closing `stream_generation` stops the pipeline after the
  current step. Steps come every iteration, so a stop lands within a step or two.
- Errors come back as values (`Failed`): spaces turns every exception but `gr.Error` into a bare
  "ZeroGPU worker error", and a library's exceptions should not depend on Gradio.
- `duration` is a callable: spaces calls it with the same arguments to reserve GPU time per call.

Without `spaces` (anywhere but a Space) the same generator runs in this process, unchanged.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..config import DETAIL, Limits
from ..generation.estimate import Estimator, Workload

logger = logging.getLogger(__name__)

# spaces 0.51 itself sets no upper bound: the ZeroGPU scheduler refuses a longer request ("ZeroGPU illegal
# duration"). The bound is not documented; ZeroGPU's maintainers gave 5 minutes as the most one call may ask.
ZEROGPU_MAX_DURATION_S = 300
ZEROGPU_MIN_DURATION_S = 10  # a floor for tiny requests (spaces' own default is 60)
ZEROGPU_OVERHEAD_S = 10  # a fresh worker forks and moves the weights onto the GPU before the first step
ZEROGPU_MARGIN = 1.5  # the estimate is not a promise: a run past its reservation is killed


@dataclass
class Engine:
    """What a worker needs to run a request, kept in module state (inherited by forked workers)."""

    get_pipeline: Callable[[], object]  # returns the loaded pipeline
    limits: Limits
    estimator: Estimator  # lives in the main process; `gpu_duration` reads it there


ENGINES: dict[str, Engine] = {}


def register(engine: Engine) -> str:
    """Keep `engine` for the workers; returns the key `run_generation` takes."""
    key = uuid.uuid4().hex
    ENGINES[key] = engine
    return key


@dataclass
class Failed:
    """A request that could not run; `message` is safe to show."""

    message: str
    title: str


def workload(request, subjects) -> Workload:
    """What a request computes, for the estimator (with the face pass: a face per subject and image)."""
    faces = len(subjects) * int(request.num_images) if getattr(request, "detail_faces", False) else 0
    return Workload.of(request.scheduler, request.num_inference_steps, request.cache_interval, request.width,
                       request.height, request.num_images, sum(len(group) for group in subjects), request.alpha,
                       request.guidance_scale, faces, getattr(request, "detail_strength", DETAIL.strength))


def gpu_duration(key: str, request, subjects, loras, alphas: list[float] | None = None) -> int:
    """Seconds of GPU time to reserve for one call (spaces calls this with `run_generation`'s arguments): a sweep
    reserves for all of its runs, which run in the one call."""
    seconds = ENGINES[key].estimator.seconds(workload(request, subjects)) * max(1, len(alphas or ()))
    wanted = math.ceil(ZEROGPU_OVERHEAD_S + ZEROGPU_MARGIN * seconds)
    return int(min(ZEROGPU_MAX_DURATION_S, max(ZEROGPU_MIN_DURATION_S, wanted)))


def run_generation(key: str, request, subjects: list, loras: list[str], alphas: list[float] | None = None) -> Iterator:
    """Apply the LoRAs and stream one generation, or an alpha sweep: `streaming` events, or one `Failed`.

    Args:
        key: from `register`.
        request: a `GenerationRequest` whose seed is already drawn.
        subjects: per subject, the images the encoder sees (already cropped).
        loras: `PATH:SCALE` specs of local files ([] for none).
        alphas: a sweep's alphas (`streaming.stream_sweep`), all in this one call so ZeroGPU reserves the GPU
            once; None for one run at `request.alpha`.
    """
    from ..generation.run import GenerationError
    from ..generation.streaming import stream_generation, stream_sweep
    from ..models.lora import LoraError, apply_loras

    engine = ENGINES[key]
    pipe = engine.get_pipeline()
    try:
        if loras or getattr(pipe, "active_loras", None):  # cheap when the set is unchanged (see lora.py)
            apply_loras(pipe, loras, allow_download=False)
    except LoraError as e:
        yield Failed(e.message_for("page"), "LoRA problem")
        return
    try:
        if alphas:
            yield from stream_sweep(pipe, request, alphas, subjects=subjects, limits=engine.limits)
        else:
            yield from stream_generation(pipe, request, subjects=subjects, limits=engine.limits)
    except GenerationError as e:
        yield Failed(e.message_for("page"), "Could not generate")


def on_gpu(fn: Callable) -> Callable:
    """`fn` wrapped in `spaces.GPU` when the `spaces` package is there (a no-op off ZeroGPU), else `fn`."""
    try:
        import spaces
    except Exception:  # noqa: BLE001 - any import failure means "not on a Space"
        return fn
    logger.info("running generation through spaces.GPU")
    return spaces.GPU(duration=gpu_duration)(fn)
