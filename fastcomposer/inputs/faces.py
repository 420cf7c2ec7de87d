"""Find the subject's face in a reference photo and crop it the way FastComposer was trained.

FastComposer's image encoder was trained on loose crops of people (the head, some shoulders, padded
to square), not on tight face boxes, so a tight crop throws away the hair and shoulders it expects.
We take the largest detected face and grow its box into a square `margin` times the face size,
centred a little below the face so the crop holds more shoulders than background above the head.

    >>> crop = crop_subject(Image.open("assets/astronaut.png"), name="photo 1")  # or NoFaceFoundError
    >>> crop.image.size, crop.box, crop.detector  # with the OpenCV fallback
    ((242, 242), (102, 2, 344, 244), 'opencv')

Detectors (face_detectors.py): facexlib's RetinaFace when its weights can be had, else OpenCV's Haar cascades.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from PIL import Image

from ..messages import PhotoRef, UserFacingError, Wording
from .face_detectors import (
    _NO_DETECTOR,
    DETECTORS,
    Box,
    DetectedFace,
    FaceDetectorUnavailableError,
    FaceWeightsError,
    _detect_opencv,
    _load_cascades,
    _mtcnn_faces,
    _retinaface_faces,
    fetch_weights,
    load_mtcnn,
    load_retinaface,
)

__all__ = ["Box", "DetectedFace", "FaceCrop", "FaceCropper", "FaceDetectorUnavailableError", "FaceWeightsError",
           "NoFaceFoundError", "crop_subject", "default_cropper", "square_box"]

logger = logging.getLogger(__name__)

DETECTOR_ENV = "FASTCOMPOSER_FACE_DETECTOR"  # retinaface | mtcnn | opencv: the detector to start from
DEFAULT_MARGIN = 2.6  # crop side / face width: head, hair and some shoulders on the bundled portraits
# The sensible range for a per-photo margin control: below ~1.4 the crop cuts into the hair and chin, above ~3.2
# a face that is small in the photo leaves the encoder little of itself. The model was trained on loose crops.
MARGIN_TIGHT_FACE = 1.4  # the face and some hair
MARGIN_HEAD_AND_SHOULDERS = 3.2  # head, shoulders and some of the chest
CENTER_SHIFT = 0.1  # the crop centre sits this many face widths below the face centre (shoulders > sky)
@dataclass
class FaceCrop:
    """One subject's crop and where it came from."""

    image: Image.Image  # the square crop, RGB, at the source photo's resolution
    box: Box  # the crop box (x0, y0, x1, y1) in the source photo
    face_box: Box  # the detected face the crop was built around (the largest one), in the source photo
    num_faces: int  # faces found; more than one means the largest was taken
    detector: str  # "retinaface", "mtcnn" or "opencv"


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


class FaceCropper:
    """Finds and crops faces; builds its detector on first use, one crop at a time (thread-safe).

    Args:
        device: where RetinaFace runs ("cpu", "cuda"); a CUDA request without CUDA runs on the CPU.
        cache_dir: the folder for RetinaFace's weights (see `fetch_weights`).
        allow_download: False uses only weights already cached, else the OpenCV fallback (tests, CI).
        margin: crop side over face size (see `square_box`), the default for `crop`; from MARGIN_TIGHT_FACE (1.4)
            to MARGIN_HEAD_AND_SHOULDERS (3.2) is the sensible range.
        detector: the detector to start from ("retinaface", "mtcnn" or "opencv"); by default
            $FASTCOMPOSER_FACE_DETECTOR, else RetinaFace. A detector that cannot be built hands over to the next.
    """

    def __init__(
        self,
        device: str = "cpu",
        cache_dir: str | os.PathLike | None = None,
        allow_download: bool = True,
        margin: float = DEFAULT_MARGIN,
        detector: str | None = None,
    ):
        _check_margin(margin)
        self.wanted = detector
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
        """Build the detector once; called with the lock held. RetinaFace, else MTCNN, else Haar cascades
        (`FASTCOMPOSER_FACE_DETECTOR` names the one to start from)."""
        if self._name is not None:
            return
        wanted = (self.wanted or os.environ.get(DETECTOR_ENV, "")).strip().lower() or DETECTORS[0]
        if wanted not in DETECTORS:
            raise FaceDetectorUnavailableError(
                _NO_DETECTOR, problem=f"{DETECTOR_ENV}={wanted!r} is not a face detector",
                fix=f"set it to one of {', '.join(DETECTORS)} or unset it",
            )
        for name in DETECTORS[DETECTORS.index(wanted):]:
            if name == "opencv":
                self._model, self._name = _load_cascades(), "opencv"
                return
            try:
                self._model, self._name = self._build(name), name
                return
            except Exception as exc:  # noqa: BLE001 - any failure (network, hash, import, torch): try the next one
                reason = f"{type(exc).__name__}: {exc}"[:300]
                later = DETECTORS[DETECTORS.index(name) + 1]
                logger.warning("%s face detector unavailable (%s); trying %s", name, reason, later)

    def _build(self, name: str):
        if name == "mtcnn":
            return load_mtcnn()
        weights = fetch_weights(self.cache_dir, self.allow_download)
        import torch

        device = "cpu" if self.device.startswith("cuda") and not torch.cuda.is_available() else self.device
        return load_retinaface(weights, device)

    def _faces(self, rgb: Image.Image) -> list[DetectedFace]:
        """Every face by the current detector; called with the lock held."""
        if self._name == "retinaface":
            return _retinaface_faces(self._model, rgb)
        if self._name == "mtcnn":
            return _mtcnn_faces(self._model, rgb)
        return [DetectedFace(box, None) for box in _detect_opencv(self._model, rgb)]

    def detect(self, image: Image.Image) -> list[DetectedFace]:
        """Every face in `image` (any mode), with RetinaFace's score and 5 landmarks when it is the detector.

        Unlike `crop`, finding no face is not an error: the list is empty.
        """
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        with self._lock:
            self._ensure_detector()
            return self._faces(rgb)

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
            faces = [face.box for face in self._faces(rgb)]
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
