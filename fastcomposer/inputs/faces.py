"""Find the subject's face in a reference photo and crop it the way FastComposer was trained.

FastComposer's image encoder was trained on loose crops of people (the head, some shoulders, padded
to square), not on tight face boxes, so a tight crop throws away the hair and shoulders it expects.
We take the largest detected face and grow its box into a square `margin` times the face size,
centred a little below the face so the crop holds more shoulders than background above the head.

    >>> crop = crop_subject(Image.open("assets/astronaut.png"), name="photo 1")  # or NoFaceFoundError
    >>> crop.image.size, crop.box, crop.detector  # with the OpenCV fallback
    ((242, 242), (102, 2, 344, 244), 'opencv')

Detectors: facexlib's RetinaFace (ResNet-50) when its weights can be had (downloaded once from the
facexlib release, sha256-checked, loaded with weights_only=True); otherwise OpenCV's Haar cascades,
which ship inside opencv-python and so work offline, with a second, finer pass for faces small in a large
photo (see OPENCV_FINE_MAX_SIDE).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..downloads import DOWNLOAD_TIMEOUT_S, DownloadError, WeightsFile, fetch
from ..messages import PhotoRef, UserFacingError, Wording

logger = logging.getLogger(__name__)

WEIGHTS_URL = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth"
WEIGHTS_FILE = "detection_Resnet50_Final.pth"
# facexlib publishes no checksum for this file (its own loader passes hash_prefix=None) and it could not
# be downloaded where this was written, so nothing is pinned: the first download's sha256 is recorded
# beside the file and any later file must match it. A maintainer pins the real value here or in the env.
WEIGHTS_SHA256: str | None = None
SHA256_ENV = "FASTCOMPOSER_FACE_WEIGHTS_SHA256"
DETECTOR_ENV = "FASTCOMPOSER_FACE_DETECTOR"  # "opencv" skips RetinaFace (CI, air-gapped servers)
MAX_WEIGHTS_BYTES = 256 * 2**20  # the real file is about 105 MB; a larger answer is not it

DEFAULT_MARGIN = 2.6  # crop side / face width: head, hair and some shoulders on the bundled portraits
# The sensible range for a per-photo margin control: below ~1.4 the crop cuts into the hair and chin, above ~3.2
# a face that is small in the photo leaves the encoder little of itself. The model was trained on loose crops.
MARGIN_TIGHT_FACE = 1.4  # the face and some hair
MARGIN_HEAD_AND_SHOULDERS = 3.2  # head, shoulders and some of the chest
CENTER_SHIFT = 0.1  # the crop centre sits this many face widths below the face centre (shoulders > sky)
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
class FaceCrop:
    """One subject's crop and where it came from."""

    image: Image.Image  # the square crop, RGB, at the source photo's resolution
    box: Box  # the crop box (x0, y0, x1, y1) in the source photo
    face_box: Box  # the detected face the crop was built around (the largest one), in the source photo
    num_faces: int  # faces found; more than one means the largest was taken
    detector: str  # "retinaface" or "opencv"


@dataclass
class DetectedFace:
    """One face found by `FaceCropper.detect`, in the photo's pixel coordinates."""

    box: Box  # (x0, y0, x1, y1), clipped to the photo
    score: float | None  # RetinaFace's confidence; None from OpenCV, which gives none
    # RetinaFace's 5 points (x, y): left eye, right eye, nose tip, left and right mouth corner, as seen in the
    # photo; None from OpenCV
    landmarks: tuple[tuple[float, float], ...] | None = None


class NoFaceFoundError(UserFacingError, ValueError):
    """No face in a reference photo; the message names the photo and the two ways out, for each audience."""

    WORDING = Wording(
        page="No face found in {photo}. Use a photo where the face is visible and front-facing, or tick "
        "'Use whole photo' under {photo} to use it uncropped.",
        cli="No face found in {photo}. Use a photo where the face is visible and front-facing, or pass "
        "--no-face-crop to use the whole photo.",
        api="No face found in {photo}. Use a photo where the face is visible and front-facing, or turn off face "
        "crop (`face_crop=False`) to use the whole photo.",
    )

    def __init__(self, name: str | PhotoRef = "the photo"):
        super().__init__(self.WORDING, name)
        self.name = self.photo.name


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


def _check_margin(margin: float) -> None:
    if not isinstance(margin, (int, float)) or not margin >= 1.0:  # `not >=` also refuses NaN
        raise ValueError(f"margin must be a number >= 1 (a crop at least as large as the face), got {margin!r}")


def square_box(face_box: Box, image_size: tuple[int, int], margin: float = DEFAULT_MARGIN) -> Box:
    """The square (x0, y0, x1, y1) crop around `face_box`: `margin` (>= 1) x the face size, inside the
    (width, height) image, shifted at the edges and shrunk to the short side when larger. It contains the
    face whenever the short side can hold it."""
    _check_margin(margin)
    width, height = image_size
    fx0, fy0, fx1, fy1 = face_box
    # Both detectors agree on a face's width (cheek to cheek), not its height: RetinaFace's boxes run
    # forehead to chin (~1.25x the width), Haar's are squares. 0.8 x height stands in for the width
    # of a turned face, so crops come out the same size whichever detector ran.
    size = max(fx1 - fx0, 0.8 * (fy1 - fy0), 1)
    side = max(1, min(round(size * margin), width, height))
    left = round((fx0 + fx1) / 2 - side / 2)
    top = round((fy0 + fy1) / 2 + CENTER_SHIFT * size - side / 2)
    # Keep the whole face in view (the shift must not push the chin or forehead out)...
    left = max(min(left, fx0), fx1 - side)
    top = max(min(top, fy0), fy1 - side)
    # ...then move, never shrink, the square back inside the image.
    left = min(max(left, 0), width - side)
    top = min(max(top, 0), height - side)
    return (left, top, left + side, top + side)


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


class FaceCropper:
    """Finds and crops faces; builds its detector on first use, one crop at a time (thread-safe).

    Args:
        device: where RetinaFace runs ("cpu", "cuda"); a CUDA request without CUDA runs on the CPU.
        cache_dir: the folder for RetinaFace's weights (see `fetch_weights`).
        allow_download: False uses only weights already cached, else the OpenCV fallback (tests, CI).
        margin: crop side over face size (see `square_box`), the default for `crop`; from MARGIN_TIGHT_FACE (1.4)
            to MARGIN_HEAD_AND_SHOULDERS (3.2) is the sensible range.
    """

    def __init__(
        self,
        device: str = "cpu",
        cache_dir: str | os.PathLike | None = None,
        allow_download: bool = True,
        margin: float = DEFAULT_MARGIN,
    ):
        _check_margin(margin)
        self.device = device
        self.cache_dir = cache_dir
        self.allow_download = allow_download
        self.margin = margin
        self._lock = threading.Lock()
        self._name: str | None = None
        self._model = None  # RetinaFace, or the list of Haar cascades

    @property
    def detector_name(self) -> str:
        """Either "retinaface" or "opencv" (builds the detector if needed, which may download its weights)."""
        with self._lock:
            self._ensure_detector()
            return self._name

    def _ensure_detector(self) -> None:
        """Build the detector once; called with the lock held."""
        if self._name is not None:
            return
        try:
            if os.environ.get(DETECTOR_ENV, "").strip().lower() == "opencv":
                raise FaceWeightsError(f"{DETECTOR_ENV}=opencv")
            weights = fetch_weights(self.cache_dir, self.allow_download)
            import torch

            device = "cpu" if self.device.startswith("cuda") and not torch.cuda.is_available() else self.device
            self._model, self._name = load_retinaface(weights, device), "retinaface"
        except Exception as exc:  # noqa: BLE001 - any failure (network, hash, import, torch) must still leave a cropper
            reason = f"{type(exc).__name__}: {exc}"[:300]
            logger.warning(
                "RetinaFace face detector unavailable (%s); using OpenCV's Haar cascades instead, "
                "which miss more turned and small faces",
                reason,
            )
            self._model, self._name = _load_cascades(), "opencv"

    def detect(self, image: Image.Image) -> list[DetectedFace]:
        """Every face in `image` (any mode), with RetinaFace's score and 5 landmarks when it is the detector.

        Unlike `crop`, finding no face is not an error: the list is empty.
        """
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        with self._lock:
            self._ensure_detector()
            if self._name == "retinaface":
                return _retinaface_faces(self._model, rgb)
            return [DetectedFace(box, None) for box in _detect_opencv(self._model, rgb)]

    def crop(self, image: Image.Image, name: str | PhotoRef = "the photo", margin: float | None = None) -> FaceCrop:
        """Crop the largest face in `image` with its head and some shoulders.

        Args:
            image: the reference photo, already loaded (any mode; it is converted to RGB).
            name: how error messages refer to the photo, e.g. "photo 2" (a `PhotoRef` also gives its path, which
                only the command line's wording shows).
            margin: crop side over face size for this photo (see `square_box`); None uses the cropper's. From
                MARGIN_TIGHT_FACE (1.4, a tight face) to MARGIN_HEAD_AND_SHOULDERS (3.2) is the sensible range.

        Raises:
            NoFaceFoundError: no face was found. ValueError: `margin` is below 1 or not a number.
        """
        margin = self.margin if margin is None else margin
        _check_margin(margin)  # before detecting: a bad argument should not cost a detection
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        with self._lock:
            self._ensure_detector()
            detect = _detect_retinaface if self._name == "retinaface" else _detect_opencv
            faces = detect(self._model, rgb)
            detector = self._name
        if not faces:
            raise NoFaceFoundError(name)
        face = max(faces, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
        box = square_box(face, rgb.size, margin)
        logger.debug("%s found %d face(s); crop side %d px", detector, len(faces), box[2] - box[0])
        return FaceCrop(rgb.crop(box), box, face, len(faces), detector)


_default_cropper: FaceCropper | None = None
_default_lock = threading.Lock()


def default_cropper() -> FaceCropper:
    """The process-wide cropper (GPU when there is one), created on first use."""
    global _default_cropper
    with _default_lock:
        if _default_cropper is None:
            import torch

            _default_cropper = FaceCropper(device="cuda" if torch.cuda.is_available() else "cpu")
        return _default_cropper


def crop_subject(
    image: Image.Image,
    name: str | PhotoRef = "the photo",
    cropper: FaceCropper | None = None,
    margin: float | None = None,
) -> FaceCrop:
    """Crop the subject in `image` with `cropper`, or the process-wide default one (see FaceCropper.crop)."""
    return (cropper or default_cropper()).crop(image, name, margin)
