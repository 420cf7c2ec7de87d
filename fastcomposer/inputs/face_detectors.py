"""The face detectors behind `faces.FaceCropper`: facexlib's RetinaFace, and OpenCV's Haar cascades offline.

Tried in this order (`FASTCOMPOSER_FACE_DETECTOR` = retinaface | mtcnn | opencv starts further down):
- RetinaFace (ResNet-50), when its weights can be had: downloaded once from the facexlib release, sha256-checked,
  loaded with `weights_only=True`;
- MTCNN (mtcnn.py), whose weights ship with the package: offline, with 5 landmarks, and it finds turned faces;
- OpenCV's Haar cascades, which ship inside opencv-python, with a second, finer pass for faces small in a large
  photo (see OPENCV_FINE_MAX_SIDE): the last resort.
Each detector returns `DetectedFace`s in the photo's pixel coordinates.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..downloads import DOWNLOAD_TIMEOUT_S, DownloadError, WeightsFile, fetch
from ..messages import UserFacingError, Wording

logger = logging.getLogger(__name__)

WEIGHTS_URL = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth"


WEIGHTS_FILE = "detection_Resnet50_Final.pth"


# facexlib publishes no checksum for this file (its own loader passes hash_prefix=None) and it could not
# be downloaded where this was written, so nothing is pinned: the first download's sha256 is recorded
# beside the file and any later file must match it. A maintainer pins the real value here or in the env.
WEIGHTS_SHA256: str | None = None


SHA256_ENV = "FASTCOMPOSER_FACE_WEIGHTS_SHA256"


MAX_WEIGHTS_BYTES = 256 * 2**20  # the real file is about 105 MB; a larger answer is not it


RETINAFACE_THRESHOLD = 0.9  # facexlib's restoration helper uses 0.97; a miss costs our user an error


RETINAFACE_MAX_SIDE = 640  # anchors start at 16 px: faces 5% of the photo wide still show; 1024 was 2-3x slower


OPENCV_MAX_SIDE = 640  # Haar cost grows with pixels; 640 px finds most faces from 5% of the photo's short side


# A second pass, run only when the first finds nothing, for faces small in a large photo (a person in a holiday
# snapshot). At 640 px a 95 px face of a 1600 px photo is 38 px, where OpenCV slides the cascade 2 px at a time
# and few hits land on it; and equalizeHist spreads the grey levels the *whole* photo uses, so a small face in
# a large calm background keeps almost no contrast. The second pass looks at a copy twice as large, equalised
# in 8x8 tiles (CLAHE), for the small sizes only. benchmarks/bench_faces.py pastes the bundled portraits with
# faces 70-95 px wide into 1600x1200 photos: the first pass finds 51 of 96, both passes 96 of 96, and of 27
# face-free photos 7 get a false face with or without the second pass.
OPENCV_FINE_MAX_SIDE = 1280


# alt2 alone in the second pass: on the 20 face-free photos the first pass leaves empty it found no face, the
# default cascade 6 (both after CLAHE); alt2 also found more of the small faces.
OPENCV_FINE_CASCADE = "haarcascade_frontalface_alt2.xml"


OPENCV_FINE_MAX_FACE = 0.15  # the second pass's largest face, over the photo's short side; larger ones need no help


OPENCV_MIN_FACE = 0.05  # smallest face searched, over the short side: smaller ones make crops too blurry to use


OPENCV_MIN_NEIGHBORS = 5  # OpenCV's overlapping hits needed per face: fewer lets textures pass as faces


# Tried in order until one finds a face; the profile cascade only knows one side, so it also runs mirrored.
HAAR_CASCADES = (
    "haarcascade_frontalface_default.xml",
    "haarcascade_frontalface_alt2.xml",
    "haarcascade_profileface.xml",
)


Box = tuple[int, int, int, int]


@dataclass
class DetectedFace:
    """One face found by `FaceCropper.detect`, in the photo's pixel coordinates."""

    box: Box  # (x0, y0, x1, y1), clipped to the photo
    score: float | None  # RetinaFace's or MTCNN's confidence; None from OpenCV, which gives none
    # RetinaFace's or MTCNN's 5 points (x, y): left eye, right eye, nose tip, left and right mouth corner, as seen in
    # the photo; None from OpenCV
    landmarks: tuple[tuple[float, float], ...] | None = None


class FaceDetectorUnavailableError(UserFacingError, ValueError):
    """No detector could be built at all; the message says how to fix it or to turn face crop off."""


# Why no detector could be built and the fix where the app is installed; then the way out for the user.
_NO_DETECTOR = Wording(
    page="Face crop is unavailable on this server: {problem} (the fix there: {fix}); {no_face_crop} to use "
    "whole photos",
    cli="{problem}; {fix}, or {no_face_crop} to use whole photos",
    api="{problem}; {fix}, or {no_face_crop} to use whole photos",
)


class FaceWeightsError(DownloadError):
    """RetinaFace's weights could not be had or failed their integrity check."""


def expected_sha256() -> str | None:
    """The sha256 RetinaFace's weights must have: $FASTCOMPOSER_FACE_WEIGHTS_SHA256, else WEIGHTS_SHA256."""
    return _retinaface_file().expected_sha256()


def _retinaface_file() -> WeightsFile:
    # Built per call so a maintainer's WEIGHTS_SHA256 set after import still applies.
    return WeightsFile(WEIGHTS_FILE, WEIGHTS_URL, SHA256_ENV, "RetinaFace weights (about 105 MB)",
                       sha256=WEIGHTS_SHA256, max_bytes=MAX_WEIGHTS_BYTES, subdir="facexlib")


def fetch_weights(
    cache_dir: str | os.PathLike | None = None, allow_download: bool = True, sha256: str | None = None
) -> Path:
    """The path of integrity-checked RetinaFace weights, downloaded once into the cache if needed.

    Args:
        cache_dir: the folder; defaults to $FASTCOMPOSER_CACHE/facexlib (~/.cache/fastcomposer/facexlib).
        allow_download: when False, only a file already in `cache_dir` is used.
        sha256: the hash to demand, else `expected_sha256()`. With none pinned, the first file's hash is
            recorded in `<file>.sha256` and a later file with another hash is refused (trust on first use).

    Raises:
        FaceWeightsError: missing and not downloadable, or the wrong hash. OSError: the download failed.
    """
    return fetch(_retinaface_file(), cache_dir, allow_download, sha256, timeout=DOWNLOAD_TIMEOUT_S,
                 error=FaceWeightsError)


def load_retinaface(weights: str | os.PathLike, device: str = "cpu"):
    """facexlib's RetinaFace (ResNet-50) with `weights`, loaded without running any pickled code."""
    import torch
    from facexlib.detection.retinaface import RetinaFace

    with warnings.catch_warnings():
        # facexlib 0.3 builds its backbone with resnet50(pretrained=False); torchvision 0.29 still
        # accepts that (random init, no download) and only warns that the argument is deprecated.
        warnings.simplefilter("ignore", UserWarning)
        model = RetinaFace(network_name="resnet50", half=False, device=torch.device(device))
    state = torch.load(weights, map_location=device, weights_only=True)
    if not isinstance(state, dict):
        raise FaceWeightsError(f"{WEIGHTS_FILE} does not hold a state dict")
    # The release was saved from nn.DataParallel; facexlib's own loader strips the same prefix.
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)
    return model.eval()


def _downscale(image: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    scale = min(1.0, max_side / max(image.size))
    if scale == 1.0:
        return image, 1.0
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0), scale


def _to_boxes(raw: list[tuple[float, float, float, float]], scale: float, image_size: tuple[int, int]) -> list[Box]:
    """Detector boxes on the downscaled copy -> integer boxes in the photo, clipped, empty ones dropped."""
    limits = image_size * 2  # (width, height, width, height)
    boxes = [tuple(min(max(round(v / scale), 0), lim) for v, lim in zip(b, limits, strict=True)) for b in raw]
    return [b for b in boxes if b[2] - b[0] >= 2 and b[3] - b[1] >= 2]


def _detect_retinaface(model, image: Image.Image) -> list[Box]:
    return [face.box for face in _retinaface_faces(model, image)]


def _retinaface_faces(model, image: Image.Image) -> list[DetectedFace]:
    import torch

    small, scale = _downscale(image, RETINAFACE_MAX_SIDE)
    with torch.inference_mode():
        found = model.detect_faces(small, conf_threshold=RETINAFACE_THRESHOLD, nms_threshold=0.4)
    faces = []
    for row in found:  # x0, y0, x1, y1, score, then 5 (x, y) landmarks
        boxes = _to_boxes([tuple(float(v) for v in row[:4])], scale, image.size)
        if boxes:
            points = tuple((float(row[5 + 2 * j]) / scale, float(row[6 + 2 * j]) / scale) for j in range(5))
            faces.append(DetectedFace(boxes[0], float(row[4]), points))
    return faces


# MTCNN's boxes run from the brow to the chin and between the cheeks; RetinaFace's (and the crops tuned on them)
# take a little more of the face. Widening MTCNN's box by this factor about its centre gives the crop sizes of the
# face regions drawn by hand on the bundled portraits in RetinaFace's convention (astronaut 90 px wide where MTCNN
# says 87, Grace Hopper 210 where it says 181: (90 + 210) / (87 + 181) = 1.12); RetinaFace itself cannot be run
# here, its weights need a download.
MTCNN_BOX_SCALE = 1.12
MTCNN_MAX_SIDE = 1024  # MTCNN's pyramid grows with the pixels; faces 20 px wide at this size are still found


def _mtcnn_faces(model, image: Image.Image) -> list[DetectedFace]:
    from .mtcnn import round_box

    small, scale = _downscale(image, MTCNN_MAX_SIDE)
    faces = []
    for face in model.detect(small):
        x0, y0, x1, y1 = (v / scale for v in face.box)
        cx, cy, half_w, half_h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        grown = (cx - MTCNN_BOX_SCALE * half_w, cy - MTCNN_BOX_SCALE * half_h,
                 cx + MTCNN_BOX_SCALE * half_w, cy + MTCNN_BOX_SCALE * half_h)
        box = round_box(grown, image.size)
        if box[2] - box[0] >= 2 and box[3] - box[1] >= 2:
            points = tuple((x / scale, y / scale) for x, y in face.landmarks)
            faces.append(DetectedFace(box, face.score, points))
    return faces


def load_mtcnn():
    """MTCNN with the weights that ship in the package (no download)."""
    from .mtcnn import MTCNN

    return MTCNN.load()


DETECTORS = ("retinaface", "mtcnn", "opencv")  # the order they are tried in


def _load_cascades() -> list[tuple[str, object]]:
    import cv2

    if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
        # OpenCV 5 dropped the cascade classifier and its data files: requirements.txt pins 4.x.
        raise FaceDetectorUnavailableError(
            _NO_DETECTOR, problem=f"OpenCV {cv2.__version__} has no Haar cascades (removed in OpenCV 5)",
            fix="install opencv-python<5",
        )
    cascades = []
    for name in HAAR_CASCADES:
        cascade = cv2.CascadeClassifier(cv2.data.haarcascades + name)
        if not cascade.empty():
            cascades.append((name, cascade))
    if not cascades:
        raise FaceDetectorUnavailableError(
            _NO_DETECTOR, problem="OpenCV's bundled Haar cascades are missing",
            fix="reinstall opencv-python 4.x",
        )
    return cascades


def _haar(cascades: list[tuple[str, object]], gray: np.ndarray, min_side: int, max_side: int | None = None) -> list:
    """(x0, y0, x1, y1) of the faces the first cascade that finds any finds in `gray`, as floats."""
    sizes = {"minSize": (min_side, min_side)} | ({"maxSize": (max_side, max_side)} if max_side else {})
    for name, cascade in cascades:
        raw = []
        for mirrored in (False, True) if "profile" in name else (False,):
            src = np.ascontiguousarray(gray[:, ::-1]) if mirrored else gray
            found = cascade.detectMultiScale(src, scaleFactor=1.1, minNeighbors=OPENCV_MIN_NEIGHBORS, **sizes)
            for x, y, w, h in found:
                x = gray.shape[1] - x - w if mirrored else x
                raw.append((float(x), float(y), float(x + w), float(y + h)))
        if raw:
            return raw
    return []


def _gray(image: Image.Image, max_side: int, local: bool = False) -> tuple[np.ndarray, float]:
    """Grey levels evened out, as Haar features need: over the whole photo, or in 8x8 tiles when `local`."""
    import cv2

    small, scale = _downscale(image, max_side)
    gray = np.asarray(small.convert("L"))
    if local:
        return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(gray), scale
    return cv2.equalizeHist(gray), scale


def _detect_opencv(cascades: list[tuple[str, object]], image: Image.Image, second_pass: bool = True) -> list[Box]:
    """Faces by OpenCV's cascades; `second_pass=False` only for measuring what the second pass adds."""
    min_face = OPENCV_MIN_FACE * min(image.size)  # in the photo's pixels
    gray, scale = _gray(image, OPENCV_MAX_SIDE)
    raw = _haar(cascades, gray, max(24, round(min_face * scale)))
    if not raw and second_pass and scale < 1.0:
        # The second pass (see OPENCV_FINE_MAX_SIDE): one frontal cascade, and only the sizes the first pass may
        # have missed (larger faces are 1 px-scanned there already), which keeps it cheap.
        gray, scale = _gray(image, OPENCV_FINE_MAX_SIDE, local=True)
        fine = [c for c in cascades if c[0] == OPENCV_FINE_CASCADE]
        smallest = max(24, round(min_face * scale))
        raw = _haar(fine, gray, smallest, max(smallest + 1, round(OPENCV_FINE_MAX_FACE * min(image.size) * scale)))
    return _to_boxes(raw, scale, image.size)
