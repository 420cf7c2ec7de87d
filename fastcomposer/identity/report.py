"""What an identity check says, per image: each subject's similarity (or "not found"), shared and blended faces.

Stored in each PNG's settings (`to_dict`) and read back (`from_dict`), so a record says what was measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..inputs.face_detectors import Box

SHARED_FACE_FLAG = "on one face"


BLENDED_FLAG = "blended"


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
