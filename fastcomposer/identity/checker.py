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
import re
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..downloads import DownloadError, WeightsFile, fetch
from ..inputs.faces import Box, DetectedFace, FaceCropper, default_cropper

logger = logging.getLogger(__name__)

ARCFACE = WeightsFile(
    name="recognition_arcface_ir_se50.pth",
    url="https://github.com/xinntao/facexlib/releases/download/v0.1.0/recognition_arcface_ir_se50.pth",
    sha256_env="FASTCOMPOSER_ARCFACE_SHA256",
    description="ArcFace weights (about 175 MB)",
    # Like RetinaFace's: facexlib publishes no checksum and the file could not be fetched where this was
    # written, so nothing is pinned (trust on first use); a maintainer pins the real value in the env.
    sha256=None,
    max_bytes=256 * 2**20,
    subdir="facexlib",
)
FACE_SIZE = 112  # ArcFace's input side
SHARED_FACE_FLAG = "on one face"
BLENDED_FLAG = "blended"

Subject = Image.Image | Sequence[Image.Image]  # one photo, or several photos of one person


class ArcFaceWeightsError(DownloadError):
    """ArcFace's weights could not be had, failed their integrity check, or are not an IR-SE50 state dict."""


# --- the report ----------------------------------------------------------------------------------------


@dataclass
class SubjectIdentity:
    """How one subject fared in one image."""

    name: str  # the subject word from the prompt ("man"), for captions
    similarity: float | None = None  # ArcFace cosine of the assigned face to the reference; None: not found
    face: int | None = None  # index into `IdentityReport.faces` of the assigned face
    has_reference: bool = True  # False: no face was found in this subject's photos, so nothing to compare

    @property
    def found(self) -> bool:
        return self.similarity is not None


@dataclass
class IdentityReport:
    """One image's identity check. `summary()` is the one-line caption; `to_dict()` goes into the PNG.

    Flags, over the faces and the subjects that have a reference face:
    - `shared_faces`: groups of two or more subjects whose *best match* (the face with the highest cosine
      to their reference, before any assignment) is the same face, i.e. two subjects landed on one face.
      With fewer faces than subjects this holds by construction; the similarities say how close each is.
    - `blended`: pairs of subjects a, b whose assigned faces are more similar to each other than each is
      to its own reference: cos(face_a, face_b) > cos(face_a, ref_a) and > cos(face_b, ref_b).
    """

    available: bool  # False: the check could not run (see `reason`)
    reason: str = ""  # why it could not run, and what to do about it
    subjects: list[SubjectIdentity] = field(default_factory=list)  # in marker order
    num_faces: int = 0  # faces detected in the image
    faces: list[Box] = field(default_factory=list)  # their boxes (x0, y0, x1, y1), in detection order
    shared_faces: list[list[int]] = field(default_factory=list)  # subject indices (0-based) per shared face
    blended: list[list[int]] = field(default_factory=list)  # subject index pairs (0-based)
    detector: str = ""  # "retinaface" or "opencv"

    def summary(self) -> str:
        """One short line, e.g. `man 0.62 · woman not found · ⚠ man+woman blended`."""
        if not self.available:
            return f"identity check unavailable: {self.reason}"
        parts = []
        for s in self.subjects:
            if not s.has_reference:
                parts.append(f"{s.name} no reference face")
            else:
                parts.append(f"{s.name} {s.similarity:.2f}" if s.found else f"{s.name} not found")
        names = [s.name for s in self.subjects]
        parts += [f"⚠ {'+'.join(names[k] for k in group)} {SHARED_FACE_FLAG}" for group in self.shared_faces]
        parts += [f"⚠ {'+'.join(names[k] for k in pair)} {BLENDED_FLAG}" for pair in self.blended]
        return " · ".join(parts) if parts else "no subjects"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IdentityReport:
        """The report `to_dict` wrote (unknown keys, e.g. from a newer version, are ignored)."""
        known = {f.name for f in fields(cls)} - {"subjects", "faces"}
        subject_keys = {f.name for f in fields(SubjectIdentity)}
        return cls(
            **{k: v for k, v in data.items() if k in known},
            subjects=[SubjectIdentity(**{k: v for k, v in s.items() if k in subject_keys})
                      for s in data.get("subjects", [])],
            faces=[tuple(int(v) for v in box) for box in data.get("faces", [])],
        )


def unavailable(reason: str, names: Sequence[str] = ()) -> IdentityReport:
    return IdentityReport(False, reason, [SubjectIdentity(n, has_reference=False) for n in names])


# --- matching (pure numpy; the tests drive it with synthetic embeddings) --------------------------------


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm == 0, 1.0, norm)


def mean_embedding(embeddings: np.ndarray) -> np.ndarray:
    """Several photos of one person -> one reference: the mean of the unit embeddings, re-normalised."""
    return normalize(normalize(embeddings).mean(axis=0))


def match_faces(
    face_embeddings: np.ndarray,
    references: Sequence[np.ndarray | None],
    names: Sequence[str],
    boxes: Sequence[Box] = (),
    detector: str = "",
) -> IdentityReport:
    """Assign faces to subjects and flag shared and blended faces (see `IdentityReport`).

    Args:
        face_embeddings: `(F, D)`, one row per detected face (F may be 0).
        references: per subject, its `(D,)` reference embedding, or None when its photos showed no face.
        names: per subject, its caption name.

    The assignment maximises the total cosine over one-to-one face-subject pairs (Hungarian algorithm,
    `scipy.optimize.linear_sum_assignment`), so faces listed in any order land on the right subjects. A
    subject left without a face (fewer faces than subjects, or none) is "not found".
    """
    from scipy.optimize import linear_sum_assignment

    num_faces = len(face_embeddings)
    subjects = [SubjectIdentity(name, has_reference=ref is not None) for name, ref in zip(names, references)]
    scored = [k for k, ref in enumerate(references) if ref is not None]  # subjects that can be matched
    report = IdentityReport(True, subjects=subjects, num_faces=num_faces, faces=[tuple(b) for b in boxes],
                            detector=detector)
    if num_faces == 0 or not scored:
        return report
    faces = normalize(face_embeddings)
    refs = normalize(np.stack([references[k] for k in scored]))
    sim = faces @ refs.T  # (F, S): cosine of face i to subject scored[j]

    for i, j in zip(*linear_sum_assignment(sim, maximize=True)):
        subjects[scored[j]].similarity, subjects[scored[j]].face = float(sim[i, j]), int(i)

    best = sim.argmax(axis=0)  # each subject's best face, before the one-to-one assignment
    for face in sorted(set(best.tolist())):
        group = [scored[j] for j in range(len(scored)) if best[j] == face]
        if len(group) > 1:
            report.shared_faces.append(group)

    matched = [k for k in scored if subjects[k].found]
    for x, a in enumerate(matched):
        for b in matched[x + 1:]:
            between = float(faces[subjects[a].face] @ faces[subjects[b].face])
            if between > subjects[a].similarity and between > subjects[b].similarity:
                report.blended.append([a, b])
    return report


def subject_names(prompt: str, count: int) -> list[str]:
    """The word before each `img` marker ("a man img and a woman img" -> ["man", "woman"]), numbered when
    two are the same ("man#1", "man#2"); "subject k" where the prompt does not say."""
    from ..inputs.prompt import MARKER_PATTERN  # imports transformers: only when needed

    pieces = MARKER_PATTERN.split(prompt)[:-1] if isinstance(prompt, str) else []
    words = [(re.findall(r"[^\W_][\w'-]*", piece) or [""])[-1] for piece in pieces]
    if len(words) != count or not all(words):
        return [f"subject {k + 1}" for k in range(count)]
    return [f"{w}#{k + 1}" if words.count(w) > 1 else w for k, w in enumerate(words)]


# --- ArcFace -------------------------------------------------------------------------------------------


def fetch_arcface(
    cache_dir: str | os.PathLike | None = None, allow_download: bool = True, sha256: str | None = None
) -> Path:
    """The path of integrity-checked ArcFace weights (see `downloads.fetch`); $FASTCOMPOSER_ARCFACE_SHA256 pins
    the hash. Raises `ArcFaceWeightsError`, or `OSError` when the download fails."""
    return fetch(ARCFACE, cache_dir, allow_download, sha256, error=ArcFaceWeightsError)


def load_arcface(weights: str | os.PathLike, device: str = "cpu"):
    """facexlib's ArcFace (IR-SE50) with `weights`, loaded without running any pickled code.

    The architecture is the one `facexlib.recognition.init_recognition_model("arcface")` builds; its loader
    reads the release strictly, so the keys carry no prefix (a `module.` one, from nn.DataParallel, is dropped).
    """
    import torch
    from facexlib.recognition.arcface_arch import Backbone

    state = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArcFaceWeightsError(f"{Path(weights).name} does not hold a state dict")
    with torch.device("meta"):  # no random init of 44M parameters that the file replaces at once
        model = Backbone(num_layers=50, drop_ratio=0.6, mode="ir_se")
    try:
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise ArcFaceWeightsError(f"{Path(weights).name} is not facexlib's ArcFace IR-SE50: {str(e)[:300]}") from None
    return model.to(device=device, dtype=torch.float32).eval()


def align_face(image: Image.Image, face: DetectedFace) -> np.ndarray:
    """The 112x112 RGB face ArcFace expects, as a uint8 `(112, 112, 3)` array.

    With landmarks: facexlib's own alignment (the similarity transform its RetinaFace uses before
    recognition) onto the standard ArcFace 5-point template. Without (OpenCV boxes): the square around the
    box, resized, which is looser and less accurate.
    """
    rgb = np.asarray(image.convert("RGB"))
    if face.landmarks is not None:
        from facexlib.detection.align_trans import get_reference_facial_points, warp_and_crop_face

        template = get_reference_facial_points(default_square=True)  # the 112x112 ArcFace template
        return warp_and_crop_face(rgb, face.landmarks, template, crop_size=(FACE_SIZE, FACE_SIZE))
    x0, y0, x1, y1 = face.box
    side = max(x1 - x0, y1 - y0)
    left, top = (x0 + x1 - side) // 2, (y0 + y1 - side) // 2
    square = image.convert("RGB").crop((left, top, left + side, top + side))  # outside the photo: black
    return np.asarray(square.resize((FACE_SIZE, FACE_SIZE), Image.Resampling.BILINEAR))


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
