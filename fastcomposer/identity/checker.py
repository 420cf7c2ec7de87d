"""Did each subject's identity hold? Faces in a generated image scored against the subjects' photos.

    >>> report = default_checker().check(image, [crop_of_him, crop_of_her], names=["man", "woman"])
    >>> report.summary()
    'man 0.62 · woman not found'

Per image:

    faces.FaceCropper.detect (RetinaFace with 5 landmarks, or OpenCV boxes)
    -> 112x112 face: similarity transform of the 5 landmarks onto ArcFace's template (facexlib's own
       alignment), else a square crop of the box
    -> ArcFace embedding (facexlib's IR-SE50), L2-normalised
    -> cosine matrix faces x subjects -> Hungarian assignment -> each subject's similarity, or "not found"

Reading the numbers: ArcFace cosine similarity is about 0 for two different people and rises with
likeness; two photos of the same person usually score above about 0.3-0.4, but the exact threshold
depends on the model, the alignment and the images, and generated faces were never part of its
calibration. So the report gives the number and no verdict: compare images with each other (and
alphas, see `evaluate.py`) rather than against a fixed cut-off.

ArcFace's weights come from facexlib's release, once, with the same integrity rules as RetinaFace's
(see `downloads.py`). Without them the check says it is unavailable, and why; it never fails a generation.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..inputs.faces import Box, DetectedFace, FaceCropper, default_cropper
from .arcface import (  # noqa: F401  (re-exported: the names of the module before the split)
    ARCFACE,
    FACE_SIZE,
    ArcFaceWeightsError,
    align_face,
    fetch_arcface,
    load_arcface,
)
from .matching import match_faces, mean_embedding, normalize, subject_names  # noqa: F401
from .report import BLENDED_FLAG, SHARED_FACE_FLAG, IdentityReport, SubjectIdentity, unavailable  # noqa: F401

logger = logging.getLogger(__name__)

Subject = Image.Image | Sequence[Image.Image]  # one photo, or several photos of one person





class IdentityChecker:
    """Detects, aligns and embeds faces, and matches them to subjects; builds ArcFace on first use.

    Args:
        cropper: the face detector; the process-wide `faces.default_cropper()` when None.
        device: where ArcFace runs ("cpu", "cuda"); a CUDA request without CUDA runs on the CPU.
        cache_dir: the folder for ArcFace's weights (see `fetch_arcface`).
        allow_download: False uses only weights already cached (tests, air-gapped servers).
        model: an already built embedding model (`(N, 3, 112, 112)` in [-1, 1] -> `(N, D)`), instead of ArcFace.
    """

    def __init__(
        self,
        cropper: FaceCropper | None = None,
        device: str = "cpu",
        cache_dir: str | os.PathLike | None = None,
        allow_download: bool = True,
        model=None,
    ):
        self._cropper = cropper
        self.device = device
        self.cache_dir = cache_dir
        self.allow_download = allow_download
        self._model = model
        self._reason = ""  # why ArcFace is unavailable, once it has failed
        self._failed_file: tuple[int, int] | None = None  # (mtime, size) of the weights file that failed, if any
        self._lock = threading.Lock()

    @property
    def cropper(self) -> FaceCropper:
        return self._cropper or default_cropper()

    def unavailable_reason(self) -> str:
        """Empty when ArcFace is ready (built now if needed, which may download it), else why not and the fix."""
        with self._lock:
            return self._ensure_model()

    def _ensure_model(self) -> str:
        """Build ArcFace once; called with the lock held. After a failure only a file copied into the cache
        by hand is tried again (a stat per call), never another download."""
        if self._model is not None:
            return ""
        path = ARCFACE.path(self.cache_dir)
        if self._reason and _file_state(path) == self._failed_file:
            return self._reason  # nothing changed on disk since the failure
        try:
            import torch

            weights = fetch_arcface(self.cache_dir, self.allow_download and not self._reason)
            device = "cpu" if self.device.startswith("cuda") and not torch.cuda.is_available() else self.device
            self._model, self._reason = load_arcface(weights, device), ""
        except ArcFaceWeightsError as e:
            self._reason = str(e)
        except Exception as e:  # noqa: BLE001 - network, disk, import or torch: the check is optional
            self._reason = (f"{ARCFACE.name} could not be had ({type(e).__name__}: {str(e)[:200]}); download it "
                            f"from {ARCFACE.url} and copy it to {path}")
        if self._reason:
            self._failed_file = _file_state(path)
            logger.warning("Identity check unavailable: %s", self._reason)
        return self._reason

    def _embed(self, crops: list[np.ndarray]) -> np.ndarray:
        """Unit ArcFace embeddings `(N, D)` of aligned uint8 faces; called with the lock held."""
        import torch

        if not crops:
            return np.zeros((0, 0))
        param = next(self._model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()  # [-1, 1]
        with torch.inference_mode():
            return normalize(self._model(x.to(device)).float().cpu().numpy())

    def embed_faces(self, image: Image.Image) -> tuple[list[DetectedFace], np.ndarray]:
        """Every face in `image` and its unit embedding `(F, D)`. Raises `ArcFaceWeightsError` when unavailable."""
        faces = self.cropper.detect(image)
        with self._lock:
            if reason := self._ensure_model():
                raise ArcFaceWeightsError(reason)
            return faces, self._embed([align_face(image, f) for f in faces])

    def reference_embedding(self, photos: Subject) -> np.ndarray | None:
        """One subject's reference: the largest face of each photo, embedded, averaged and re-normalised; None
        when no photo shows a face."""
        photos = [photos] if isinstance(photos, Image.Image) else list(photos)
        embeddings = []
        for photo in photos:
            faces, emb = self.embed_faces(photo)
            if faces:
                largest = max(range(len(faces)), key=lambda k: _area(faces[k].box))
                embeddings.append(emb[largest])
        return mean_embedding(np.stack(embeddings)) if embeddings else None

    def check_images(
        self,
        images: Sequence[Image.Image],
        references: Sequence[Subject],
        names: Sequence[str] | None = None,
        hidden: Sequence[bool] | None = None,
    ) -> list[IdentityReport]:
        """One report per image against the same subjects (embedded once). Never raises: a failure makes every
        report unavailable, with the reason.

        Args:
            images: the generated images.
            references: per subject, a photo or a list of photos (e.g. the crops the encoder saw).
            names: per subject, its caption name; "subject k" when None.
            hidden: per image, True when the safety checker replaced it (not checked).
        """
        names = list(names) if names is not None else [f"subject {k + 1}" for k in range(len(references))]
        hidden = list(hidden) if hidden is not None else [False] * len(images)
        try:
            if reason := self.unavailable_reason():
                return [unavailable(reason, names) for _ in images]
            refs = [self.reference_embedding(photos) for photos in references]
            reports = []
            for image, is_hidden in zip(images, hidden):
                if is_hidden:
                    reports.append(unavailable("hidden by the safety checker", names))
                    continue
                faces, emb = self.embed_faces(image)
                reports.append(match_faces(emb, refs, names, [f.box for f in faces], self.cropper.detector_name))
            return reports
        except Exception as e:  # noqa: BLE001 - the check must never break a generation
            logger.warning("Identity check failed (%s)", type(e).__name__, exc_info=logger.isEnabledFor(logging.DEBUG))
            return [unavailable(f"the check failed ({type(e).__name__}: {str(e)[:200]})", names) for _ in images]

    def check(self, image: Image.Image, references: Sequence[Subject], names: Sequence[str] | None = None):
        """The report for one image (see `check_images`)."""
        return self.check_images([image], references, names)[0]


def _file_state(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _area(box: Box) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


_default_checker: IdentityChecker | None = None
_default_lock = threading.Lock()


def default_checker() -> IdentityChecker:
    """The process-wide checker (GPU when there is one, the default face detector), created on first use."""
    global _default_checker
    with _default_lock:
        if _default_checker is None:
            import torch

            _default_checker = IdentityChecker(device="cuda" if torch.cuda.is_available() else "cpu")
        return _default_checker
