"""Generate and Stop: the handlers behind the two buttons, and the run in progress of each browser session.

Generate is a generator: it checks the request, prepares the photos here, then streams the run from
`gpu.run_generation` (in this process, or on a ZeroGPU worker) and yields live previews into the
gallery, in front of the images already there. The progress bar is drawn on the gallery alone.

Stop has to end a run *and* let the page say so. Gradio's `cancels=` would end the run too, but it
drops the cancelled handler's last answer (the page went blank and silent). So Stop is two parts:
- a run that is running gets its own stop flag set (created when it started, so no stale flag can
  outlive it and stop the next run); the run ends after its current step and answers for itself:
  "Stopped at step 4 of 51; nothing was generated", with the earlier images and the last preview,
  marked unfinished, still in the gallery. The Stop handler waits for that, so an API call to /stop
  returns once the run has ended;
- when nothing of this session runs, Stop also bumps `stop_tick`, whose change event `cancels=` this
  session's queued runs (Gradio removes them from the queue before they start); the page then says
  "Stopped before it started".
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field

import gradio as gr

from ..estimate import Estimator, format_seconds, is_zerogpu
from ..streaming import PreviewEvent, ResultEvent, StepEvent
from .gpu import Failed, workload
from .photos import photos_of
from .settings import CUSTOM, speed_of
from .texts import MAX_SLOTS

STOP_WAIT_S = 120  # Stop waits at most this long for the run to end (one step, or the final decode)
PREVIEW_EVERY_S = 0.5  # at most two preview updates a second: each one re-sends the gallery
GENERATE_INPUTS = 23  # the values Generate takes from the page (see page.py); the validator answers each


@dataclass
class Run:
    """One running generation, as Stop sees it."""

    stop: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)  # its last answer has gone out
    done: int = 0  # loop iterations finished
    total: int = 0
    message: str | None = None  # its final status line when it was stopped


class Runs:
    """Per browser session: the run in progress, and how many of its requests wait in the queue."""

    def __init__(self):
        self._running: dict[str, Run] = {}
        self._queued: Counter[str] = Counter()
        self._lock = threading.Lock()

    def queued(self, session: str) -> None:
        with self._lock:
            self._queued[session] += 1

    def start(self, session: str) -> Run:
        with self._lock:
            if self._queued[session] > 0:
                self._queued[session] -= 1
            run = self._running[session] = Run()
            return run

    def end(self, session: str, run: Run) -> None:
        with self._lock:
            if self._running.get(session) is run:
                del self._running[session]
        run.finished.set()

    def running(self, session: str) -> bool:
        with self._lock:
            return session in self._running

    def stop(self, session: str) -> tuple[Run | None, int]:
        """Flag the running run; else forget (and return) the count of queued requests, which Stop cancels."""
        with self._lock:
            run = self._running.get(session)
            if run is not None:
                run.stop.set()
                return run, 0
            return None, self._queued.pop(session, 0)


def progress_text(done: int, total: int, left_s: float) -> str:
    """Short enough for a phone: "step 12/51 · ~30 s left"."""
    return f"step {done}/{total} · ~{format_seconds(left_s)} left"


class Handlers:
    """Generate, Stop and the queue validator for one page."""

    def __init__(self, *, key: str, runner, estimator: Estimator, loader, tokenizer, settings, loras: dict):
        self.key, self.runner, self.estimator, self.loader = key, runner, estimator, loader
        self.tokenizer, self.settings, self.loras = tokenizer, settings, loras
        self.runs = Runs()

    # -- before the queue ------------------------------------------------------------------------------

    def check_before_queue(self, prompt, negative, alpha, guidance, steps, sampler, seed, num_images, width, height,
                           face_crop, photo_1, photo_2, photo_3, photo_4, whole_1, whole_2, whole_3, whole_4,
                           cache_interval, lora, lora_scale, shown, request: gr.Request):
        """Runs before the job takes a queue slot: refuses a prompt that cannot match the photos.

        Gradio passes it Generate's inputs (and injects `request` only into named positional parameters).
        """
        from ..hints import prompt_hint

        limits = self.settings.limits
        count = len(photos_of([photo_1, photo_2, photo_3, photo_4][:MAX_SLOTS]))
        hint = prompt_hint(prompt or "", count, self.tokenizer, limits.max_subjects, limits.max_prompt_chars)
        if hint.ok:
            self.runs.queued(request.session_hash or "")
        return [gr.validate(hint.ok, hint.text)] + [gr.validate(True, "")] * (GENERATE_INPUTS - 1)

    # -- Generate --------------------------------------------------------------------------------------

    def generate(self, prompt, negative, alpha, guidance, steps, sampler, seed, num_images, width, height,
                 face_crop, photo_1, photo_2, photo_3, photo_4, whole_1, whole_2, whole_3, whole_4, cache_interval,
                 lora, lora_scale, shown, request: gr.Request, progress=gr.Progress()):  # noqa: B008 - gradio's idiom
        """Yields (gallery, seed used, status, images kept on display)."""
        from ..generation import GenerationRequest

        session = request.session_hash or ""
        run = self.runs.start(session)  # Stop works from here on
        try:
            gen_request = GenerationRequest(
                prompt=prompt or "", images=[], negative_prompt=negative or "", alpha=alpha,
                guidance_scale=guidance, num_inference_steps=steps, num_images=num_images, height=height,
                width=width, seed=-1 if seed is None else seed, scheduler=sampler, face_crop=bool(face_crop),
                cache_interval=1 if cache_interval is None else cache_interval,
            )
            files = [photo_1, photo_2, photo_3, photo_4][:MAX_SLOTS]
            wholes = [whole_1, whole_2, whole_3, whole_4][:MAX_SLOTS]
            yield from self._generate(run, gen_request, files, wholes, lora, lora_scale, list(shown or []),
                                      progress)
        finally:
            self.runs.end(session, run)

    def _generate(self, run: Run, request, files, wholes, lora, lora_scale, shown, progress):
        from ..generation import GenerationError, validate

        # 1. Cheap checks first: nothing is decoded or loaded for a request that cannot run
        photos = photos_of(files)
        try:
            request.images = [None] * len(photos)  # count only; checked again with the real photos
            validate(request, self.tokenizer, self.settings.limits)
        except GenerationError as e:
            raise gr.Error(e.message_for("page"), title="Check the prompt and settings") from None
        loras = self._lora_specs(lora, lora_scale)
        # 2. Photos: safe decode and face crop here, so only the crops travel to the GPU
        progress(0, desc="preparing the photos")
        loaded = [self.loader.for_generation(k, path, bool(request.face_crop), bool(wholes[k])) for k, path in photos]
        subjects = [[crop] for _, crop, _ in loaded]
        request.images = subjects
        if request.seed == -1:  # drawn here, so the page knows it even if the worker never reports back
            request.seed = secrets.randbelow(self.settings.limits.max_seed + 1)
        preset = speed_of(request.scheduler, request.num_inference_steps, request.cache_interval)
        request.preset = None if preset == CUSTOM else preset
        if run.stop.is_set():
            yield self._stopped(run, shown, None)
            return
        # 3. The run, streamed
        result, preview = yield from self._stream(run, request, subjects, loras, shown, progress)
        if result is None or result.interrupted:
            yield self._stopped(run, shown, preview)
            return
        status = f"{len(result.images)} image(s) · seed {result.seed}"
        if result.num_hidden:
            status += f" · {result.num_hidden} of {len(result.images)} images hidden by the safety filter"
            gr.Warning(f"{result.num_hidden} of {len(result.images)} images hidden by the safety filter")
        images = list(result.images)
        yield images, result.seed, status, images

    def _lora_specs(self, lora: str | None, scale: float | None) -> list[str]:
        """Only files the page offers: a path from a client is never loaded."""
        if not lora:
            return []
        path = self.loras.get(lora)
        if path is None:
            raise gr.Error(f"there is no LoRA called {lora!r} here; choose one from the list", title="LoRA problem")
        return [f"{path}:{0.8 if scale is None else float(scale):g}"]

    def _stream(self, run: Run, request, subjects, loras, shown, progress):
        """Yields preview updates; returns (result or None when stopped, the last preview event)."""
        progress(0, desc="waiting for a GPU" if is_zerogpu() else "starting")
        per_step = self.estimator.iteration_seconds(workload(request, subjects))
        first: tuple[float, StepEvent] | None = None
        last: StepEvent | None = None
        preview: PreviewEvent | None = None
        bar: dict = {}  # the progress bar's last state
        shown_at = 0.0
        with closing(self.runner(self.key, request, subjects, loras)) as events:  # closing it stops the run
            for event in events:
                if isinstance(event, Failed):
                    if preview is not None:  # take the previews down before saying what went wrong
                        yield shown, gr.update(), gr.update(), shown
                    raise gr.Error(event.message, title=event.title)
                if isinstance(event, ResultEvent):
                    self._observe(request, subjects, first, last)
                    return event.result, preview
                if isinstance(event, StepEvent):
                    run.done, run.total, last = event.done, event.total, event
                    first = first or (time.monotonic(), event)
                    if event.done > first[1].done:  # measured from here on, not from the estimate
                        per_step = (time.monotonic() - first[0]) / (event.done - first[1].done)
                    bar = dict(progress=(event.done, event.total), unit="steps",
                               desc=progress_text(event.done, event.total, per_step * (event.total - event.done)))
                    progress(**bar)
                elif isinstance(event, PreviewEvent):
                    preview = event
                    if time.monotonic() - shown_at >= PREVIEW_EVERY_S:
                        shown_at = time.monotonic()
                        captioned = [(image, f"preview · step {event.done}/{event.total}") for image in event.images]
                        yield captioned + shown, gr.update(), gr.update(), shown
                        if bar:  # the page drops the bar with each update: draw it again at once, not a step later
                            progress(**bar)
                if run.stop.is_set():
                    return None, preview
        return None, preview

    def _observe(self, request, subjects, first, last) -> None:
        """This machine's seconds per iteration into the estimate (the first iteration is left out: warm-up)."""
        if first is not None and last is not None and last.done - first[1].done >= 2:
            per_iteration = (last.elapsed - first[1].elapsed) / (last.done - first[1].done)
            self.estimator.observe(workload(request, subjects), per_iteration)

    @staticmethod
    def _stopped(run: Run, shown: list, preview: PreviewEvent | None):
        """The page after Stop: what happened, the earlier images, and the last preview marked unfinished."""
        if run.total:
            run.message = f"Stopped at step {run.done} of {run.total}; nothing was generated."
        else:
            run.message = "Stopped before generation started; nothing was generated."
        gallery = shown
        if preview is not None:
            unfinished = f"unfinished · {run.done}/{run.total}"  # short: a phone shows about 18 characters of it
            gallery = [(image, unfinished) for image in preview.images] + shown
        return gallery, gr.update(), run.message, shown

    # -- Stop ------------------------------------------------------------------------------------------

    def stop(self, request: gr.Request):
        """Stop's answer (the status line): see the module docstring."""
        run, waiting = self.runs.stop(request.session_hash or "")
        if run is None:
            return "Stopped before it started; nothing was generated." if waiting else gr.update()
        run.finished.wait(STOP_WAIT_S)
        return run.message or gr.update()

    def stop_queued(self, tick: float | None, request: gr.Request):
        """Bump `stop_tick` (whose change cancels this session's queued runs) unless one of its runs is running."""
        return gr.update() if self.runs.running(request.session_hash or "") else (tick or 0) + 1
