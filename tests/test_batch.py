"""`python -m fastcomposer batch` (DESIGN section 5.1) on tiny weights: outputs, resume, bad lines, processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from fastcomposer.commands import batch
from fastcomposer.commands.main import main
from fastcomposer.generation.metadata import read_record
from fastcomposer.inputs import faces
from fastcomposer.pipeline.loading import pick_device

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--weights", "tiny", "--device", "cpu", "--dtype", "fp32", "--no-safety-checker"]
DEFAULTS = ["--steps", "2", "--height", "64", "--width", "64", "--no-face-crop"]

# Each job beside the `generate` flags that ask for the same thing, written out by hand: the reference run.
# Batch's command line gives the defaults DEFAULTS; the reference spells out what applies to each job.
JOBS = [
    ({"prompt": "a woman img in space", "images": ["astronaut.png"], "seed": 11},
     ["--prompt", "a woman img in space", "--image", "astronaut.png", "--seed", "11", "--steps", "2",
      "--height", "64", "--width", "64", "--no-face-crop"]),
    ({"id": "pair", "prompt": "a woman img and a man img", "images": ["astronaut.png", "hopper.jpg"], "seed": 12,
      "alpha": 0.6, "guidance": 4.0},
     ["--prompt", "a woman img and a man img", "--image", "astronaut.png", "--image", "hopper.jpg", "--seed", "12",
      "--alpha", "0.6", "--guidance", "4.0", "--steps", "2", "--height", "64", "--width", "64", "--no-face-crop"]),
    ({"id": "several", "prompt": "a woman img reading", "images": [["astronaut.png", "hopper.jpg"]], "seed": 13,
      "scheduler": "ddim", "negative_prompt": ""},
     ["--prompt", "a woman img reading", "--image", "astronaut.png,hopper.jpg", "--seed", "13", "--scheduler", "ddim",
      "--negative-prompt", "", "--steps", "2", "--height", "64", "--width", "64", "--no-face-crop"]),
    ({"id": "two", "prompt": "a woman img", "images": ["astronaut.png"], "num_images": 2, "seed": 14,
      "face_crop": True, "crop_margin": 2.0, "height": 128},
     ["--prompt", "a woman img", "--image", "astronaut.png", "--num-images", "2", "--seed", "14", "--steps", "2",
      "--height", "128", "--width", "64", "--crop-margin", "2.0"]),
    # A job's own preset chooses the steps afresh (the command's --steps 2 does not apply); its "steps" still win.
    ({"id": 7, "prompt": "a man img", "images": ["hopper.jpg"], "preset": "fast", "steps": 3, "seed": 15},
     ["--prompt", "a man img", "--image", "hopper.jpg", "--preset", "fast", "--steps", "3", "--seed", "15",
      "--height", "64", "--width", "64", "--no-face-crop"]),
    # Layout: a box for the first subject, the second free, kept apart
    ({"id": "placed", "prompt": "a woman img and a man img", "images": ["astronaut.png", "hopper.jpg"], "seed": 16,
      "boxes": [[0, 0, 0.5, 1], None], "separate": True},
     ["--prompt", "a woman img and a man img", "--image", "astronaut.png", "--image", "hopper.jpg", "--seed", "16",
      "--box", "0,0,0.5,1", "--box", "-", "--separate", "--steps", "2", "--height", "64", "--width", "64",
      "--no-face-crop"]),
    # The face pass, with its own strength
    ({"id": "faces", "prompt": "a woman img", "images": ["astronaut.png"], "seed": 17, "detail_faces": True,
      "detail_strength": 0.5},
     ["--prompt", "a woman img", "--image", "astronaut.png", "--seed", "17", "--detail-faces", "0.5", "--steps", "2",
      "--height", "64", "--width", "64", "--no-face-crop"]),
    # No seed anywhere: a random one, recorded (the reference is given it below)
    ({"prompt": "a man img smiling", "images": ["hopper.jpg"]},
     ["--prompt", "a man img smiling", "--image", "hopper.jpg", "--steps", "2", "--height", "64", "--width", "64",
      "--no-face-crop"]),
]


@pytest.fixture(scope="module", autouse=True)
def offline_faces_one_thread():
    """The offline face detector (nothing tries to download RetinaFace), and one CPU thread.

    Float sums in another order can move a pixel by one level, so every run here uses the one thread torchrun
    gives each process of the multi-process run, whose pixels are compared with these.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(faces.DETECTOR_ENV, "opencv")
        yield
    torch.set_num_threads(threads)


def write_jobs(folder: Path, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in (("astronaut.png", "astronaut.png"), ("hopper.jpg", "grace_hopper.jpg")):
        if not (folder / name).exists():
            shutil.copy(ROOT / "assets" / source, folder / name)
    path = folder / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_batch(jobs: Path, out: Path, capsys, *extra: str) -> tuple[int, str, str]:
    code = main(["batch", str(jobs), "--output", str(out), *MODEL, *DEFAULTS, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def pixels(path: Path) -> np.ndarray:
    return np.array(PIL.Image.open(path))


def job_ids() -> list[str]:
    """The ids the JOBS file gives: an explicit one, else the line number (line 1 is a comment, line 2 blank)."""
    return [str(job.get("id", k + 3)) for k, (job, _) in enumerate(JOBS)]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The JOBS file run once by one process: (jobs file, output folder, summary)."""
    folder = tmp_path_factory.mktemp("batch")
    lines = ["# ids default to the line number", "", *(json.dumps(job) for job, _ in JOBS)]
    jobs = write_jobs(folder / "in", lines)
    out = folder / "out"
    code = main(["batch", str(jobs), "--output", str(out), *MODEL, *DEFAULTS])
    assert code == 0
    return jobs, out, json.loads((out / "summary.json").read_text())


def test_outputs_equal_generate_runs_one_by_one(single_run, tmp_path, capsys):
    jobs, out, summary = single_run
    assert summary["totals"] == {"jobs": len(JOBS), "done": len(JOBS), "skipped": 0, "failed": 0}
    assert list(summary["jobs"]) == job_ids() == ["3", "pair", "several", "two", "7", "placed", "faces", "10"]
    for (job, flags), job_id in zip(JOBS, job_ids()):
        entry = summary["jobs"][job_id]
        n = job.get("num_images", 1)
        names = [f"{job_id}.png"] if n == 1 else [f"{job_id}_{k}.png" for k in range(n)]
        assert entry["status"] == "done" and entry["files"] == names and entry["error"] is None
        assert entry["line"] == JOBS.index((job, flags)) + 3
        records = [read_record(out / name) for name in names]
        assert all(r is not None and r.seed == entry["seed"] for r in records)
        if "seed" in job:
            assert entry["seed"] == job["seed"]

        # The same job through `generate`, with the seed batch used (the random one too)
        seed = [] if "seed" in job else ["--seed", str(entry["seed"])]
        reference = _with_paths(flags, jobs.parent) + seed
        code = main(["generate", *reference, "--output", str(tmp_path / f"{job_id}.png"), *MODEL])
        assert code == 0, capsys.readouterr().err
        capsys.readouterr()
        for name in names:
            assert np.array_equal(pixels(out / name), pixels(tmp_path / name)), name
            assert asdict(read_record(out / name)) == asdict(read_record(tmp_path / name))
    assert read_record(out / "two_0.png").face_crop is True and read_record(out / "3.png").face_crop is False
    assert read_record(out / "two_0.png").crop_margin == 2.0 and read_record(out / "3.png").crop_margin is None
    assert (read_record(out / "7.png").scheduler, read_record(out / "7.png").num_inference_steps) == ("dpm", 3)
    assert read_record(out / "7.png").cache_interval == 3
    assert read_record(out / "several.png").photos_per_subject == [2]
    placed = read_record(out / "placed.png")
    assert placed.boxes == [[0.0, 0.0, 0.5, 1.0], None] and placed.separate is True
    assert read_record(out / "3.png").boxes is None and read_record(out / "3.png").separate is False
    assert (read_record(out / "faces.png").detail_faces, read_record(out / "faces.png").detail_strength) == (True, 0.5)
    assert not list(out.glob(".*")), "no temporary or partial files are left"


def _with_paths(flags: list[str], folder: Path) -> list[str]:
    """generate's flags with each --image value's photos made absolute."""
    out = list(flags)
    for k, flag in enumerate(flags):
        if flag == "--image":
            out[k + 1] = ",".join(str(folder / name) for name in flags[k + 1].split(","))
    return out


def test_a_second_run_skips_everything_and_a_deleted_output_is_made_again(tmp_path, capsys, monkeypatch):
    lines = [json.dumps({"id": "a", "prompt": "a woman img", "images": ["astronaut.png"], "seed": 1}),
             json.dumps({"id": "b", "prompt": "a man img", "images": ["hopper.jpg"], "seed": 2, "num_images": 2})]
    jobs = write_jobs(tmp_path / "in", lines)
    out = tmp_path / "out"
    assert run_batch(jobs, out, capsys)[0] == 0
    files = ["a.png", "b_0.png", "b_1.png"]
    before = {name: (out / name).stat().st_mtime_ns for name in files}

    # 1. Everything is there: nothing runs, not even the model load
    def no_model(args):
        raise AssertionError("the model was loaded although every job was done")

    with monkeypatch.context() as mp:
        mp.setattr(batch, "load_model", no_model)
        code, out_text, _ = run_batch(jobs, out, capsys)
    assert code == 0 and out_text.startswith("0 done, 2 skipped, 0 failed")
    summary = json.loads((out / "summary.json").read_text())
    assert {k: (v["status"], v["seed"], v["files"]) for k, v in summary["jobs"].items()} == {
        "a": ("skipped", 1, ["a.png"]), "b": ("skipped", 2, ["b_0.png", "b_1.png"])}
    assert {name: (out / name).stat().st_mtime_ns for name in files} == before

    # 2. One image of a two-image job is gone: that job (both images, one seed) runs again, the other does not
    gone = pixels(out / "b_1.png")
    (out / "b_1.png").unlink()
    assert run_batch(jobs, out, capsys)[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["jobs"]["a"]["status"], summary["jobs"]["b"]["status"]) == ("skipped", "done")
    assert (out / "a.png").stat().st_mtime_ns == before["a.png"]
    assert np.array_equal(pixels(out / "b_1.png"), gone)

    # 3. An edited line is not "done" just because its file exists: its images are made again
    jobs.write_text(lines[0].replace("a woman img", "a woman img smiling") + "\n" + lines[1] + "\n")
    assert run_batch(jobs, out, capsys)[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["jobs"]["a"]["status"], summary["jobs"]["b"]["status"]) == ("done", "skipped")
    assert read_record(out / "a.png").prompt == "a woman img smiling"

    # 4. A PNG without our settings (someone else's file under that name) does not count as done either
    PIL.Image.new("RGB", (64, 64)).save(out / "a.png")
    assert run_batch(jobs, out, capsys)[0] == 0
    assert json.loads((out / "summary.json").read_text())["jobs"]["a"]["status"] == "done"
    assert read_record(out / "a.png") is not None


def test_a_write_cut_short_leaves_no_file_that_counts_as_done(tmp_path, capsys, monkeypatch):
    jobs = write_jobs(tmp_path / "in", [json.dumps({"id": "a", "prompt": "a woman img", "images": ["astronaut.png"],
                                                    "seed": 1})])
    out = tmp_path / "out"

    def killed(image, path, record):  # half the bytes, then the process "dies"
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as mp:
        mp.setattr(batch, "save_png", killed)
        code, _, err = run_batch(jobs, out, capsys)
    assert code == 2 and "line 1 (id a): [Errno 28] No space left on device" in err
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]  # no a.png, no partial left behind
    assert run_batch(jobs, out, capsys)[0] == 0
    assert json.loads((out / "summary.json").read_text())["jobs"]["a"]["status"] == "done"


def test_bad_lines_are_reported_with_their_line_and_the_good_jobs_still_run(tmp_path, capsys):
    good = {"prompt": "a woman img", "images": ["astronaut.png"], "seed": 1}
    lines = [
        json.dumps({**good, "id": "good"}),  # 1
        '{"prompt": "a woman img", "images": ["astronaut.png"],',  # 2: cut short
        json.dumps({**good, "images": ["nowhere.png"]}),  # 3
        json.dumps({**good, "prompt": "a woman img and a man img"}),  # 4: two markers, one photo
        json.dumps({**good, "sed": 4}),  # 5: a typo
        json.dumps({**good, "steps": "20"}),  # 6: a string where a number belongs
        json.dumps({**good, "id": "good"}),  # 7: the id of line 1 again
        json.dumps({**good, "id": "../escape"}),  # 8
        json.dumps({"images": ["astronaut.png"]}),  # 9
        json.dumps({**good, "id": "later"}),  # 10
    ]
    jobs = write_jobs(tmp_path / "in", lines)
    code, out_text, err = run_batch(jobs, tmp_path / "out", capsys)
    assert code == 2
    expected = {
        2: "not valid JSON", 3: "nowhere.png was not found", 4: "2 subject(s) in the prompt but 1 photo(s)",
        5: "unknown key 'sed': did you mean 'seed'?", 6: '"steps" must be a whole number, got "20"',
        7: "the id 'good' is already used by line 1", 8: "cannot be a file name", 9: 'missing "prompt"',
    }
    err_lines = err.splitlines()
    for line, reason in expected.items():
        assert sum(text.startswith(f"line {line}") and reason in text for text in err_lines) == 1, (line, err)
    assert "Traceback" not in err and "failed, on line(s) 2, 3, 4, 5, 6, 7, 8, 9" in err
    assert out_text.startswith("2 done, 0 skipped, 8 failed")

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    entries = {entry["line"]: entry for entry in summary["jobs"].values()}
    assert sorted(entries) == list(range(1, 11)) and summary["totals"]["failed"] == 8
    for line, reason in expected.items():
        assert entries[line]["status"] == "failed" and reason in entries[line]["error"]
    assert summary["jobs"]["good"]["status"] == summary["jobs"]["later"]["status"] == "done"
    # keyed by id where one was read; by line where none could be (bad JSON, a repeated or unsafe id)
    assert {"3", "4", "5", "6", "9", "line 2", "line 7", "line 8"} <= set(summary["jobs"])
    assert (tmp_path / "out" / "good.png").is_file() and (tmp_path / "out" / "later.png").is_file()


def test_a_file_of_bad_jobs_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    jobs = write_jobs(tmp_path / "in", ['{"prompt": "a woman img", "images": ["missing.png"]}', "[1, 2]"])

    def no_model(args):
        raise AssertionError("the model was loaded for a file without a single good job")

    monkeypatch.setattr(batch, "load_model", no_model)
    code, _, err = run_batch(jobs, tmp_path / "out", capsys)
    assert code == 2 and "line 2: each line must be one JSON object" in err
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["totals"]["failed"] == 2


@pytest.mark.parametrize(
    ("setup", "extra", "message"),
    [
        (lambda d: d / "absent.jsonl", [], "does not exist"),
        (lambda d: (d / "j.jsonl").write_bytes(b"\xff\xfe{") and d / "j.jsonl", [], "not UTF-8"),
        (lambda d: (d / "j.jsonl").write_text("# nothing\n\n") and d / "j.jsonl", [], "has no jobs"),
        (lambda d: (d / "j.jsonl").write_text("{}\n") and d / "j.jsonl", ["--alpha", "0.5,0.7"], "one --alpha"),
        (lambda d: (d / "j.jsonl").write_text("{}\n") and d / "j.jsonl", ["--lora", "x.safetensors:nan"],
         "--lora x.safetensors:nan: the scale must be a finite number"),
    ],
)
def test_a_file_that_cannot_be_read_is_one_clean_error(tmp_path, capsys, setup, extra, message):
    code, _, err = run_batch(setup(tmp_path), tmp_path / "out", capsys, *extra)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")


def test_pick_device_takes_one_gpu_of_several(monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="0 CUDA GPU"):
            pick_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="2 CUDA GPU"):
        pick_device("cuda:2")
    with pytest.raises(ValueError, match="unknown .device"):
        pick_device("cuda:one")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_split_the_jobs_and_write_what_one_process_writes(single_run, tmp_path):
    """`accelerate launch` with two CPU processes (gloo) on the same file: each job once, the same pixels.

    `accelerate launch --cpu` starts one process whatever --num_processes says (its multi-CPU mode needs
    mpirun); `--multi_gpu` starts them with torchrun, and batch's `--device cpu` joins them on gloo.
    """
    jobs, single_out, single_summary = single_run
    out = tmp_path / "out"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT), faces.DETECTOR_ENV: "opencv",
           "OMP_NUM_THREADS": "1"}  # as the single-process run (see `offline_faces_one_thread`)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "fastcomposer",
               "batch", str(jobs), "--output", str(out), *MODEL, *DEFAULTS]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("summary.json") == 1  # only the main process reports

    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and list(summary["jobs"]) == list(single_summary["jobs"])
    assert summary["totals"] == single_summary["totals"]
    assert {entry["process"] for entry in summary["jobs"].values()} == {0, 1}  # really split
    written = sorted(p.name for p in out.iterdir())
    listed = sorted(name for entry in summary["jobs"].values() for name in entry["files"])
    assert written == sorted([*listed, "summary.json"]) and len(listed) == len(set(listed))
    for job_id, entry in summary["jobs"].items():
        if job_id == "10":  # the random-seed job: another seed, so other pixels; its seed is still recorded
            assert read_record(out / "10.png").seed == entry["seed"]
            continue
        assert entry["seed"] == single_summary["jobs"][job_id]["seed"]
        for name in entry["files"]:
            assert np.array_equal(pixels(out / name), pixels(single_out / name)), name
