"""Face detection and cropping, offline: the OpenCV fallback on the bundled photos, the crop geometry,
the RetinaFace weight checks, and the RetinaFace code path on random weights."""

from __future__ import annotations

import hashlib
import io
import logging
import re
import threading
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastcomposer.inputs import face_detectors as detectors
from fastcomposer.inputs import faces
from fastcomposer.inputs.faces import (
    FaceCrop,
    FaceCropper,
    FaceWeightsError,
    NoFaceFoundError,
    crop_subject,
    square_box,
)

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No test may read a developer's real cache or pinned hash, or change the process-wide cropper."""
    monkeypatch.setenv("FASTCOMPOSER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(detectors.SHA256_ENV, raising=False)
    monkeypatch.delenv(faces.DETECTOR_ENV, raising=False)
    monkeypatch.setattr(faces, "_default_cropper", None)


@pytest.fixture(scope="module")
def fallback() -> FaceCropper:
    """OpenCV's Haar cascades: the last resort, asked for by name (offline, MTCNN comes before it)."""
    return FaceCropper(allow_download=False, detector="opencv")


def load(name: str) -> Image.Image:
    with Image.open(ASSETS / name) as image:
        return image.convert("RGB")


def inside(inner, outer) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def check_crop(crop: FaceCrop, image: Image.Image) -> None:
    x0, y0, x1, y1 = crop.box
    assert x1 - x0 == y1 - y0 > 0, "the crop must be square"
    assert inside(crop.box, (0, 0, *image.size))
    assert inside(crop.face_box, crop.box)
    assert crop.image.mode == "RGB" and crop.image.size == (x1 - x0, y1 - y0)
    assert list(crop.image.getdata()) == list(image.crop(crop.box).getdata())


# Regions checked by eye on the bundled photos: the face box must lie inside the outer region and its
# centre inside the inner one (the astronaut's face spans about x 180-270, y 60-185; Grace Hopper's
# about x 160-370, y 140-335).
@pytest.mark.parametrize(
    "name, outer, centre",
    [
        ("astronaut.png", (150, 40, 300, 210), (200, 95, 250, 150)),
        ("grace_hopper.jpg", (130, 80, 400, 360), (230, 180, 300, 260)),
    ],
)
def test_fallback_finds_the_face(fallback, name, outer, centre):
    image = load(name)
    crop = fallback.crop(image, name="photo 1")
    assert crop.detector == "opencv" and crop.num_faces == 1
    assert inside(crop.face_box, outer)
    cx, cy = (crop.face_box[0] + crop.face_box[2]) / 2, (crop.face_box[1] + crop.face_box[3]) / 2
    assert centre[0] <= cx <= centre[2] and centre[1] <= cy <= centre[3]
    check_crop(crop, image)
    # A loose crop, not a tight face box: it reaches well above and below the face.
    assert crop.box[2] - crop.box[0] >= 2 * (crop.face_box[2] - crop.face_box[0])


def test_fallback_crop_is_loose_around_the_astronaut(fallback):
    crop = fallback.crop(load("astronaut.png"))
    side = crop.box[2] - crop.box[0]
    assert side == round(faces.DEFAULT_MARGIN * (crop.face_box[2] - crop.face_box[0]))
    assert crop.box[1] < 15 and crop.box[3] > 230, "hair (from y~15) and the suit's collar (y~230) in view"


def test_camera_turned_face_found_by_profile_cascade(fallback):
    # The cameraman looks right in profile: the frontal cascades miss him, the mirrored profile one does not.
    image = Image.open(ASSETS / "camera.png")  # grayscale: crop() converts it
    assert image.mode == "L"
    crop = fallback.crop(image, name="photo 3")
    assert inside(crop.face_box, (150, 60, 290, 220))
    check_crop(crop, image.convert("RGB"))


def test_blank_image_raises_with_the_photo_name(fallback):
    with pytest.raises(NoFaceFoundError) as info:
        fallback.crop(Image.new("RGB", (400, 300), (128, 128, 128)), name="photo 2")
    message = str(info.value)
    assert "photo 2" in message and "turn off face crop" in message and "front-facing" in message
    assert info.value.name == "photo 2" and isinstance(info.value, ValueError)


def test_big_photo_is_detected_on_a_smaller_copy_and_mapped_back(fallback):
    small = fallback.crop(load("astronaut.png")).face_box
    big = fallback.crop(load("astronaut.png").resize((2048, 2048))).face_box  # 4x, above OPENCV_MAX_SIDE
    assert all(abs(b - 4 * s) <= 24 for b, s in zip(big, small, strict=True))


def test_crop_subject_uses_the_given_or_default_cropper(monkeypatch, fallback):
    assert crop_subject(load("astronaut.png"), cropper=fallback).detector == "opencv"
    monkeypatch.setenv(faces.DETECTOR_ENV, "opencv")  # no download attempt for the default cropper
    with pytest.raises(NoFaceFoundError, match="photo 4"):
        crop_subject(Image.new("RGB", (128, 128)), name="photo 4")
    assert faces.default_cropper() is faces.default_cropper()
    assert faces.default_cropper().detector_name == "opencv"


def test_detector_is_built_once_across_threads(caplog, tmp_path):
    cropper = FaceCropper(cache_dir=tmp_path, allow_download=False)
    image, results = load("astronaut.png"), []
    threads = [threading.Thread(target=lambda: results.append(cropper.crop(image).box)) for _ in range(4)]
    with caplog.at_level(logging.WARNING, logger="fastcomposer.inputs.faces"):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 4 and len(set(results)) == 1
    warnings_logged = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings_logged) == 1, "the fallback is announced once"


# --- small faces in large photos ------------------------------------------------------------------

# The astronaut's head and shoulders (the face spans about x 180-270, y 60-185 of the portrait).
HEAD_AND_SHOULDERS, ASTRONAUT_FACE = (100, 0, 400, 360), (180, 60, 270, 185)


def small_person(background: Image.Image, at: tuple[int, int], face_width: int = 95):
    """`background` with the astronaut pasted at `at`, scaled so her face is `face_width` px wide; and where
    the face landed, from the paste position and the scale."""
    s = face_width / (ASTRONAUT_FACE[2] - ASTRONAUT_FACE[0])
    piece = load("astronaut.png").crop(HEAD_AND_SHOULDERS)
    piece = piece.resize((round(piece.width * s), round(piece.height * s)), Image.Resampling.LANCZOS)
    photo = background.copy()
    photo.paste(piece, at)
    x0, y0 = HEAD_AND_SHOULDERS[:2]
    face = tuple(round(at[k % 2] + (v - (x0, y0)[k % 2]) * s) for k, v in enumerate(ASTRONAUT_FACE))
    return photo, face


def backgrounds() -> dict[str, Image.Image]:
    noise = np.random.default_rng(0).normal(120, 25, (1200, 1600, 3)).clip(0, 255).astype(np.uint8)
    return {"plain": Image.new("RGB", (1600, 1200), (96, 128, 160)), "noisy": Image.fromarray(noise)}


@pytest.mark.parametrize("background", ["plain", "noisy"])
@pytest.mark.parametrize("at", [(1180, 760), (140, 110)])
def test_a_small_face_in_a_large_photo_is_found(fallback, background, at):
    """A 95 px frontal face, off-centre in a 1600x1200 photo: the first pass alone misses it, the second finds it."""
    photo, face = small_person(backgrounds()[background], at)
    assert detectors._detect_opencv(fallback._model, photo, second_pass=False) == []  # what the detector did before
    crop = fallback.crop(photo, name="photo 1")
    assert crop.detector == "opencv"
    assert inside(face, crop.box), "the crop holds the pasted face"
    cx, cy = (crop.face_box[0] + crop.face_box[2]) / 2, (crop.face_box[1] + crop.face_box[3]) / 2
    assert face[0] <= cx <= face[2] and face[1] <= cy <= face[3], "the face found is the pasted one"
    check_crop(crop, photo)


@pytest.mark.parametrize("background", ["plain", "noisy"])
def test_the_second_pass_finds_no_face_where_there_is_none(fallback, background):
    with pytest.raises(NoFaceFoundError):
        fallback.crop(backgrounds()[background], name="photo 1")


# --- crop margin -----------------------------------------------------------------------------------


def test_margin_per_call_overrides_the_croppers_and_is_checked(fallback):
    image = load("astronaut.png")
    default = fallback.crop(image)
    width = default.face_box[2] - default.face_box[0]
    assert default.box[2] - default.box[0] == round(faces.DEFAULT_MARGIN * width)
    for margin in (faces.MARGIN_TIGHT_FACE, faces.MARGIN_HEAD_AND_SHOULDERS):
        crop = fallback.crop(image, margin=margin)
        assert crop.face_box == default.face_box
        assert crop.box[2] - crop.box[0] == round(margin * width) and inside(crop.face_box, crop.box)
    assert fallback.margin == faces.DEFAULT_MARGIN, "a per-call margin does not change the cropper"
    box = crop_subject(image, cropper=fallback, margin=2.0).box
    assert box[2] - box[0] == round(2.0 * width)
    for bad in (0.5, float("nan"), "2"):
        with pytest.raises(ValueError, match="margin"):
            fallback.crop(image, margin=bad)
    assert faces.MARGIN_TIGHT_FACE < faces.DEFAULT_MARGIN < faces.MARGIN_HEAD_AND_SHOULDERS


# --- square_box geometry ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "face, size",
    [((200, 200, 300, 300), (1000, 800)), ((0, 0, 50, 60), (640, 480)), ((590, 420, 640, 480), (640, 480))],
)
def test_square_box_is_square_inside_and_contains_the_face(face, size):
    box = square_box(face, size, 2.6)
    assert box[2] - box[0] == box[3] - box[1] == round(2.6 * max(face[2] - face[0], 0.8 * (face[3] - face[1])))
    assert inside(box, (0, 0, *size)) and inside(face, box)


def test_square_box_centres_slightly_below_the_face():
    box = square_box((400, 400, 500, 500), (2000, 2000), 2.0)
    assert box == (350, 360, 550, 560)  # centre (450, 460): 0.1 face widths below the face centre (450, 450)


def test_square_box_shifts_at_the_edges():
    assert square_box((0, 0, 100, 100), (1000, 1000), 2.0) == (0, 0, 200, 200)
    assert square_box((900, 900, 1000, 1000), (1000, 1000), 2.0) == (800, 800, 1000, 1000)


def test_square_box_shrinks_to_the_short_side():
    assert square_box((10, 40, 110, 140), (120, 200), 2.6) == (0, 40, 120, 160)  # 260 wanted, 120 fit
    box = square_box((0, 0, 300, 300), (400, 300), 2.6)  # face fills the height
    assert box[3] - box[1] == 300 and inside((0, 0, 300, 300), box)


def test_square_box_keeps_a_tall_face_whole_despite_the_downward_shift():
    face = (100, 100, 200, 260)  # 160 tall: RetinaFace-style box
    assert inside(face, square_box(face, (1000, 1000), 1.25))


def test_margin_below_one_is_refused():
    with pytest.raises(ValueError, match="margin"):
        square_box((0, 0, 10, 10), (100, 100), 0.5)
    with pytest.raises(ValueError, match="margin"):
        FaceCropper(margin=0.9)


# --- RetinaFace weights ----------------------------------------------------------------------------


def test_weights_with_a_different_pinned_hash_are_refused(tmp_path, monkeypatch, caplog):
    weights = tmp_path / detectors.WEIGHTS_FILE
    weights.write_bytes(b"not the RetinaFace weights")
    monkeypatch.setenv(detectors.SHA256_ENV, "ab" * 32)
    with pytest.raises(FaceWeightsError, match="refusing") as info:
        detectors.fetch_weights(tmp_path, allow_download=False)
    assert hashlib.sha256(b"not the RetinaFace weights").hexdigest() in str(info.value)
    assert "ab" * 32 in str(info.value) and weights.exists(), "a file we did not download is left alone"
    with caplog.at_level(logging.WARNING, logger="fastcomposer.inputs.faces"):
        assert FaceCropper(cache_dir=tmp_path, allow_download=False).detector_name == "mtcnn"  # the next one
    assert "refusing" in caplog.text


def test_first_hash_is_recorded_and_a_changed_file_refused(tmp_path):
    weights = tmp_path / detectors.WEIGHTS_FILE
    weights.write_bytes(b"first")
    assert detectors.fetch_weights(tmp_path, allow_download=False) == weights
    record = tmp_path / f"{detectors.WEIGHTS_FILE}.sha256"
    assert record.read_text().split()[0] == hashlib.sha256(b"first").hexdigest()
    weights.write_bytes(b"second")
    with pytest.raises(FaceWeightsError, match="recorded at the first download"):
        detectors.fetch_weights(tmp_path, allow_download=False)


def test_offline_download_fails_fast_and_falls_back(tmp_path, monkeypatch, caplog):
    calls = []

    def offline(url, timeout=None):
        calls.append((url, timeout))
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with caplog.at_level(logging.WARNING, logger="fastcomposer.inputs.faces"):
        cropper = FaceCropper(cache_dir=tmp_path)
        assert cropper.crop(load("astronaut.png")).detector == "mtcnn"  # the offline detector after RetinaFace
        cropper.crop(load("grace_hopper.jpg"))
    assert calls == [(detectors.WEIGHTS_URL, detectors.DOWNLOAD_TIMEOUT_S)] and detectors.DOWNLOAD_TIMEOUT_S <= 10
    assert caplog.text.count("unavailable") == 1 and "URLError" in caplog.text
    assert list(tmp_path.iterdir()) == [], "no partial file left behind"


def test_downloaded_file_with_the_wrong_hash_is_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(b"tampered"))
    with pytest.raises(FaceWeightsError, match="refusing"):
        detectors.fetch_weights(tmp_path, sha256="cd" * 32)
    assert list(tmp_path.iterdir()) == []
    good = hashlib.sha256(b"tampered").hexdigest()
    assert detectors.fetch_weights(tmp_path, sha256=good).read_bytes() == b"tampered"


def test_weights_are_never_unpickled():
    source = Path(detectors.__file__).read_text()
    calls = re.findall(r"torch\.load\([^)]*\)", source)
    assert "weights_only=False" not in source and calls and all("weights_only=True" in c for c in calls)


# --- RetinaFace code path on random weights --------------------------------------------------------


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> tuple[Path, str]:
    """facexlib's RetinaFace with random weights whose class head says "face" everywhere, saved the way
    the release is (nn.DataParallel's "module." prefix), with its sha256."""
    from facexlib.detection.retinaface import RetinaFace

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = RetinaFace(network_name="resnet50", half=False, device=torch.device("cpu"))
    with torch.no_grad():
        for head in model.ClassHead:  # logits (background, face) = (-8, 8): every anchor is a sure face
            head.conv1x1.weight.zero_()
            head.conv1x1.bias.view(-1, 2).copy_(torch.tensor([-8.0, 8.0]))
        for head in model.BboxHead:  # no regression: each detection is its anchor box
            head.conv1x1.weight.zero_()
            head.conv1x1.bias.zero_()
    folder = tmp_path_factory.mktemp("retinaface")
    path = folder / detectors.WEIGHTS_FILE
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_retinaface_path_runs_end_to_end(random_weights, monkeypatch):
    path, digest = random_weights
    monkeypatch.setenv(detectors.SHA256_ENV, digest)
    cropper = FaceCropper(cache_dir=path.parent, allow_download=False)
    assert cropper.detector_name == "retinaface"
    # Small and square: fewer anchors for NMS, and the anchor-sized "face" still fits in the crop.
    image = load("astronaut.png").resize((160, 160))
    crop = cropper.crop(image, name="photo 1")
    assert crop.detector == "retinaface" and crop.num_faces >= 1
    assert all(isinstance(v, int) for v in crop.box + crop.face_box)
    check_crop(crop, image)


def test_retinaface_without_faces_raises(random_weights, monkeypatch):
    path, digest = random_weights
    model = detectors.load_retinaface(detectors.fetch_weights(path.parent, allow_download=False, sha256=digest))
    with torch.no_grad():
        for head in model.ClassHead:
            head.conv1x1.bias.view(-1, 2).copy_(torch.tensor([8.0, -8.0]))
    assert detectors._detect_retinaface(model, load("astronaut.png").resize((128, 128))) == []


def test_an_opencv_without_cascades_gives_a_clear_error(monkeypatch):
    """OpenCV 5 dropped CascadeClassifier; asked for the Haar cascades, the user is told what to do."""
    import types

    fake_cv2 = types.SimpleNamespace(__version__="5.0.0")
    monkeypatch.setitem(__import__("sys").modules, "cv2", fake_cv2)
    cropper = FaceCropper(allow_download=False, detector="opencv")
    with pytest.raises(detectors.FaceDetectorUnavailableError, match="opencv-python<5"):
        cropper.crop(Image.new("RGB", (200, 200)), name="photo 1")
    assert isinstance(detectors.FaceDetectorUnavailableError("x"), ValueError)  # callers report it like bad input


# --- detect(): every face, with RetinaFace's scores and landmarks ---------------------------------------


def test_detect_with_opencv_lists_the_faces_crop_chooses_from(fallback):
    image = load("astronaut.png")
    found = fallback.detect(image)
    assert [f.box for f in found] and all(f.score is None and f.landmarks is None for f in found)
    assert fallback.crop(image).face_box in [f.box for f in found]
    assert fallback.detect(Image.new("RGB", (200, 200), (128, 128, 128))) == []


def test_detect_with_retinaface_gives_scores_and_five_landmarks(random_weights, monkeypatch):
    path, digest = random_weights
    monkeypatch.setenv(detectors.SHA256_ENV, digest)
    cropper = FaceCropper(cache_dir=path.parent, allow_download=False)
    image = load("astronaut.png").resize((160, 160))
    found = cropper.detect(image)
    assert found and [f.box for f in found] == detectors._detect_retinaface(cropper._model, image)
    for face in found:
        assert face.score >= detectors.RETINAFACE_THRESHOLD and len(face.landmarks) == 5
        assert all(isinstance(v, float) for point in face.landmarks for v in point)


def test_retinaface_landmarks_are_mapped_back_to_the_photo(random_weights, monkeypatch):
    path, digest = random_weights
    model = detectors.load_retinaface(detectors.fetch_weights(path.parent, allow_download=False, sha256=digest))
    with torch.no_grad():
        for head in model.LandmarkHead:  # no regression: all 5 points sit at the anchor's centre
            head.conv1x1.weight.zero_()
            head.conv1x1.bias.zero_()
    monkeypatch.setattr(detectors, "RETINAFACE_MAX_SIDE", 80)  # a 160 px photo is detected at half size
    found = detectors._retinaface_faces(model, load("astronaut.png").resize((160, 160)))
    assert found
    for face in found:
        x0, y0, x1, y1 = face.box
        assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in face.landmarks)
    assert max(x for f in found for x, _ in f.landmarks) > 100, "in the photo's pixels, not the half-size copy's"
