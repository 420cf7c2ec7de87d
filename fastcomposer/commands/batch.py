"""`python -m fastcomposer batch JOBS.jsonl --output DIR`: many generations from one file, resumable, on 1-N GPUs.

    JOBS.jsonl -> check every line, no model yet (jobs.py) -> skip jobs whose files are there -> split the rest
    between the processes -> each loads the model once and writes DIR/<id>.png ... -> the main process writes
    DIR/summary.json

Under `accelerate launch --num_processes N` each process takes its share of the pending jobs
(`PartialState.split_between_processes`), runs it on its own device and keeps a partial summary beside the
images; the main process merges those once every share is done. Without accelerate it is the same code with
one process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import SETTINGS
from ..generation.metadata import GenerationRecord, read_record, save_png
from ..generation.run import GenerationError, generate, recorded_boxes, recorded_margin
from ..inputs.images import ImageError, load_image
from ..messages import message_for
from .jobs import Job, read_jobs
from .options import (
    CLI_LIMITS,
    UserError,
    add_generation_args,
    add_model_args,
    load_model,
    parse_alphas,
    sampling_plan,
    with_model_size,
)

logger = logging.getLogger(__name__)

SUMMARY = "summary.json"
# The barrier after the work waits for the slowest share, which may take hours; torch's default gives up
# after 10 (NCCL) or 30 (gloo) minutes.
BARRIER_TIMEOUT = timedelta(days=7)


@dataclass
class Outcome:
    """What became of one line: its entry in summary.json."""

    line: int
    id: str | None  # None when the line's id could not be read
    status: str  # "done", "skipped" or "failed"
    files: list[str] = field(default_factory=list)  # names inside the output folder
    seed: int | None = None  # the seed the images were made with
    seconds: float | None = None  # generation time; None when nothing ran
    error: str | None = None
    hidden: list[str] = field(default_factory=list)  # files blacked out by the safety checker
    identity: list[str] = field(default_factory=list)  # per file, the identity check's line (--identity-check)
    process: int | None = None  # the process that ran it (its rank under accelerate launch); None when none did


# 1. Resuming


def finished(job: Job) -> GenerationRecord | None:
    """The record of the first output when every output of `job` exists and carries this job's settings.

    Files made with other settings (an edited line) are made again, so a skip always means "this job's images".
    """
    records = [read_record(path) if path.is_file() else None for path in job.files]
    if any(record is None for record in records):
        return None
    want = expected_settings(job)
    same = all(
        record.image_index == k and all(getattr(record, name) == value for name, value in want.items())
        for k, record in enumerate(records)
    )
    if not same or len({record.seed for record in records}) != 1:
        logger.warning("line %d (id %s): the files there were made with other settings; making them again",
                       job.line, job.id)
        return None
    return records[0]


def expected_settings(job: Job) -> dict:
    """The `GenerationRecord` fields a run of `job` is sure to write (a random seed or the model's size is not)."""
    r = job.request
    want = {
        "prompt": r.prompt,
        "negative_prompt": SETTINGS.defaults.negative_prompt if r.negative_prompt is None else r.negative_prompt,
        "alpha": float(r.alpha),
        "guidance_scale": float(r.guidance_scale),
        "num_inference_steps": int(r.num_inference_steps),
        "scheduler": r.scheduler,
        "num_images": int(r.num_images),
        "face_crop": bool(r.face_crop),
        "crop_margin": recorded_margin(r),
        "cache_interval": int(r.cache_interval),
        "photos_per_subject": [len(group) for group in job.photos],
        "boxes": recorded_boxes(r, len(job.photos)),
        "separate": bool(r.separate),
        "detail_faces": bool(r.detail_faces),
        "detail_strength": float(r.detail_strength) if r.detail_faces else None,
    }
    if r.seed != -1:
        want["seed"] = int(r.seed)
    if job.settings.height is not None:
        want["height"] = int(r.height)
    if job.settings.width is not None:
        want["width"] = int(r.width)
    return want


# 2. Running a share


def run_job(pipe, job: Job) -> Outcome:
    """Generate one job and write its files atomically; any failure becomes a failed outcome."""
    start = time.perf_counter()
    try:
        photos = [[load_image(path, name=f"photo {path}") for path in group] for group in job.photos]
        request = with_model_size(replace(job.request, images=photos), pipe, job.settings)
        result = generate(pipe, request, limits=CLI_LIMITS)
        if len(result.images) != len(job.files):
            raise GenerationError(f"{len(result.images)} images came back for {len(job.files)} files")
        for image, record, path in zip(result.images, result.records, job.files):
            write_png(image, record, path)
    except (GenerationError, ImageError, OSError) as e:  # OSError: a photo gone since the check, a full disk
        return Outcome(job.line, job.id, "failed", error=message_for(e, "cli"))
    except Exception as e:  # noqa: BLE001 - one broken job must not end a night-long batch; the summary says why
        logger.debug("line %d failed", job.line, exc_info=True)
        return Outcome(job.line, job.id, "failed", error=f"{type(e).__name__}: {e}")
    nsfw = list(result.nsfw) + [False] * len(job.files)
    return Outcome(
        job.line, job.id, "done", files=[path.name for path in job.files], seed=result.seed,
        seconds=round(time.perf_counter() - start, 3),
        hidden=[path.name for path, hidden in zip(job.files, nsfw) if hidden],
        identity=[report.summary() for report in result.identity],
    )


def write_png(image, record: GenerationRecord, path: Path) -> None:
    """Save under a temporary name, then rename: a killed run never leaves a half file that looks done."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        save_png(image, partial, record)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_json(path: Path, data) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial, path)


def partial_summary(out_dir: Path, rank: int, processes: int) -> Path:
    return out_dir / f".summary-{rank}-of-{processes}.json"


def run_share(share: list[Job], defaults: argparse.Namespace, out_dir: Path, state) -> None:
    """Run this process's jobs on its device, keeping its partial summary up to date after each one."""
    partial = partial_summary(out_dir, state.process_index, state.num_processes)
    outcomes: list[Outcome] = []
    write_json(partial, [])
    # The main process loads first: a first run may download or convert the weights into the shared cache, which
    # the others then read. Its error waits for the barrier, so the others are not left waiting on it.
    pipe, error = None, None
    with state.main_process_first():
        try:
            if share:
                pipe = load_model(replace_namespace(defaults, device=process_device(defaults.device, state)))
        except UserError as e:
            error = e
    if error is not None:
        raise error
    several = state.num_processes > 1
    bar = tqdm(share, desc=f"process {state.process_index + 1}/{state.num_processes}" if several else "jobs",
               unit="job", file=sys.stderr, disable=not sys.stderr.isatty(), dynamic_ncols=True,
               position=state.local_process_index if several else None)
    for job in bar:
        outcome = replace(run_job(pipe, job), process=state.process_index)
        if outcome.status == "failed":
            tqdm.write(f"{describe(outcome)}: {outcome.error}", file=sys.stderr)
        outcomes.append(outcome)
        write_json(partial, [asdict(o) for o in outcomes])
    bar.close()


def describe(outcome: Outcome) -> str:
    """How messages name a line: "line 3", or "line 3 (id hike)" when the id is not the line number."""
    shown = outcome.id is not None and outcome.id != str(outcome.line)
    return f"line {outcome.line} (id {outcome.id})" if shown else f"line {outcome.line}"


def replace_namespace(args: argparse.Namespace, **changes) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


# 3. Processes


def process_state(device: str):
    """accelerate's view of this process: its rank, the number of processes and its device.

    Without `accelerate launch` it is one process. A CPU run asks for CPU processes (gloo); otherwise accelerate
    gives each process its own GPU (NCCL on CUDA).
    """
    from accelerate import PartialState

    cpu = device == "cpu" or device == "auto" and not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > state.num_processes:  # e.g. --device cuda on a machine without CUDA: each would run every job
        raise UserError(f"started as {launched} processes, but accelerate could not join them on --device {device}")
    return state


def process_device(device: str, state) -> str:
    """One process: --device as given. Several: the device accelerate gave this process (cuda:1, ...)."""
    if state.num_processes == 1:
        return device
    return "cpu" if state.device.type == "cpu" else str(state.device)


# 4. The command


def add_parser(sub) -> None:
    b = sub.add_parser("batch", help="run many jobs from a JSON Lines file (resumable; splits across GPUs under "
                       "accelerate launch)")
    b.add_argument("jobs", metavar="JOBS.jsonl",
                   help='one JSON object per line: {"prompt": ..., "images": [...]} and optional "id", "seed", '
                   '"steps", ... (see README, "Batch jobs")')
    b.add_argument("--output", required=True, metavar="DIR",
                   help="folder for DIR/<id>.png (<id>_<k>.png for several images) and DIR/summary.json")
    add_generation_args(b, sweeps=False)
    add_model_args(b)



def run(args: argparse.Namespace) -> int:
    """`python -m fastcomposer batch`: 0 when every job was made or skipped, 2 when some failed."""
    from accelerate.utils import broadcast_object_list

    from ..models.lora import parse_lora_spec

    started = time.perf_counter()
    # 1. What every job shares, checked before anything is read
    alphas = parse_alphas(args.alpha)
    if len(alphas) > 1:
        raise UserError('batch takes one --alpha (a job can set its own "alpha"); alpha sweeps are for generate')
    defaults = replace_namespace(args, alpha=alphas[0])
    try:
        for spec in args.lora:
            parse_lora_spec(spec)
    except ValueError as e:
        raise UserError(message_for(e, "cli")) from None
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output {out_dir} is a file; give a folder (it is made if needed)")
    state = process_state(args.device)
    main = state.is_main_process

    # 2. Every line, checked before the model loads, so a file of bad jobs fails in seconds
    jobs, bad = read_jobs(Path(args.jobs), out_dir, defaults)
    outcomes = [Outcome(b.line, b.id, "failed", error=b.error) for b in bad]
    if not jobs and not outcomes:
        raise UserError(f"{args.jobs} has no jobs; write one JSON object per line")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make the --output folder {out_dir}: {e.strerror or type(e).__name__}") from None

    # 3. Resume: the main process looks at the files already there and tells the others what is left
    pending = None
    if main:
        for outcome in outcomes:
            sys.stderr.write(f"{describe(outcome)}: {outcome.error}\n")
        invalid, pending = len(outcomes), []
        for job in jobs:
            record = finished(job)
            if record is None:
                pending.append(job.line)
            else:
                outcomes.append(Outcome(job.line, job.id, "skipped", [p.name for p in job.files], record.seed))
        logger.info("%d jobs: %d to run, %d done before, %d not valid", len(jobs) + invalid, len(pending),
                    len(jobs) - len(pending), invalid)
    pending = set(broadcast_object_list([pending])[0])

    # 4. This process's share of what is left
    with state.split_between_processes([job for job in jobs if job.line in pending]) as share:
        run_share(list(share), defaults, out_dir, state)

    # 5. Once every share is done, the main process merges the partial summaries
    state.wait_for_everyone()
    code = 0
    if main:
        for rank in range(state.num_processes):
            part = partial_summary(out_dir, rank, state.num_processes)
            outcomes += [Outcome(**entry) for entry in json.loads(part.read_text(encoding="utf-8"))]
            part.unlink()
        outcomes.sort(key=lambda o: o.line)
        summary = make_summary(outcomes, defaults, args.jobs, state.num_processes, time.perf_counter() - started)
        write_json(out_dir / SUMMARY, summary)
        totals = summary["totals"]
        failed = [o for o in outcomes if o.status == "failed"]
        if failed:
            sys.stderr.write(f"{len(failed)} job(s) failed, on line(s) {', '.join(str(o.line) for o in failed)}; "
                             f"see {out_dir / SUMMARY}\n")
            code = 2
        sys.stdout.write(f"{totals['done']} done, {totals['skipped']} skipped, {totals['failed']} failed\n"
                         f"{out_dir / SUMMARY}\n")
    code = broadcast_object_list([code])[0]
    # Leave the process group before exiting: the launcher stops the other processes as soon as one exits with
    # status 2, and a process stopped while still in the group aborts noisily.
    state.destroy_process_group()
    return code


def make_summary(outcomes: list[Outcome], defaults: argparse.Namespace, jobs_file: str, processes: int,
                 seconds: float) -> dict:
    """summary.json: per job id its outcome, the totals, and the defaults the jobs started from."""
    entries: dict[str, dict] = {}
    for o in outcomes:
        # A line whose id could not be read (or repeats an earlier one) is keyed by its line; ids have no spaces.
        key = o.id if o.id is not None and o.id not in entries else f"line {o.line}"
        entry = {name: value for name, value in asdict(o).items() if name != "id"}
        if not defaults.identity_check:
            entry.pop("identity")
        entries[key] = entry
    plan = sampling_plan(defaults)
    count = {status: sum(o.status == status for o in outcomes) for status in ("done", "skipped", "failed")}
    return {
        "jobs_file": str(jobs_file),
        "processes": processes,
        "seconds": round(seconds, 3),
        "totals": {"jobs": len(outcomes), **count},
        "defaults": {
            "negative_prompt": SETTINGS.defaults.negative_prompt if defaults.negative_prompt is None
            else defaults.negative_prompt,
            "preset": plan.preset, "scheduler": plan.scheduler, "steps": plan.num_inference_steps,
            "cache_interval": plan.cache_interval, "guidance": defaults.guidance, "alpha": defaults.alpha,
            "seed": defaults.seed, "num_images": defaults.num_images,
            "height": defaults.height, "width": defaults.width,  # None: the model's own size
            "face_crop": not defaults.no_face_crop, "crop_margin": defaults.crop_margin,
            "boxes": defaults.box, "separate": defaults.separate, "detail_faces": defaults.detail_faces,
            "safety_checker": not defaults.no_safety_checker,
            "identity_check": defaults.identity_check, "weights": defaults.weights, "base_model": defaults.base_model,
            "image_encoder": defaults.image_encoder, "lora": defaults.lora, "device": defaults.device,
            "dtype": defaults.dtype,
        },
        "jobs": entries,
    }
