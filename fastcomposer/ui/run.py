"""Generate and Stop: the handlers behind the two buttons, and the run in progress of each browser session.

Generate is a generator: it checks the request, prepares the photos here, then streams the run from
`gpu.run_generation` (in this process, or on a ZeroGPU worker) and yields live previews into the
gallery, in front of the images already there. The progress bar is drawn on the gallery alone. An alpha
sweep is one request: its runs stream one after the other through the same call, the bar covers all of
them, and each finished alpha shows at once (`insight.py` builds the gallery and the status line).

Stop has to end a run *and* let the page say so. Gradio's `cancels=` would end the run too, but it
drops the cancelled handler's last answer (the page went blank and silent). So Stop is two parts:
- a run that is running gets its own stop flag set (created when it started, so no stale flag can
  outlive it and stop the next run); the run ends after its current step and answers for itself:
  "Stopped at step 4 of 51; nothing was generated", with the earlier images and the last preview,
  marked unfinished, still in the gallery (a sweep keeps its finished alphas). The Stop handler waits
  for that, so an API call to /stop returns once the run has ended;
- when nothing of this session runs, Stop also bumps `stop_tick`, whose change event `cancels=` this
  session's queued runs (Gradio removes them from the queue before they start); the page then says
  "Stopped before it started".
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field

import gradio as gr

from ..config import DETAIL
from ..generation.estimate import Estimator, format_seconds, is_zerogpu
from ..generation.streaming import PreviewEvent, ResultEvent, RunEvent, StepEvent
from ..generation.time_left import RunClock
from ..pipeline.boxes import parse_boxes_text
from .gpu import Failed, workload
from .insight import parse_sweep, result_items, result_status, sweep_problem
from .photos import photos_of
from .settings import CUSTOM, speed_of
from .texts import MAX_SLOTS

STOP_WAIT_S = 120  # Stop waits at most this long for the run to end (one step, or the final decode)
PREVIEW_EVERY_S = 0.5  # at most two preview updates a second: each one re-sends the gallery
GENERATE_INPUTS = 31  # the values Generate takes from the page (see page.py); the validator answers each
PHOTOS_AT, SWEEP_AT, LAYOUT_AT = 11, 25, 26  # where photo_1, alpha_sweep and layout_boxes sit among them


@dataclass
class Run:
    """One running generation, as Stop sees it."""

    stop: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)  # its last answer has gone out
    done: int = 0  # loop iterations finished (of the current run, in a sweep)
    total: int = 0
    alpha: float | None = None  # the current run's alpha, in a sweep
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


def progress_text(done: int, total: int, left_s: float, sweep: RunEvent | None = None, stage: str = "") -> str:
    """Short enough for a phone: "step 12/51 · ~30 s left"; in a sweep "α 0.60 2/4 · step 12/21 · ~1 min left";
    in the face pass "face 2/3 · step 4/8 · ~20 s left"."""
    where = f"α {sweep.alpha:.2f} {sweep.index + 1}/{sweep.total} · " if sweep is not None else ""
    if stage:
        where += stage.split(" · ")[-1] + " · "  # "image 1 · face 2/3" -> "face 2/3"
    return f"{where}step {done}/{total} · ~{format_seconds(left_s)} left"


class Handlers:
    """Generate, Stop and the queue validator for one page."""

    def __init__(self, *, key: str, runner, estimator: Estimator, loader, tokenizer, settings, loras: dict):
        self.key, self.runner, self.estimator, self.loader = key, runner, estimator, loader
        self.tokenizer, self.settings, self.loras = tokenizer, settings, loras
        self.runs = Runs()

    # -- before the queue ------------------------------------------------------------------------------

    def check_before_queue(self, prompt, negative, alpha, guidance, steps, sampler, seed, num_images, width, height,
                           face_crop, photo_1, photo_2, photo_3, photo_4, whole_1, whole_2, whole_3, whole_4,
                           cache_interval, lora, lora_scale, crop_margin, attention_maps, identity_check,
                           alpha_sweep, layout_boxes, keep_apart, refine_faces, face_strength, shown,
                           request: gr.Request):
        """Runs before the job takes a queue slot: refuses a prompt that cannot match the photos, a subject with
        too many photos and a sweep that cannot run.

        Gradio passes it Generate's inputs (and injects `request` only into named positional parameters).
        """
        from ..generation.hints import prompt_hint

        limits = self.settings.limits
        subjects = photos_of([photo_1, photo_2, photo_3, photo_4][:MAX_SLOTS])
        hint = prompt_hint(prompt or "", len(subjects), self.tokenizer, limits.max_subjects, limits.max_prompt_chars,
                           total_photos=sum(len(paths) for _, paths in subjects))
        checks = [gr.validate(True, "")] * GENERATE_INPUTS
        checks[0] = gr.validate(hint.ok, hint.text)
        for k, paths in subjects:
            if len(paths) > limits.max_photos_per_subject:
                checks[PHOTOS_AT + k] = gr.validate(False, f"subject {k + 1} has {len(paths)} photos; give 1 to "
                                                    f"{limits.max_photos_per_subject} photos per subject")
        try:
            alphas = parse_sweep(alpha_sweep)
            problem = alphas and sweep_problem(alphas, num_images, steps, width, height, limits)
        except ValueError as e:
            problem = str(e)
        if problem:
            checks[SWEEP_AT] = gr.validate(False, problem)
        try:
            parse_boxes_text(layout_boxes)
        except ValueError as e:
            checks[LAYOUT_AT] = gr.validate(False, f"layout {e}")
        if all(check["is_valid"] for check in checks):
            self.runs.queued(request.session_hash or "")
        return checks

    # -- Generate --------------------------------------------------------------------------------------

    def generate(self, prompt, negative, alpha, guidance, steps, sampler, seed, num_images, width, height,
                 face_crop, photo_1, photo_2, photo_3, photo_4, whole_1, whole_2, whole_3, whole_4, cache_interval,
                 lora, lora_scale, crop_margin, attention_maps, identity_check, alpha_sweep, layout_boxes,
                 keep_apart, refine_faces, face_strength, shown, request: gr.Request,
                 progress=gr.Progress()):  # noqa: B008 - gradio's idiom
        """Yields (gallery, seed used, status, images kept on display)."""
        from ..generation.run import GenerationRequest

        session = request.session_hash or ""
        run = self.runs.start(session)  # Stop works from here on
        try:
            try:
                boxes = parse_boxes_text(layout_boxes)
            except ValueError as e:
                raise gr.Error(f"layout {e}", title="Check the layout") from None
            gen_request = GenerationRequest(
                prompt=prompt or "", images=[], negative_prompt=negative or "", alpha=alpha,
                guidance_scale=guidance, num_inference_steps=steps, num_images=num_images, height=height,
                width=width, seed=-1 if seed is None else seed, scheduler=sampler, face_crop=bool(face_crop),
                cache_interval=1 if cache_interval is None else cache_interval,
                crop_margin=None if crop_margin is None else float(crop_margin),
                attention_maps=bool(attention_maps), identity_check=bool(identity_check),
                boxes=boxes, separate=bool(keep_apart), detail_faces=bool(refine_faces),
                detail_strength=DETAIL.strength if face_strength is None else face_strength,
            )
            page = _PageInputs(
                slots=[photo_1, photo_2, photo_3, photo_4][:MAX_SLOTS],
                wholes=[whole_1 or [], whole_2 or [], whole_3 or [], whole_4 or []][:MAX_SLOTS],
                sweep=alpha_sweep, lora=lora,
                lora_scale=lora_scale)
            yield from self._generate(run, gen_request, page, list(shown or []), progress)
        finally:
            self.runs.end(session, run)

    def _generate(self, run: Run, request, page: _PageInputs, shown, progress):
        from ..generation.run import GenerationError, seed_of, validate

        # 1. Cheap checks first: nothing is decoded or loaded for a request that cannot run
        photos = photos_of(page.slots)
        try:
            request.images = [[None] * len(paths) for _, paths in photos]  # counts only; checked again below
            validate(request, self.tokenizer, self.settings.limits)
        except GenerationError as e:
            raise gr.Error(e.message_for("page"), title="Check the prompt and settings") from None
        try:
            alphas = parse_sweep(page.sweep)
        except ValueError as e:
            raise gr.Error(str(e), title="Check the alpha sweep") from None
        if alphas and (problem := sweep_problem(alphas, request.num_images, request.num_inference_steps,
                                                request.width, request.height, self.settings.limits)):
            raise gr.Error(problem, title="Check the alpha sweep")
        loras = self._lora_specs(page.lora, page.lora_scale)
        # 2. Photos: safe decode and face crop here, so only the crops travel to the GPU
        progress(0, desc="preparing the photos")
        subjects = [self.loader.for_generation(k, paths, bool(request.face_crop), page.wholes[k],
                                               request.crop_margin)
                    for k, paths in photos]
        request.images = subjects
        # drawn here, so the page knows it even if the worker never reports back
        request.seed = seed_of(request.seed, self.settings.limits)
        preset = speed_of(request.scheduler, request.num_inference_steps, request.cache_interval)
        request.preset = None if preset == CUSTOM else preset
        if run.stop.is_set():
            yield self._stopped(run, shown, None, [], alphas)
            return
        # 3. The run (or the sweep's runs), streamed
        results, preview, stopped = yield from self._stream(run, request, subjects, loras, alphas, shown, progress)
        if stopped:
            yield self._stopped(run, shown, preview, results, alphas)
            return
        hidden = sum(r.num_hidden for r in results)
        if hidden:
            gr.Warning(f"{hidden} of {sum(len(r.images) for r in results)} images hidden by the safety filter")
        items = result_items(results, alphas)
        yield items, results[0].seed, result_status(results, alphas), items

    def _lora_specs(self, lora: str | None, scale: float | None) -> list[str]:
        """Only files the page offers: a path from a client is never loaded."""
        if not lora:
            return []
        path = self.loras.get(lora)
        if path is None:
            raise gr.Error(f"there is no LoRA called {lora!r} here; choose one from the list", title="LoRA problem")
        return [f"{path}:{0.8 if scale is None else float(scale):g}"]

    def _stream(self, run: Run, request, subjects, loras, alphas, shown, progress):
        """Yields preview updates; returns (the finished runs' results, the last preview event, stopped)."""
        progress(0, desc="waiting for a GPU" if is_zerogpu() else "starting")
        runs = len(alphas) if alphas else 1
        work = workload(request, subjects)
        clock = RunClock(self.estimator, work)  # what this run has left (see time_left.py)
        sweep: RunEvent | None = None
        results: list = []
        kept: list = []  # the finished alphas of a sweep, shown while the next ones run
        preview: PreviewEvent | None = None
        bar: dict = {}  # the progress bar's last state
        shown_at = 0.0
        with closing(self.runner(self.key, request, subjects, loras, alphas)) as events:  # closing it stops the run
            for event in events:
                if isinstance(event, Failed):
                    if preview is not None or kept:  # take the previews down before saying what went wrong
                        yield shown, gr.update(), gr.update(), shown
                    raise gr.Error(event.message, title=event.title)
                if isinstance(event, RunEvent):
                    sweep, preview, clock = event, None, RunClock(self.estimator, work)
                    run.done, run.alpha = 0, event.alpha
                elif isinstance(event, ResultEvent):
                    clock.finish(event.elapsed)
                    if event.result.interrupted:
                        return results, preview, True
                    results.append(event.result)
                    if len(results) == runs:
                        return results, preview, False
                    kept = result_items(results, alphas)
                    yield kept + shown, event.result.seed, gr.update(), shown
                elif isinstance(event, StepEvent) and event.stage:  # the face pass
                    left = clock.face_seconds_left(event.stage, event.done, event.elapsed)
                    bar = dict(progress=(event.done, event.total), unit="steps",
                               desc=progress_text(event.done, event.total, left, sweep, event.stage))
                    progress(**bar)
                elif isinstance(event, StepEvent):
                    run.done, run.total = event.done, event.total
                    clock.step(event.done, event.elapsed)
                    later = runs - (sweep.index + 1 if sweep else 1)  # a sweep's runs still to come
                    left = clock.seconds_left() + later * clock.run_seconds()
                    done = (sweep.index if sweep else 0) * event.total + event.done  # over the whole sweep
                    bar = dict(progress=(done, runs * event.total), unit="steps",
                               desc=progress_text(event.done, event.total, left, sweep))
                    progress(**bar)
                elif isinstance(event, PreviewEvent):
                    preview = event
                    if time.monotonic() - shown_at >= PREVIEW_EVERY_S:
                        shown_at = time.monotonic()
                        where = f"α {sweep.alpha:.2f} · " if sweep else "step "
                        captioned = [(image, f"preview · {where}{event.done}/{event.total}") for image in event.images]
                        yield captioned + kept + shown, gr.update(), gr.update(), shown
                        if bar:  # the page drops the bar with each update: draw it again at once, not a step later
                            progress(**bar)
                if run.stop.is_set():
                    return results, preview, True
        return results, preview, True

    @staticmethod
    def _stopped(run: Run, shown: list, preview: PreviewEvent | None, results: list, alphas: list | None):
        """The page after Stop: what happened, the earlier images (a sweep's finished alphas first), and the last
        preview marked unfinished."""
        if alphas and results:
            where = (f"at step {run.done} of {run.total} of alpha {run.alpha:.2f}" if run.done
                     else f"before alpha {run.alpha:.2f} started")
            finished = ", ".join(f"{a:.2f}" for a in alphas[: len(results)])
            run.message = f"Stopped {where}; the finished alphas ({finished}) are kept."
        elif run.total:
            run.message = f"Stopped at step {run.done} of {run.total}; nothing was generated."
        else:
            run.message = "Stopped before generation started; nothing was generated."
        kept = result_items(results, alphas) + shown if results else shown
        gallery = kept
        if preview is not None:
            unfinished = f"unfinished · {run.done}/{run.total}"  # short: a phone shows about 18 characters of it
            gallery = [(image, unfinished) for image in preview.images] + kept
        return gallery, results[0].seed if results else gr.update(), run.message, kept

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


@dataclass
class _PageInputs:
    """Generate's page-only inputs (what is not part of a `GenerationRequest`)."""

    slots: list  # per slot, its gallery value
    wholes: list[list[int]]  # per slot, the photos (1-based) to use uncropped
    sweep: str | None  # the alpha sweep field
    lora: str | None
    lora_scale: float | None
