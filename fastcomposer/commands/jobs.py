"""The jobs file of `python -m fastcomposer batch`: one JSON object per line, each checked before any model work.

    {"id": "hike", "prompt": "a man img and a woman img hiking", "images": ["man.jpg", ["w1.jpg", "w2.jpg"]],
     "seed": 7, "alpha": 0.7}

`prompt` and `images` (one entry per subject, in marker order; an inner list is several photos of one
subject) are needed; every other key replaces one of the command's generation flags for that job. Photo
paths are relative to the file's folder. Blank lines and lines starting with `#` are skipped.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import DETAIL
from ..generation.run import GenerationRequest, validate
from ..inputs.images import ImageError, load_image
from .options import CLI_LIMITS, UserError, output_paths, request_from_args

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
    "crop_margin": ("crop_margin", "number"),
    "preset": ("preset", "text"),
    "cache_interval": ("cache_interval", "whole"),
    "boxes": ("box", "list"),  # per subject [x0, y0, x1, y1] or null, as --box is
    "separate": ("separate", "bool"),
    "detail_faces": ("detail_faces", "bool"),  # with "detail_strength", as --detail-faces [STRENGTH]
    "detail_strength": ("detail_strength", "number"),
}
JOB_KEYS = ("id", "prompt", "images", *SETTING_KEYS)
# Safe as a file name on every system: no separators, no "..", no leading dot (our temporary files have one).
ID_PATTERN = re.compile(r"\w[\w.-]{0,99}")


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
class BadLine:
    """A line that cannot run."""

    line: int
    id: str | None  # None when the line's id could not be read
    error: str  # names the problem and the fix


def read_jobs(path: Path, out_dir: Path, defaults: argparse.Namespace) -> tuple[list[Job], list[BadLine]]:
    """Every line of the jobs file, checked: the jobs that can run, and the lines that cannot, with the reason.

    Nothing heavy is loaded: each photo is decoded once to check it and let go, prompts are checked with the
    bundled tokenizer (with --base-model, with the model's own when each job runs).

    Raises:
        `UserError` when the file itself cannot be read.
    """
    from ..inputs.prompt import load_tokenizer

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
    failed: list[BadLine] = []
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
            failed.append(BadLine(number, job_id, str(e)))
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
    # --detail-faces [STRENGTH] is one flag for two keys: None (off) or the strength
    detail = given.get("detail_faces", defaults.detail_faces is not None)
    default_strength = defaults.detail_faces if defaults.detail_faces is not None else DETAIL.strength
    strength = given.get("detail_strength", default_strength)
    settings.detail_faces = float(strength) if detail is True else None
    if "detail_strength" in given and detail is not True:
        raise JobError('"detail_strength" needs "detail_faces": true')
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
        "list": isinstance(value, list),
    }[kind]
    if not ok:
        wanted = {"whole": "a whole number", "number": "a number", "text": "text", "bool": "true or false",
                  "list": "a list, e.g. [[0, 0, 0.5, 1], null]"}[kind]
        raise JobError(f'"{key}" must be {wanted}, got {_short(value)}')
    if key == "boxes":
        for k, box in enumerate(value, start=1):
            if box is not None and not isinstance(box, list):
                raise JobError(f'"boxes" entry {k} must be [x0, y0, x1, y1] (fractions from 0 to 1) or null, got '
                               f"{_short(box)}")
    return value.strip().lower() if key == "preset" else value


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."
