"""Stand-ins for the face recogniser, shared by the identity and evaluation tests."""

from __future__ import annotations

import torch

from fastcomposer.identity.checker import IdentityChecker
from fastcomposer.inputs.faces import FaceCropper


def stand_in_embedder(seed: int = 0) -> torch.nn.Module:
    """A tiny seeded network with ArcFace's interface: `(N, 3, 112, 112)` in [-1, 1] -> `(N, 16)`."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 16)).eval()


def offline_checker(model: torch.nn.Module | None = None, cache_dir=None) -> IdentityChecker:
    """A checker that never downloads: MTCNN faces (shipped weights), and `model` (or only cached ArcFace weights)."""
    return IdentityChecker(cropper=FaceCropper(allow_download=False), cache_dir=cache_dir, allow_download=False,
                           model=model)
