"""The identity check: matching on synthetic embeddings, ArcFace from a file in the release's format, the
offline path through generation, and `generate --identity-check` on the command line."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastcomposer.commands.options import CLI_LIMITS
from fastcomposer.identity import checker as identity
from fastcomposer.identity.checker import (
    ArcFaceWeightsError,
    IdentityReport,
    align_face,
    match_faces,
    mean_embedding,
    subject_names,
)

from .identity_helpers import offline_checker, stand_in_embedder

ROOT = Path(__file__).resolve().parents[1]
ASTRONAUT, HOPPER = ROOT / "assets" / "astronaut.png", ROOT / "assets" / "grace_hopper.jpg"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No test may read a real cache or pinned hash, or leave a process-wide checker behind."""
    monkeypatch.setenv("FASTCOMPOSER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(identity.ARCFACE.sha256_env, raising=False)
    monkeypatch.setattr(identity, "_default_checker", None)


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


# Orthonormal "identities" in 8 dimensions: cosines between them are 0, to themselves 1.
A, B, C = np.eye(8)[0], np.eye(8)[1], np.eye(8)[2]


# --- matching --------------------------------------------------------------------------------------------


def test_a_missing_subject_is_not_found():
    face = unit(0.8 * A + 0.6 * C)  # like subject A (cosine 0.8), unlike B (0)
    report = match_faces(np.stack([face]), [A, B], ["man", "woman"])
    man, woman = report.subjects
    assert man.similarity == pytest.approx(0.8) and man.face == 0
    assert not woman.found and woman.face is None and woman.has_reference
    assert report.num_faces == 1 and report.blended == []
    # One face, two subjects: it is the best match of both, by construction (see IdentityReport).
    assert report.shared_faces == [[0, 1]]
    assert report.summary() == "man 0.80 · woman not found · ⚠ man+woman on one face"


def test_no_face_at_all():
    report = match_faces(np.zeros((0, 8)), [A, B], ["man", "woman"])
    assert report.available and report.num_faces == 0 and not any(s.found for s in report.subjects)
    assert report.summary() == "man not found · woman not found"


def test_a_swapped_pair_still_lands_on_the_right_subjects():
    faces = np.stack([unit(0.3 * A + 0.9 * B + 0.3 * C), unit(0.9 * A + 0.2 * B + 0.4 * C)])  # B's face first
    report = match_faces(faces, [A, B], ["man", "woman"], boxes=[(0, 0, 10, 10), (20, 0, 30, 10)])
    man, woman = report.subjects
    assert (man.face, woman.face) == (1, 0)
    assert man.similarity == pytest.approx(float(faces[1] @ A)) and woman.similarity == pytest.approx(faces[0] @ B)
    assert report.shared_faces == [] and report.blended == [] and report.faces == [(0, 0, 10, 10), (20, 0, 30, 10)]


def test_hungarian_maximises_the_total_where_greedy_would_not():
    # Cosines [[0.6, 0.5], [0.45, 0.05]]: greedy takes 0.6 first and leaves 0.05; the best total pairs 0.5 + 0.45.
    faces = np.stack([[0.6, 0.5, np.sqrt(1 - 0.61), 0, 0, 0, 0, 0], [0.45, 0.05, 0, np.sqrt(1 - 0.205), 0, 0, 0, 0]])
    report = match_faces(faces, [A, B], ["a", "b"])
    assert [s.face for s in report.subjects] == [1, 0]
    assert [s.similarity for s in report.subjects] == pytest.approx([0.45, 0.5])
    assert report.shared_faces == [[0, 1]], "face 0 is still both subjects' best match"


def test_a_blend_is_flagged():
    # Both faces are halfway between A and B: each is closer to the other face than to its own reference.
    f0, f1 = unit(A + B + 0.1 * C), unit(A + B - 0.1 * C)
    report = match_faces(np.stack([f0, f1]), [A, B], ["man", "woman"])
    assert report.blended == [[0, 1]]
    between = float(f0 @ f1)
    assert all(between > s.similarity for s in report.subjects)
    assert report.summary().endswith("⚠ man+woman blended")
    distinct = match_faces(np.stack([unit(A + 0.2 * C), unit(B + 0.2 * C)]), [A, B], ["man", "woman"])
    assert distinct.blended == [] and distinct.shared_faces == []


def test_two_subjects_on_one_face():
    merged, stranger = unit(A + B), unit(C + 0.1 * A)
    report = match_faces(np.stack([stranger, merged]), [A, B], ["man", "woman"])
    assert report.shared_faces == [[0, 1]], "the merged face is the best match of both subjects"
    assert sorted(s.face for s in report.subjects) == [0, 1]  # the assignment itself stays one-to-one
    assert "⚠ man+woman on one face" in report.summary()


def test_a_subject_without_a_reference_face_is_left_out():
    report = match_faces(np.stack([unit(A), unit(B)]), [None, B], ["man", "woman"])
    man, woman = report.subjects
    assert not man.has_reference and not man.found
    assert woman.face == 1 and woman.similarity == pytest.approx(1.0)
    assert report.summary() == "man no reference face · woman 1.00"


def test_several_photos_average_their_unit_embeddings():
    photos = np.array([[3.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0.5, 0.5, 0]])
    units = photos / np.linalg.norm(photos, axis=1, keepdims=True)
    expected = units.sum(axis=0) / np.linalg.norm(units.sum(axis=0))
    assert mean_embedding(photos) == pytest.approx(expected)


def test_report_round_trips_through_json():
    report = match_faces(np.stack([unit(A + B), unit(A + B + 0.01 * C)]), [A, B], ["man", "woman"],
                         boxes=[(1, 2, 3, 4), (5, 6, 7, 8)], detector="opencv")
    back = IdentityReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert back == report and back.summary() == report.summary()
    assert IdentityReport.from_dict({**report.to_dict(), "added_later": 1}) == report


def test_unavailable_summary_is_one_line():
    report = identity.unavailable("no weights; copy x to /y", ["man"])
    assert report.summary() == "identity check unavailable: no weights; copy x to /y"
    assert IdentityReport.from_dict(report.to_dict()) == report


@pytest.mark.parametrize(
    "prompt, count, names",
    [
        ("a man img and a woman img hiking", 2, ["man", "woman"]),
        ("a man img, a man img", 2, ["man#1", "man#2"]),
        ("Einstein's img portrait", 1, ["Einstein's"]),
        ("a man img", 2, ["subject 1", "subject 2"]),
    ],
)
def test_subject_names(prompt, count, names):
    assert subject_names(prompt, count) == names


# --- alignment ---------------------------------------------------------------------------------------------


def test_landmarks_on_the_template_give_the_face_unchanged():
    from facexlib.detection.align_trans import get_reference_facial_points

    from fastcomposer.inputs.faces import DetectedFace

    pixels = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    template = tuple(tuple(float(v) for v in p) for p in get_reference_facial_points(default_square=True))
    aligned = align_face(Image.fromarray(pixels), DetectedFace((0, 0, 112, 112), 0.99, template))
    assert aligned.shape == (112, 112, 3)
    assert np.abs(aligned[2:-2, 2:-2].astype(int) - pixels[2:-2, 2:-2]).max() <= 1  # identity warp


def test_a_box_without_landmarks_is_squared_and_resized():
    from fastcomposer.inputs.faces import DetectedFace

    image = Image.new("RGB", (300, 200), (10, 20, 30))
    image.paste((200, 100, 50), (100, 50, 160, 150))  # a 60x100 "face"
    aligned = align_face(image, DetectedFace((100, 50, 160, 150), None))
    # The square is 100 wide around the box: 20 px of background each side, i.e. 22.4 px at 112.
    expected = np.asarray(image.crop((80, 50, 180, 150)).resize((112, 112), Image.Resampling.BILINEAR))
    assert np.array_equal(aligned, expected)


# --- ArcFace weights in the release's format ------------------------------------------------------------


@pytest.fixture(scope="module")
def arcface_file(tmp_path_factory) -> tuple[Path, str, torch.nn.Module]:
    """A randomly initialised facexlib IR-SE50 saved as the release is: a plain state dict (facexlib's own loader
    reads it with `load_state_dict(torch.load(path), strict=True)`, so its keys have no prefix)."""
    from facexlib.recognition.arcface_arch import Backbone

    torch.manual_seed(0)
    model = Backbone(num_layers=50, drop_ratio=0.6, mode="ir_se").eval()
    path = tmp_path_factory.mktemp("arcface") / identity.ARCFACE.name
    torch.save(model.state_dict(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest(), model


def test_arcface_loads_from_the_release_format(arcface_file):
    path, digest, original = arcface_file
    assert identity.fetch_arcface(path.parent, allow_download=False) == path
    assert (path.parent / f"{path.name}.sha256").read_text().split()[0] == digest, "first hash recorded"
    loaded = identity.load_arcface(path)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(loaded(x), original(x), atol=1e-5)
    assert not any(p.is_meta for p in loaded.parameters())


def test_checker_scores_real_photos_as_computed_by_hand(arcface_file, monkeypatch):
    """Detection, alignment, ArcFace and matching on the bundled photos, against the steps written out here."""
    path, digest, original = arcface_file
    monkeypatch.setenv(identity.ARCFACE.sha256_env, digest)
    checker = offline_checker(cache_dir=path.parent)
    him, her = Image.open(HOPPER).convert("RGB").resize((256, 256)), Image.open(ASTRONAUT).convert("RGB")
    scene = Image.new("RGB", (768, 512))
    scene.paste(her, (0, 0))
    scene.paste(him, (512, 128))
    flipped = him.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    report = checker.check(scene, [her, [him, flipped]], ["her", "him"])

    # By hand: every face of every image, aligned, through the original module in one batch.
    detected = {name: checker.cropper.detect(image) for name, image in
                (("scene", scene), ("her", her), ("him", him), ("flipped", flipped))}
    images = {"scene": scene, "her": her, "him": him, "flipped": flipped}
    crops = [align_face(images[name], f) for name, faces in detected.items() for f in faces]
    with torch.no_grad():
        out = original(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().contiguous() / 127.5 - 1)
    emb = out.numpy() / np.linalg.norm(out.numpy(), axis=1, keepdims=True)
    split = np.cumsum([len(f) for f in detected.values()])[:-1]
    scene_emb, her_emb, him_emb, flipped_emb = np.split(emb, split)

    def largest(name, embeddings):
        areas = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in detected[name]]
        return embeddings[int(np.argmax(areas))]

    refs = np.stack([largest("her", her_emb), unit(largest("him", him_emb) + largest("flipped", flipped_emb))])
    sims = scene_emb @ refs.T
    assert report.available and report.detector == "mtcnn" and report.num_faces == len(detected["scene"]) >= 2
    boxes = [f.box for f in detected["scene"]]
    assert sorted(report.faces) == sorted(boxes)  # in any order
    for k, subject in enumerate(report.subjects):
        face = boxes.index(report.faces[subject.face])
        assert subject.similarity == pytest.approx(sims[face, k], abs=1e-4)
    assert len({s.face for s in report.subjects}) == 2


def test_prefixed_keys_are_accepted_and_wrong_files_refused(arcface_file, tmp_path):
    path, _, original = arcface_file
    state = torch.load(path, weights_only=True)
    torch.save({f"module.{k}": v for k, v in list(state.items())[:3]}, tmp_path / "partial.pth")
    with pytest.raises(ArcFaceWeightsError, match="not facexlib's ArcFace IR-SE50"):
        identity.load_arcface(tmp_path / "partial.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ArcFaceWeightsError, match="does not hold a state dict"):
        identity.load_arcface(tmp_path / "list.pth")


def test_first_hash_is_recorded_and_a_changed_or_unpinned_file_refused(tmp_path, monkeypatch):
    weights = tmp_path / identity.ARCFACE.name
    weights.write_bytes(b"first")
    assert identity.fetch_arcface(tmp_path, allow_download=False) == weights
    weights.write_bytes(b"second")
    with pytest.raises(ArcFaceWeightsError, match="recorded at the first download"):
        identity.fetch_arcface(tmp_path, allow_download=False)
    monkeypatch.setenv(identity.ARCFACE.sha256_env, "ab" * 32)
    with pytest.raises(ArcFaceWeightsError, match="refusing") as info:
        identity.fetch_arcface(tmp_path, allow_download=False)
    assert hashlib.sha256(b"second").hexdigest() in str(info.value) and weights.exists()
    checker = offline_checker(cache_dir=tmp_path)
    assert "refusing" in checker.unavailable_reason()
    assert not checker.check(Image.open(ASTRONAUT), [Image.open(ASTRONAUT)]).available


def test_a_pinned_hash_is_accepted(arcface_file, monkeypatch):
    path, digest, _ = arcface_file
    monkeypatch.setenv(identity.ARCFACE.sha256_env, digest.upper())
    assert identity.fetch_arcface(path.parent, allow_download=False) == path


def test_weights_are_never_unpickled():
    for module in (identity, __import__("fastcomposer.downloads", fromlist=["x"])):
        source = Path(module.__file__).read_text()
        calls = re.findall(r"torch\.load\([^)]*\)", source)
        assert "weights_only=False" not in source and all("weights_only=True" in c for c in calls)


# --- offline, and inside generation ------------------------------------------------------------------------


def test_offline_the_check_is_unavailable_and_generation_carries_on(tiny_pipe, monkeypatch, tmp_path, arcface_file):
    from fastcomposer.generation.run import GenerationRequest, generate

    checker = offline_checker(cache_dir=tmp_path / "arcface")
    monkeypatch.setattr(identity, "_default_checker", checker)
    request = GenerationRequest(prompt="a woman img", images=[Image.open(ASTRONAUT).convert("RGB")], seed=1,
                                num_inference_steps=2, height=64, width=64, num_images=2, face_crop=False,
                                identity_check=True)
    result = generate(tiny_pipe, request, limits=CLI_LIMITS)
    assert len(result.images) == 2 and len(result.identity) == 2
    report = result.identity[0]
    assert not report.available
    assert str(tmp_path / "arcface" / identity.ARCFACE.name) in report.reason and identity.ARCFACE.url in report.reason
    assert len(report.summary().splitlines()) == 1
    assert result.records[1].identity == report.to_dict()
    assert checker.unavailable_reason() == report.reason, "remembered: no second attempt"
    # The file copied by hand to the path the message names is found without a restart.
    (tmp_path / "arcface").mkdir()
    shutil.copy(arcface_file[0], tmp_path / "arcface" / identity.ARCFACE.name)
    assert checker.unavailable_reason() == ""
    without = generate(tiny_pipe, replace(request, identity_check=False), limits=CLI_LIMITS)
    assert without.identity == [] and without.records[0].identity is None
    assert np.array_equal(np.asarray(without.images[0]), np.asarray(result.images[0])), "the check changes nothing"


def test_a_failing_check_never_breaks_generation(tiny_pipe, monkeypatch):
    from fastcomposer.generation.run import GenerationRequest, generate

    checker = offline_checker(model=stand_in_embedder())

    def broken(image):
        raise RuntimeError("detector crashed")

    monkeypatch.setattr(checker.cropper, "detect", broken)
    monkeypatch.setattr(identity, "_default_checker", checker)
    request = GenerationRequest(prompt="a woman img", images=[Image.open(ASTRONAUT).convert("RGB")], seed=1,
                                num_inference_steps=2, height=64, width=64, face_crop=False, identity_check=True)
    result = generate(tiny_pipe, request, limits=CLI_LIMITS)
    assert len(result.images) == 1 and not result.identity[0].available
    assert "RuntimeError: detector crashed" in result.identity[0].reason


def test_default_checker_is_one_instance_across_threads():
    import threading

    seen = []
    threads = [threading.Thread(target=lambda: seen.append(identity.default_checker())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 4 and all(c is seen[0] for c in seen)


def test_cli_identity_check_prints_one_line_per_image_and_stores_the_report(tmp_path, capsys, monkeypatch):
    from fastcomposer.commands.main import main
    from fastcomposer.generation.metadata import read_record

    monkeypatch.setattr(identity, "_default_checker", offline_checker(model=stand_in_embedder()))
    code = main(["generate", "--prompt", "a woman img and a man img", "--image", str(ASTRONAUT), "--image",
                 str(HOPPER), "--output", str(tmp_path / "out.png"), "--num-images", "2", "--identity-check",
                 "--no-face-crop", "--weights", "tiny", "--device", "cpu", "--no-safety-checker", "--steps", "2",
                 "--height", "64", "--width", "64", "--seed", "5"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    paths = [tmp_path / "out_0.png", tmp_path / "out_1.png"]
    lines = [line for line in out if line.startswith(tuple(f"{p}: " for p in paths))]
    assert len(lines) == 2 and out[-2:] == lines, "one line per image, after the file list"
    for path, line in zip(paths, lines):
        report = IdentityReport.from_dict(read_record(path).identity)
        assert report.available and [s.name for s in report.subjects] == ["woman", "man"]
        assert line == f"{path}: {report.summary()}"
