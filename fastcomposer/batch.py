"""`python -m fastcomposer batch JOBS.jsonl --output DIR`: many generations from one file, resumable, on 1-N GPUs.

    JOBS.jsonl -> check every line (no model yet) -> skip jobs whose files are there -> split the rest between
    the processes -> each loads the model once and writes DIR/<id>.png ... -> the main process writes summary.json

One JSON object per line; photo paths are relative to the file's folder, and the command's generation flags
are every job's defaults:

    {"id": "hike", "prompt": "a man img and a woman img hiking", "images": ["man.jpg", ["w1.jpg", "w2.jpg"]],
     "seed": 7, "alpha": 0.7}

Under `accelerate launch --num_processes N` each process takes its share of the pending jobs
(`PartialState.split_between_processes`), runs it on its own device and keeps a partial summary beside the
images; the main process merges those once every share is done. Without accelerate it is the same code with
one process.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import torch
from tqdm import tqdm

from .cli import (
    CLI_LIMITS,
    UserError,
    load_model,
    output_paths,
    parse_alphas,
    request_from_args,
    sampling_plan,
    with_model_size,
)
from .config import SETTINGS
from .generation import GenerationError, GenerationRequest, generate, validate
from .images import ImageError, load_image
from .metadata import GenerationRecord, read_record, save_png

logger = logging.getLogger(__name__)

SUMMARY = "summary.json"
# A job's optional keys -> (the generate flag's attribute they replace, the JSON type they take).
SETTING_KEYS: dict[str, tuple[str, str]] = {
    "seed": ("seed", "whole"),
    "steps": ("steps", "whole"),
    "alpha": ("alpha", "number"),
    "guidance": ("guidance", "number"),
    "height": ("height", "whole"),
    "width": ("width", "whole"),
    "scheduler": ("scheduler", "text"),
    "negative_prompt": ("negative_prompt", "text"),
    "num_images": ("num_images", "whole"),
    "face_crop": ("no_face_crop", "bool"),  # the flag says the opposite
    "preset": ("preset", "text"),
    "cache_interval": ("cache_interval", "whole"),
}
JOB_KEYS = ("id", "prompt", "images", *SETTING_KEYS)
# Safe as a file name on every system: no separators, no "..", no leading dot (our temporary files have one).
ID_PATTERN = re.compile(r"\w[\w.-]{0,99}")
# The barrier after the work waits for the slowest share, which may take hours; torch's default gives up
# after 10 (NCCL) or 30 (gloo) minutes.
BARRIER_TIMEOUT = timedelta(days=7)


class JobError(ValueError):
    """A line of the jobs file that cannot run; the message names the problem and the fix."""


@dataclass
class Job:
    """One checked line of the jobs file."""

    line: int  # 1-based line number in the file
    id: str  # names the outputs: the line number unless the line gives one
    photos: list[list[Path]]  # per subject, in marker order, its photo files (read again when the job runs)
    request: GenerationRequest  # every setting; `images` holds the photo paths until the job runs
    settings: argparse.Namespace  # the generation flags with this job's values in place
    files: list[Path]  # the outputs, named as `generate` names them


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


# 1. Reading and checking the jobs file


def read_jobs(path: Path, out_dir: Path, defaults: argparse.Namespace) -> tuple[list[Job], list[Outcome]]:
    """Every line of the jobs file, checked: the jobs that can run, and a failed outcome per line that cannot.

    Nothing heavy is loaded: each photo is decoded once to check it and let go, prompts are checked with the
    bundled tokenizer (with --base-model, with the model's own when each job runs).

    Raises:
        `UserError` when the file itself cannot be read.
    """
    from .prompt import load_tokenizer

    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark from Windows editors is not JSON
    except FileNotFoundError:
        raise UserError(f"the jobs file {path} does not exist") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save it as UTF-8 JSON Lines (one JSON object per line)") from None
    except OSError as e:
        raise UserError(f"cannot read the jobs file {path}: {e.strerror or type(e).__name__}") from None

    tokenizer = None if defaults.base_model else load_tokenizer()
    checked: dict[Path, str | None] = {}  # photo -> its problem (None: fine); each file is decoded once
    jobs: list[Job] = []
    failed: list[Outcome] = []
    ids: dict[str, int] = {}  # casefolded, as on case-insensitive file systems -> the line that has it
    files: dict[str, tuple[int, str]] = {}  # casefolded output name -> (line, id) of the job that writes it
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        job_id = None
        try:
            entry = parse_line(raw)
            job_id = read_id(entry, number)
            if job_id.casefold() in ids:
                raise JobError(f"the id {job_id!r} is already used by line {ids[job_id.casefold()]}; ids must be "
                               "unique")
            ids[job_id.casefold()] = number
            check_keys(entry)
            job = build_job(entry, number, job_id, path.parent, out_dir, defaults, tokenizer, checked)
            for file in job.files:
                if file.name.casefold() in files:
                    other_line, other_id = files[file.name.casefold()]
                    raise JobError(f"its output {file.name} is also written by line {other_line} (id {other_id!r}); "
                                   "choose another id")
            files.update({file.name.casefold(): (number, job_id) for file in job.files})
            jobs.append(job)
        except JobError as e:
            failed.append(Outcome(number, job_id, "failed", error=str(e)))
    return jobs, failed


def parse_line(raw: str) -> dict:
    """One line -> its JSON object."""
    try:
        entry = json.loads(raw, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise JobError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(entry, dict):
        raise JobError(f'each line must be one JSON object like {{"prompt": ..., "images": [...]}}, got a '
                       f"{type(entry).__name__}")
    return entry


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json's object hook: a key given twice is a mistake (json would silently keep the last)."""
    entry = {}
    for key, value in pairs:
        if key in entry:
            raise JobError(f"the key {key!r} appears twice")
        entry[key] = value
    return entry


def check_keys(entry: dict) -> None:
    """A typo in a key is an error, never silently ignored."""
    for key in entry:
        if key not in JOB_KEYS:
            close = difflib.get_close_matches(key, JOB_KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise JobError(f"unknown key {key!r}: {hint}the keys are {', '.join(JOB_KEYS)}")


def read_id(entry: dict, line: int) -> str:
    value = entry.get("id")
    if value is None:
        return str(line)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise JobError('"id" must be text or a whole number')
    job_id = str(value)
    if not ID_PATTERN.fullmatch(job_id):
        raise JobError(f"the id {_short(job_id)} cannot be a file name: use letters, digits, '_', '-' and '.' "
                       "(up to 100, starting with a letter or digit)")
    return job_id


def build_job(entry: dict, line: int, job_id: str, folder: Path, out_dir: Path, defaults: argparse.Namespace,
              tokenizer, checked: dict[Path, str | None]) -> Job:
    """A checked `Job` from one line's object (see `read_jobs`)."""
    prompt = entry.get("prompt")
    if prompt is None:
        raise JobError('missing "prompt": the scene, with `img` after each subject word')
    if not isinstance(prompt, str):
        raise JobError('"prompt" must be text')
    photos = photo_paths(entry.get("images"), folder)
    settings = job_settings(entry, defaults)
    for group in photos:
        for photo in group:
            if photo not in checked:
                checked[photo] = photo_problem(photo, folder)
            if checked[photo]:
                raise JobError(checked[photo])
    try:
        request = request_from_args(settings, prompt, photos, settings.alpha)
        if tokenizer is not None:  # counts subjects against `img` markers; photos are only counted here
            validate(request, tokenizer, CLI_LIMITS)
    except ValueError as e:  # GenerationError, an unknown preset
        raise JobError(str(e)) from None
    return Job(line, job_id, photos, request, settings, output_paths(str(out_dir / job_id), request.num_images))


def photo_paths(images, folder: Path) -> list[list[Path]]:
    """A job's "images" -> per subject, its photo files (relative names are in the jobs file's folder)."""
    if images is None:
        raise JobError('missing "images": a list with one photo (or a list of photos) per subject')
    if not isinstance(images, list) or not images:
        raise JobError('"images" must be a list with one entry per subject, e.g. ["me.jpg"] or '
                       '[["me1.jpg", "me2.jpg"], "you.jpg"]')
    groups = []
    for k, item in enumerate(images, start=1):
        names = item if isinstance(item, list) else [item]
        if not names or not all(isinstance(name, str) and name.strip() for name in names):
            raise JobError(f'"images" entry {k} must be a file name or a list of file names')
        groups.append([folder / Path(name).expanduser() for name in names])
    return groups


def photo_problem(path: Path, folder: Path) -> str | None:
    """Why `path` cannot be a reference photo, or None."""
    if not path.is_file():
        return f"photo {path} was not found (relative paths start from the jobs file's folder, {folder})"
    try:
        load_image(path, name=f"photo {path}")
    except ImageError as e:
        return str(e)
    return None


def job_settings(entry: dict, defaults: argparse.Namespace) -> argparse.Namespace:
    """The generation flags with the job's own values in their place (a null value keeps the default).

    A job's own preset chooses sampler, steps and caching afresh (not the command's --steps and co.), and the
    job's own "steps", "scheduler" and "cache_interval" still win over it.
    """
    settings = argparse.Namespace(**vars(defaults))
    given = {key: value for key, value in entry.items() if key in SETTING_KEYS and value is not None}
    if "preset" in given:
        settings.scheduler = settings.steps = settings.cache_interval = None
    for key, value in given.items():
        attr, kind = SETTING_KEYS[key]
        value = _typed(key, value, kind)
        setattr(settings, attr, not value if key == "face_crop" else value)
    return settings


def _typed(key: str, value, kind: str):
    """`value` when it is of JSON type `kind`, else a JobError. Never coerced: "20" and 2.5 steps are mistakes."""
    if kind == "whole" and isinstance(value, float) and value.is_integer():
        value = int(value)
    ok = {
        "whole": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "text": isinstance(value, str),
        "bool": isinstance(value, bool),
    }[kind]
    if not ok:
        wanted = {"whole": "a whole number", "number": "a number", "text": "text", "bool": "true or false"}[kind]
        raise JobError(f'"{key}" must be {wanted}, got {_short(value)}')
    return value.strip().lower() if key == "preset" else value


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


# 2. Resuming


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
        "cache_interval": int(r.cache_interval),
        "photos_per_subject": [len(group) for group in job.photos],
    }
    if r.seed != -1:
        want["seed"] = int(r.seed)
    if job.settings.height is not None:
        want["height"] = int(r.height)
    if job.settings.width is not None:
        want["width"] = int(r.width)
    return want


# 3. Running a share


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
        return Outcome(job.line, job.id, "failed", error=str(e) or type(e).__name__)
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
    # The main process loads first: a first run may download or convert the weights into the shared cache.
    with state.main_process_first():
        pipe = load_model(replace_namespace(defaults, device=process_device(defaults.device, state))) if share \
            else None
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


# 4. Processes


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


# 5. The command


def run_batch(args: argparse.Namespace) -> int:
    """`python -m fastcomposer batch`: 0 when every job was made or skipped, 2 when some failed."""
    from accelerate.utils import broadcast_object_list

    from .lora import parse_lora_spec

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
        raise UserError(str(e)) from None
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output {out_dir} is a file; give a folder (it is made if needed)")
    state = process_state(args.device)
    main = state.is_main_process

    # 2. Every line, checked before the model loads, so a file of bad jobs fails in seconds
    jobs, outcomes = read_jobs(Path(args.jobs), out_dir, defaults)
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
    return broadcast_object_list([code])[0]


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
            "face_crop": not defaults.no_face_crop, "safety_checker": not defaults.no_safety_checker,
            "identity_check": defaults.identity_check, "weights": defaults.weights, "base_model": defaults.base_model,
            "image_encoder": defaults.image_encoder, "lora": defaults.lora, "device": defaults.device,
            "dtype": defaults.dtype,
        },
        "jobs": entries,
    }
