"""Faces to subjects: the optimal one-to-one assignment by cosine, and the flags for shared and blended faces.

Pure numpy (and scipy's assignment), so the tests drive it with synthetic embeddings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ..inputs.faces import Box
from .report import IdentityReport, SubjectIdentity


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


def greedy_identity(similarity: np.ndarray, num_subjects: int) -> tuple[float, list[float]]:
    """The authors' multi-subject identity score from a `(faces, subjects)` cosine matrix.

    Repeatedly take the most similar remaining (face, subject) pair and remove both; a subject left without a
    face gets 0. Returns the image's score, max(0, the minimum over subjects), and each subject's value.
    """
    sim = np.array(similarity, dtype=np.float64).reshape(-1, num_subjects)
    per_subject = [0.0] * num_subjects
    for _ in range(min(sim.shape)):
        i, j = np.unravel_index(np.argmax(sim), sim.shape)
        per_subject[j] = float(sim[i, j])
        sim[i, :], sim[:, j] = -np.inf, -np.inf
    return max(0.0, min(per_subject)), per_subject


def score_faces(face_embeddings: np.ndarray, references: np.ndarray) -> dict:
    """The evaluation's per-image identity from face embeddings `(F, D)` (already cut to the faces to use) and each
    subject's reference `(k, D)`: cosines clamped at 0, faces and subjects paired greedily (`greedy_identity`), the
    image's score the least similar subject's. Also `blended`: two paired faces more like each other than each is
    like its own subject (the identity check's flag, on the greedy pairs)."""
    faces, refs = normalize(face_embeddings).reshape(-1, np.shape(references)[-1]), normalize(references)
    k = len(refs)
    sim = np.zeros((max(len(faces), k), k))  # rows past the faces found stay 0: "no face"
    if len(faces):
        sim[: len(faces)] = np.clip(faces @ refs.T, 0.0, None)
    score, per_subject = greedy_identity(sim, k)
    pairs, work = {}, sim.copy()
    for _ in range(min(len(faces), k)):
        i, j = np.unravel_index(np.argmax(work), work.shape)
        pairs[j] = i
        work[i, :], work[:, j] = -np.inf, -np.inf
    blended = any(
        float(faces[pairs[a]] @ faces[pairs[b]]) > max(per_subject[a], per_subject[b])
        for a in pairs for b in pairs if a < b
    )
    return dict(identity=score, subjects=per_subject, num_faces=len(faces), blended=blended)
