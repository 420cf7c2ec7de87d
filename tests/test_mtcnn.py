"""MTCNN (inputs/mtcnn.py): the shipped weights, the cascade against the reference implementation's boxes and
landmarks on the bundled photos (recorded in tests/fixtures/mtcnn-reference.json), and its place among the
detectors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fastcomposer.inputs import face_detectors as detectors
from fastcomposer.inputs import faces
from fastcomposer.inputs.faces import FaceCropper
from fastcomposer.inputs.mtcnn import MTCNN, WEIGHTS, WEIGHTS_SHA256, nms_min

ASSETS = Path(__file__).resolve().parents[1] / "assets"
REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "mtcnn-reference.json").read_text())
# The published weights' tensors (facenet-pytorch 2.6.0 data/*.pt), name -> shape, written out
SHAPES = {
    "pnet": {"conv1.weight": (10, 3, 3, 3), "conv1.bias": (10,), "prelu1.weight": (10,),
             "conv2.weight": (16, 10, 3, 3), "conv2.bias": (16,), "prelu2.weight": (16,),
             "conv3.weight": (32, 16, 3, 3), "conv3.bias": (32,), "prelu3.weight": (32,),
             "conv4_1.weight": (2, 32, 1, 1), "conv4_1.bias": (2,), "conv4_2.weight": (4, 32, 1, 1),
             "conv4_2.bias": (4,)},
    "rnet": {"conv1.weight": (28, 3, 3, 3), "conv1.bias": (28,), "prelu1.weight": (28,),
             "conv2.weight": (48, 28, 3, 3), "conv2.bias": (48,), "prelu2.weight": (48,),
             "conv3.weight": (64, 48, 2, 2), "conv3.bias": (64,), "prelu3.weight": (64,),
             "dense4.weight": (128, 576), "dense4.bias": (128,), "prelu4.weight": (128,),
             "dense5_1.weight": (2, 128), "dense5_1.bias": (2,), "dense5_2.weight": (4, 128), "dense5_2.bias": (4,)},
    "onet": {"conv1.weight": (32, 3, 3, 3), "conv1.bias": (32,), "prelu1.weight": (32,),
             "conv2.weight": (64, 32, 3, 3), "conv2.bias": (64,), "prelu2.weight": (64,),
             "conv3.weight": (64, 64, 3, 3), "conv3.bias": (64,), "prelu3.weight": (64,),
             "conv4.weight": (128, 64, 2, 2), "conv4.bias": (128,), "prelu4.weight": (128,),
             "dense5.weight": (256, 1152), "dense5.bias": (256,), "prelu5.weight": (256,),
             "dense6_1.weight": (2, 256), "dense6_1.bias": (2,), "dense6_2.weight": (4, 256), "dense6_2.bias": (4,),
             "dense6_3.weight": (10, 256), "dense6_3.bias": (10,)},
}


def pair() -> Image.Image:
    """Two faces in one picture (the fixture's "pair"), made the same way as when it was recorded."""
    a = Image.open(ASSETS / "astronaut.png").convert("RGB").resize((300, 300), Image.Resampling.BILINEAR)
    b = Image.open(ASSETS / "grace_hopper.jpg").convert("RGB").resize((240, 300), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (600, 340), (200, 200, 200))
    canvas.paste(a, (10, 20))
    canvas.paste(b, (340, 30))
    return canvas


@pytest.fixture(scope="module")
def mtcnn() -> MTCNN:
    return MTCNN.load()


def test_the_shipped_weights_are_the_published_ones():
    assert hashlib.sha256(WEIGHTS.read_bytes()).hexdigest() == WEIGHTS_SHA256
    tensors = load_file(str(WEIGHTS))
    want = {f"{net}.{name}": shape for net, names in SHAPES.items() for name, shape in names.items()}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == want
    assert (WEIGHTS.parent / "LICENSE.md").read_text().count("MIT License") == 1


def test_a_changed_file_is_refused(tmp_path):
    copy = tmp_path / "mtcnn.safetensors"
    copy.write_bytes(WEIGHTS.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="sha256 differs"):
        MTCNN.load(copy)


@pytest.mark.parametrize("name", list(REFERENCE["photos"]))
def test_boxes_scores_and_landmarks_match_the_reference(mtcnn, name):
    image = pair() if name.startswith("pair") else Image.open(ASSETS / name).convert("RGB")
    want = REFERENCE["photos"][name]
    found = mtcnn.detect(image)
    assert len(found) == len(want["boxes"]) >= 1
    order = sorted(range(len(found)), key=lambda i: found[i].box[0])
    expected = sorted(range(len(found)), key=lambda i: want["boxes"][i][0])
    for i, j in zip(order, expected):
        assert found[i].box == pytest.approx(want["boxes"][j], abs=0.01)
        assert found[i].score == pytest.approx(want["scores"][j], abs=1e-4)
        assert [v for point in found[i].landmarks for v in point] == pytest.approx(
            [v for point in want["landmarks"][j] for v in point], abs=0.01)


def test_the_pyramid_and_the_last_nms_follow_their_definitions(mtcnn):
    # scales: 12 / min_face, then x 0.709 while the image's short side stays >= 12 px at that scale
    scales, s, side = [], 12 / 20, 100 * 12 / 20
    while side >= 12:
        scales.append(s)
        s, side = s * 0.709, side * 0.709
    assert mtcnn.scales(100, 200) == pytest.approx(scales)
    # intersection over the smaller box, pixel-count areas: a box inside another is dropped, a far one kept
    boxes = torch.tensor([[0.0, 0.0, 99.0, 99.0], [10.0, 10.0, 29.0, 29.0], [200.0, 0.0, 240.0, 40.0],
                          [50.0, 50.0, 149.0, 149.0]])
    scores = torch.tensor([0.9, 0.95, 0.5, 0.8])
    # 1 (the best score) is kept; 0 holds all of 1 (400/400 = 1.0 > 0.7 of the smaller): dropped; 3 does not touch
    # 1: kept; 2 touches nothing: kept
    assert nms_min(boxes, scores, 0.7).tolist() == [1, 3, 2]


@pytest.mark.parametrize("name", ["astronaut.png", "grace_hopper.jpg", "camera.png"])
def test_mtcnn_crops_every_bundled_photo_offline_the_profile_face_too(name):
    cropper = FaceCropper(allow_download=False, detector="mtcnn")
    crop = cropper.crop(Image.open(ASSETS / name).convert("RGB"), name="photo 1")
    assert crop.detector == "mtcnn" and crop.num_faces == 1
    x0, y0, x1, y1 = crop.box
    fx0, fy0, fx1, fy1 = crop.face_box
    assert x1 - x0 == y1 - y0 and x0 <= fx0 and y0 <= fy0 and fx1 <= x1 and fy1 <= y1
    face = cropper.detect(Image.open(ASSETS / name).convert("RGB"))[0]
    assert face.score > 0.99 and len(face.landmarks) == 5


def test_the_box_is_widened_to_retinafaces_convention(mtcnn):
    image = Image.open(ASSETS / "grace_hopper.jpg").convert("RGB")
    raw = mtcnn.detect(image)[0].box
    (face,) = detectors._mtcnn_faces(mtcnn, image)
    width = (raw[2] - raw[0]) * detectors.MTCNN_BOX_SCALE
    assert face.box[2] - face.box[0] == pytest.approx(width, abs=2)
    assert (face.box[0] + face.box[2]) / 2 == pytest.approx((raw[0] + raw[2]) / 2, abs=1)


def test_the_order_and_the_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTCOMPOSER_CACHE", str(tmp_path))
    monkeypatch.delenv(faces.DETECTOR_ENV, raising=False)
    assert FaceCropper(allow_download=False).detector_name == "mtcnn"  # RetinaFace's weights are not here
    monkeypatch.setenv(faces.DETECTOR_ENV, "opencv")
    assert FaceCropper(allow_download=False).detector_name == "opencv"
    monkeypatch.setenv(faces.DETECTOR_ENV, "mtcnn")
    assert FaceCropper(allow_download=False).detector_name == "mtcnn"
    monkeypatch.setenv(faces.DETECTOR_ENV, "dlib")
    with pytest.raises(detectors.FaceDetectorUnavailableError, match="retinaface, mtcnn, opencv"):
        _ = FaceCropper(allow_download=False).detector_name
