"""The identity check with a real face recogniser on real photos: our detection and alignment, the matching and the
flags, with dlib's ResNet face recogniser in place of ArcFace (whose weights cannot be downloaded here).

The recogniser comes from PyPI, in the test requirements only: `dlib-bin` (dlib's prebuilt wheel, Boost licence)
runs it, and `face-recognition-models` 0.3.0 ships its weights, `dlib_face_recognition_resnet_model_v1.dat` by
Davis King (CC0 1.0 / public domain; sha256 checked below). It takes 150x150 face chips to 128 numbers; here it
reads the 112x112 faces our checker aligns (`identity/arcface.py: align_face`), enlarged to 150.

What a real model shows that a stand-in cannot: the same person stays close through flips, light, scale, rotation
and JPEG, different people do not, and so the check's Hungarian matching and its "on one face" and "blended" flags
land where a reader expects on pictures of real people.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import ImageEnhance, ImageOps

from fastcomposer.identity.checker import IdentityChecker
from fastcomposer.inputs.faces import FaceCropper

dlib = pytest.importorskip("dlib", reason="dlib is not installed (pip install -r requirements-dev.txt: dlib-bin)")

ROOT = Path(__file__).resolve().parents[1]
RECOGNISER = "dlib_face_recognition_resnet_model_v1.dat"
RECOGNISER_SHA256 = "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"


def recogniser_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs pkg_resources, gone from setuptools)
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("face-recognition-models is not installed (pip install -r requirements-dev.txt)")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / RECOGNISER


class DlibRecogniser(torch.nn.Module):
    """dlib's recogniser behind the checker's model interface: `(N, 3, 112, 112)` in [-1, 1] -> `(N, 128)`."""

    def __init__(self, path: Path):
        super().__init__()
        self.net = dlib.face_recognition_model_v1(str(path))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        faces = x.add(1).mul(127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        chips = [np.asarray(PIL.Image.fromarray(f).resize((150, 150), PIL.Image.BICUBIC)) for f in faces]
        return torch.tensor(np.array([np.asarray(self.net.compute_face_descriptor(c)) for c in chips]))


@pytest.fixture(scope="module")
def checker() -> IdentityChecker:
    path = recogniser_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == RECOGNISER_SHA256, f"{path} is not the known file"
    return IdentityChecker(cropper=FaceCropper(allow_download=False), model=DlibRecogniser(path))


def photo(name: str) -> PIL.Image.Image:
    return PIL.Image.open(ROOT / "assets" / name).convert("RGB")


def jpeg(image: PIL.Image.Image, quality: int = 30) -> PIL.Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return PIL.Image.open(buffer).convert("RGB")


def variants(image: PIL.Image.Image) -> list[PIL.Image.Image]:
    """The photo as it might come again: mirrored, darker, a third of the size, turned 10 degrees, a poor JPEG."""
    return [image, ImageOps.mirror(image), ImageEnhance.Brightness(image).enhance(0.6),
            image.resize((image.width // 3, image.height // 3)), image.rotate(10, fillcolor=(128, 128, 128)),
            jpeg(image)]


def side_by_side(*images: PIL.Image.Image, side: int = 320) -> PIL.Image.Image:
    """One picture with the photos next to each other, left to right (each squashed to a square)."""
    canvas = PIL.Image.new("RGB", (side * len(images), side), "gray")
    for k, image in enumerate(images):
        canvas.paste(image.resize((side, side)), (k * side, 0))
    return canvas


def test_the_same_person_stays_closer_than_two_different_people(checker):
    people = {name: [checker.reference_embedding(v) for v in variants(photo(name))]
              for name in ("astronaut.png", "grace_hopper.jpg")}
    assert all(e is not None for group in people.values() for e in group)  # a face found in every variant
    a, b = (np.stack(group) for group in people.values())
    same = min((a @ a.T).min(), (b @ b.T).min())
    different = (a @ b.T).max()
    assert same > different + 0.02, (same, different)


def test_two_people_in_one_picture_go_to_their_own_subjects(checker):
    hopper, astronaut = photo("grace_hopper.jpg"), photo("astronaut.png")
    picture = side_by_side(hopper, astronaut)  # Grace Hopper on the left, the astronaut on the right
    refs = [ImageOps.mirror(astronaut), jpeg(hopper)]  # other photos of them than the ones in the picture
    report = checker.check(picture, refs, names=["astronaut", "hopper"])
    assert report.num_faces == 2 and not report.shared_faces and not report.blended, report.summary()
    left_to_right = sorted(range(2), key=lambda i: report.faces[i][0])
    assert [report.subjects[0].face, report.subjects[1].face] == [left_to_right[1], left_to_right[0]]
    swapped = checker.check(picture, refs[::-1], names=["hopper", "astronaut"])
    assert [s.face for s in swapped.subjects] == [left_to_right[0], left_to_right[1]]  # the order of subjects


def test_two_faces_of_somebody_else_are_flagged_blended(checker):
    """Both subjects came out as one other person: the two faces are closer to each other than to their photos."""
    hopper = photo("grace_hopper.jpg")
    picture = side_by_side(hopper, ImageOps.mirror(ImageEnhance.Brightness(hopper).enhance(0.8)))
    report = checker.check(picture, [photo("astronaut.png"), photo("camera.png")], names=["woman", "man"])
    assert report.num_faces == 2 and report.blended == [[0, 1]], report.summary()
    assert "⚠ woman+man blended" in report.summary()


def test_one_face_for_two_subjects_is_flagged_and_the_other_is_not_found(checker):
    astronaut = photo("astronaut.png")
    report = checker.check(side_by_side(astronaut), [jpeg(astronaut), photo("grace_hopper.jpg")],
                           names=["astronaut", "hopper"])
    assert report.num_faces == 1 and report.shared_faces == [[0, 1]], report.summary()
    assert report.subjects[0].found and not report.subjects[1].found
    assert "hopper not found" in report.summary()
