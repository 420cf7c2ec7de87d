"""ArcFace (facexlib's IR-SE50): its weights, fetched once with integrity checks, and faces aligned to its template."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..downloads import DownloadError, WeightsFile, fetch
from ..inputs.faces import DetectedFace

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


class ArcFaceWeightsError(DownloadError):
    """ArcFace's weights could not be had, failed their integrity check, or are not an IR-SE50 state dict."""


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
