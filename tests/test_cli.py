"""The command line contract (DESIGN section 5), end to end on tiny weights."""

from __future__ import annotations

import builtins
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from fastcomposer.commands.main import main
from fastcomposer.config import DEFAULT_NEGATIVE_PROMPT
from fastcomposer.generation.metadata import read_record

from .reference import original_generate

ROOT = Path(__file__).resolve().parents[1]
ASTRONAUT = str(ROOT / "assets" / "astronaut.png")
HOPPER = str(ROOT / "assets" / "grace_hopper.jpg")
TINY = ["--weights", "tiny", "--device", "cpu", "--no-safety-checker", "--steps", "2", "--height", "64",
        "--width", "64"]


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_writes_a_png_with_the_seed_and_settings(tmp_path, capsys):
    code, out, _ = run(["generate", "--prompt", "a woman img in space", "--image", ASTRONAUT, "--output",
                        str(tmp_path / "out.png"), "--no-face-crop", "--alpha", "0.6", *TINY], capsys)
    assert code == 0
    seed = int(out.split("seed: ")[1].split()[0])
    record = read_record(tmp_path / "out.png")
    assert record.seed == seed and 0 <= seed < 2**31
    assert (record.alpha, record.num_inference_steps, record.scheduler, record.width) == (0.6, 2, "pndm", 64)
    assert record.prompt == "a woman img in space" and record.negative_prompt == DEFAULT_NEGATIVE_PROMPT
    assert record.face_crop is False and record.model.startswith("tiny")
    assert PIL.Image.open(tmp_path / "out.png").size == (64, 64)


def test_seed_reproduces_and_several_images_get_numbered(tmp_path, capsys):
    common = ["generate", "--prompt", "a woman img and a man img", "--image", ASTRONAUT, "--image", HOPPER,
              "--seed", "123", "--num-images", "2", "--negative-prompt", "", *TINY]
    assert run([*common, "--output", str(tmp_path / "a.png")], capsys)[0] == 0
    assert run([*common, "--output", str(tmp_path / "b.png")], capsys)[0] == 0
    for k in range(2):
        a, b = (np.array(PIL.Image.open(tmp_path / f"{x}_{k}.png")) for x in "ab")
        assert np.array_equal(a, b)
        record = read_record(tmp_path / f"a_{k}.png")
        assert (record.seed, record.image_index, record.num_images, record.negative_prompt) == (123, k, 2, "")
    assert not (tmp_path / "a.png").exists()


def test_face_crop_is_on_by_default(tmp_path, capsys):
    code, _, err = run(["generate", "--prompt", "a woman img", "--image", ASTRONAUT, "--output",
                        str(tmp_path / "o.png"), *TINY], capsys)
    assert code == 0, err
    assert read_record(tmp_path / "o.png").face_crop is True


def test_crop_margin_sets_the_crop_and_is_recorded(tmp_path, capsys):
    """`--crop-margin 1.6` equals handing the encoder, uncropped, the crop the face cropper makes at 1.6."""
    from fastcomposer.inputs.faces import DEFAULT_MARGIN, crop_subject
    from fastcomposer.inputs.images import load_image

    common = ["generate", "--prompt", "a woman img", "--seed", "5", "--negative-prompt", "", *TINY]
    crop = crop_subject(load_image(ASTRONAUT), margin=1.6).image
    crop.save(tmp_path / "crop.png")
    for name, extra in (("default", ["--image", ASTRONAUT]), ("tight", ["--image", ASTRONAUT, "--crop-margin", "1.6"]),
                        ("by-hand", ["--image", str(tmp_path / "crop.png"), "--no-face-crop"])):
        code, _, err = run([*common, *extra, "--output", str(tmp_path / f"{name}.png")], capsys)
        assert code == 0, err
    pixels = {name: np.asarray(PIL.Image.open(tmp_path / f"{name}.png")) for name in ("default", "tight", "by-hand")}
    assert np.array_equal(pixels["tight"], pixels["by-hand"])
    assert not np.array_equal(pixels["tight"], pixels["default"])
    assert read_record(tmp_path / "tight.png").crop_margin == 1.6
    assert read_record(tmp_path / "default.png").crop_margin == DEFAULT_MARGIN
    assert read_record(tmp_path / "by-hand.png").crop_margin is None  # whole photos: no crop to describe
    assert "Crop margin: 1.6" in PIL.Image.open(tmp_path / "tight.png").info["parameters"]


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (lambda d: str(d / "missing.png"), [], "missing.png could not be found; check the path"),
        (lambda d: (d / "notes.png").write_text("hello") and str(d / "notes.png"), [], "not a supported image"),
        (lambda d: ASTRONAUT, ["--prompt", "a man img and a woman img"], "2 subject(s) in the prompt but 1 photo"),
        (lambda d: ASTRONAUT, ["--prompt", "a man img and a woman img"], "add an --image or remove an `img`"),
        (lambda d: ASTRONAUT, ["--steps", "0"], "--steps must be a whole number"),
        (lambda d: ASTRONAUT, ["--prompt", "a man img img"], "img img"),
        (lambda d: ASTRONAUT, ["--weights", "/nonexistent/model.bin"], "does not exist"),
        (lambda d: ASTRONAUT, ["--alpha", "1.5"], "--alpha must be between 0 and 1"),
        (lambda d: ASTRONAUT, ["--scheduler", "magic"], "invalid choice"),
        (lambda d: ASTRONAUT, ["--crop-margin", "5"], "--crop-margin must be from 1.4 (a tight face) to 3.2"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, make, extra, message):
    image = make(tmp_path)
    output = str(tmp_path / "o.png")
    args = ["generate", "--prompt", "a woman img", "--image", image, "--output", output, *TINY, *extra]
    code, out, err = run(args, capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def image_error(args_image: str, tmp_path, capsys, extra: tuple[str, ...] = ()) -> str:
    """Run `generate` with `--image args_image`; it must fail as a user error with one line. Returns that line."""
    args = ["generate", "--prompt", "a woman img", "--image", args_image, "--output", str(tmp_path / "o.png"),
            *TINY, *extra]
    code, _, err = run(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o.png").exists()
    assert "upload" not in err, "the command line has no uploads"
    return err.strip()


def test_a_missing_image_names_the_path_and_says_to_check_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = image_error("holiday/missing.png", tmp_path, capsys)
    assert err == "error: --image holiday/missing.png could not be found; check the path"


def test_a_folder_given_as_an_image(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    err = image_error(str(tmp_path / "photos"), tmp_path, capsys)
    assert f"--image {tmp_path / 'photos'} is a folder, not an image file" in err and "check the path" in err


def test_an_unreadable_image_names_the_path_and_the_permissions(tmp_path, capsys, monkeypatch):
    """A photo the user may not read. chmod 000 denies everyone but root, whose CAP_DAC_OVERRIDE ignores mode
    bits (and a folder without search permission does not stop root either). So when this process can still
    read the file after chmod 000, the kernel's answer for an ordinary user is reproduced: `open` raises
    PermissionError (errno 13) for that one path, exactly as it would without the capability."""
    photo = tmp_path / "private.png"
    shutil.copy(ASTRONAUT, photo)
    photo.chmod(0)
    try:
        if os.access(photo, os.R_OK):  # running as root
            real_open = builtins.open

            def denying_open(file, *args, **kwargs):
                if isinstance(file, (str, os.PathLike)) and os.fspath(file) == str(photo):
                    raise PermissionError(13, "Permission denied", str(photo))
                return real_open(file, *args, **kwargs)

            monkeypatch.setattr(builtins, "open", denying_open)
        err = image_error(str(photo), tmp_path, capsys)
    finally:
        photo.chmod(0o600)
    assert err.startswith(f"error: --image {photo} cannot be read (permission denied)")
    assert "check the file's permissions" in err


def test_no_face_names_the_path_and_the_flag(tmp_path, capsys):
    wall = tmp_path / "wall.png"
    PIL.Image.new("RGB", (300, 300), (200, 190, 180)).save(wall)
    err = image_error(str(wall), tmp_path, capsys)
    assert f"No face found in --image {wall}" in err and "--no-face-crop" in err and "face_crop=" not in err


def test_cli_reproduces_the_original_implementation(tmp_path, photos):
    """A released-layout checkpoint + its configs through `python -m fastcomposer`, against spec code."""
    from fastcomposer.models.architecture import build_modules, tiny_architecture
    from fastcomposer.models.testing import released_state_dict, write_model_folders
    from fastcomposer.pipeline.loading import load_pipeline

    arch = tiny_architecture()
    torch.save(released_state_dict(build_modules(arch, empty=False, seed=2)), tmp_path / "pytorch_model.bin")
    write_model_folders(arch, tmp_path / "base", tmp_path / "clip")
    photo = tmp_path / "hopper.png"
    photos["hopper"].save(photo)
    args = ["--weights", str(tmp_path / "pytorch_model.bin"), "--base-model", str(tmp_path / "base"),
            "--image-encoder", str(tmp_path / "clip")]
    result = subprocess.run(
        [sys.executable, "-m", "fastcomposer", "generate", "--prompt", "a woman img reading", "--image", str(photo),
         "--output", str(tmp_path / "cli.png"), "--seed", "9", "--steps", "6", "--guidance", "5", "--alpha", "0.7",
         "--negative-prompt", "", "--scheduler", "pndm", "--no-face-crop", "--no-safety-checker", "--device", "cpu",
         "--height", "64", "--width", "64",
         "--dtype", "fp32", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "FASTCOMPOSER_CACHE": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr
    assert "seed: 9" in result.stdout
    ours = np.array(PIL.Image.open(tmp_path / "cli.png"))
    pipe = load_pipeline(tmp_path / "pytorch_model.bin", device="cpu", dtype="fp32", safety_checker=False,
                         base_model=tmp_path / "base", image_encoder=tmp_path / "clip", cache_converted=False)
    ref = original_generate(pipe, "a woman img reading", [PIL.Image.open(photo)], "", 6, 5.0, 0.7, 1, 9,
                            64, 64)[0]
    assert ours.shape == ref.shape == (64, 64, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


def test_several_photos_per_subject(tmp_path, capsys):
    """--image A,A equals --image A; --image A,B differs from both."""
    base = ["generate", "--prompt", "a woman img reading", "--seed", "5", "--no-face-crop", *TINY, "--dtype", "fp32"]
    outputs = {}
    for name, value in (("a", ASTRONAUT), ("aa", f"{ASTRONAUT},{ASTRONAUT}"), ("ab", f"{ASTRONAUT},{HOPPER}"),
                        ("b", HOPPER)):
        code, _, err = run([*base, "--image", value, "--output", str(tmp_path / f"{name}.png")], capsys)
        assert code == 0, err
        outputs[name] = np.array(PIL.Image.open(tmp_path / f"{name}.png"))
    assert np.array_equal(outputs["a"], outputs["aa"])
    assert not np.array_equal(outputs["ab"], outputs["a"]) and not np.array_equal(outputs["ab"], outputs["b"])
    assert read_record(tmp_path / "ab.png").photos_per_subject == [2]


def test_a_file_name_with_a_comma_is_taken_whole(tmp_path, capsys):
    odd = tmp_path / "smith, jane.png"
    PIL.Image.open(ASTRONAUT).save(odd)
    code, _, err = run(["generate", "--prompt", "a woman img", "--image", str(odd), "--output",
                        str(tmp_path / "o.png"), "--no-face-crop", *TINY], capsys)
    assert code == 0, err
    assert read_record(tmp_path / "o.png").photos_per_subject == [1]


def test_preset_and_explicit_flags(tmp_path, capsys):
    common = ["generate", "--prompt", "a woman img", "--image", ASTRONAUT, "--no-face-crop", "--seed", "1",
              "--weights", "tiny", "--device", "cpu", "--no-safety-checker", "--height", "64", "--width", "64"]
    assert run([*common, "--preset", "fast", "--output", str(tmp_path / "f.png")], capsys)[0] == 0
    record = read_record(tmp_path / "f.png")
    assert (record.scheduler, record.num_inference_steps, record.cache_interval, record.preset) == ("dpm", 20, 3,
                                                                                                     "fast")
    assert run([*common, "--preset", "fast", "--steps", "3", "--cache-interval", "1", "--scheduler", "euler",
                "--output", str(tmp_path / "o.png")], capsys)[0] == 0
    record = read_record(tmp_path / "o.png")
    assert (record.scheduler, record.num_inference_steps, record.cache_interval) == ("euler", 3, 1)
    # No preset: the original's sampler; a lone --scheduler dpm keeps its own 25-step default.
    assert run([*common, "--scheduler", "dpm", "--output", str(tmp_path / "d.png")], capsys)[0] == 0
    assert read_record(tmp_path / "d.png").num_inference_steps == 25


def test_attention_maps_are_written_beside_each_image(tmp_path, capsys):
    code, out, err = run(["generate", "--prompt", "a woman img and a man img", "--image", ASTRONAUT, "--image",
                          HOPPER, "--num-images", "2", "--attention-maps", "--output", str(tmp_path / "x.png"),
                          *TINY], capsys)
    assert code == 0, err
    for k in range(2):
        attn = tmp_path / f"x_{k}_attn.png"
        assert str(attn) in out
        image, overlay = PIL.Image.open(tmp_path / f"x_{k}.png"), PIL.Image.open(attn)
        assert overlay.width == image.width and overlay.height > image.height  # the legend strip


def test_alpha_sweep_cells_equal_single_runs(tmp_path, capsys):
    common = ["generate", "--prompt", "a woman img reading", "--image", ASTRONAUT, "--seed", "21", *TINY]
    code, out, err = run([*common, "--alpha", "0.5,0.8", "--output", str(tmp_path / "s.png")], capsys)
    assert code == 0, err
    assert (tmp_path / "s_grid.png").is_file() and "seed: 21" in out
    for alpha in ("0.5", "0.8"):
        assert run([*common, "--alpha", alpha, "--output", str(tmp_path / f"one{alpha}.png")], capsys)[0] == 0
        cell = np.array(PIL.Image.open(tmp_path / f"s_alpha{float(alpha):.2f}.png"))
        assert np.array_equal(cell, np.array(PIL.Image.open(tmp_path / f"one{alpha}.png")))
        assert read_record(tmp_path / f"s_alpha{float(alpha):.2f}.png").alpha == float(alpha)
    grid = PIL.Image.open(tmp_path / "s_grid.png")
    assert grid.width > 2 * 64  # two cells side by side


def test_alpha_sweep_with_a_random_seed_uses_one_seed(tmp_path, capsys):
    code, out, err = run(["generate", "--prompt", "a woman img", "--image", ASTRONAUT, "--alpha", "0.6,0.7",
                          "--num-images", "2", "--output", str(tmp_path / "r.png"), *TINY], capsys)
    assert code == 0, err
    seeds = {read_record(tmp_path / f"r_alpha{a}_{k}.png").seed for a in ("0.60", "0.70") for k in range(2)}
    assert len(seeds) == 1 and f"seed: {seeds.pop()}" in out
