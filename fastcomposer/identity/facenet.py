"""FaceNet (InceptionResnetV1, VGGFace2 weights): the face model of FastComposer's own identity metric.

The paper's evaluation (Xiao et al. 2023, section 5) scores identity with facenet-pytorch: MTCNN finds the faces
(160 px crops, margin 0, thresholds 0.6/0.7/0.7, every face, largest first), each crop is standardised as
`(x - 127.5) / 128`, and FaceNet's L2-normalised 512-d embeddings are compared by cosine. `paper_identity`
applies it to one generated image (see its docstring); `evaluate --identity-model facenet` uses it, and only then
are the numbers comparable with the paper's 0.514.

The network is written here from its published structure (Szegedy et al. 2017, Inception-ResNet-v1, as trained by
D. Sandberg's facenet on VGGFace2 and converted by facenet-pytorch): facenet-pytorch pins torch < 2.3. Its key
names and shapes are those of facenet-pytorch's `state_dict()`, so the released file (about 107 MB, with its
8631-class `logits` layer, which embeddings do not use) loads strictly. It is downloaded once, with the
integrity rules of `downloads.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ..downloads import DownloadError, WeightsFile, fetch

FACENET = WeightsFile(
    name="20180402-114759-vggface2.pt",
    url="https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt",
    sha256_env="FASTCOMPOSER_FACENET_SHA256",
    description="FaceNet VGGFace2 weights (about 107 MB)",
    # No checksum is published and the file could not be fetched where this was written: nothing is pinned (trust
    # on first use, recorded beside the file); a maintainer pins the real value in the environment variable.
    sha256=None,
    max_bytes=256 * 2**20,
    subdir="facenet",
)
FACE_SIZE = 160  # FaceNet's input side, as the paper's evaluation crops
VGGFACE2_CLASSES = 8631  # the released file's classification layer


class FaceNetWeightsError(DownloadError):
    """FaceNet's weights could not be had, failed their integrity check, or are not an InceptionResnetV1."""


class ConvBN(nn.Sequential):
    """Convolution without bias, batch norm (TensorFlow's epsilon 0.001), ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001, momentum=0.1)
        self.relu = nn.ReLU()


class Residual(nn.Module):
    """An Inception-ResNet block: parallel branches, concatenated, projected back (`conv2d`), scaled and added."""

    def __init__(self, branches: list[nn.Module], width: int, channels: int, scale: float, relu: bool = True):
        super().__init__()
        for k, branch in enumerate(branches):
            setattr(self, f"branch{k}", branch)
        self.num_branches, self.scale = len(branches), scale
        self.conv2d = nn.Conv2d(width, channels, 1)
        self.relu = nn.ReLU() if relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([getattr(self, f"branch{k}")(x) for k in range(self.num_branches)], dim=1)
        out = self.conv2d(out) * self.scale + x
        return self.relu(out) if self.relu is not None else out


def block35(scale: float = 0.17) -> Residual:
    """35x35 grid, 256 channels."""
    return Residual([ConvBN(256, 32, 1),
                     nn.Sequential(ConvBN(256, 32, 1), ConvBN(32, 32, 3, padding=1)),
                     nn.Sequential(ConvBN(256, 32, 1), ConvBN(32, 32, 3, padding=1), ConvBN(32, 32, 3, padding=1))],
                    96, 256, scale)


def block17(scale: float = 0.10) -> Residual:
    """17x17 grid, 896 channels."""
    return Residual([ConvBN(896, 128, 1),
                     nn.Sequential(ConvBN(896, 128, 1), ConvBN(128, 128, (1, 7), padding=(0, 3)),
                                   ConvBN(128, 128, (7, 1), padding=(3, 0)))],
                    256, 896, scale)


def block8(scale: float = 0.20, relu: bool = True) -> Residual:
    """8x8 grid, 1792 channels."""
    return Residual([ConvBN(1792, 192, 1),
                     nn.Sequential(ConvBN(1792, 192, 1), ConvBN(192, 192, (1, 3), padding=(0, 1)),
                                   ConvBN(192, 192, (3, 1), padding=(1, 0)))],
                    384, 1792, scale, relu)


class Reduction(nn.Module):
    """A grid reduction: branches with stride 2 and a max pool, concatenated."""

    def __init__(self, branches: list[nn.Module]):
        super().__init__()
        for k, branch in enumerate(branches):
            setattr(self, f"branch{k}", branch)
        self.num_branches = len(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, f"branch{k}")(x) for k in range(self.num_branches)], dim=1)


class InceptionResnetV1(nn.Module):
    """FaceNet: (n, 3, 160, 160) standardised faces -> (n, 512) unit embeddings."""

    def __init__(self, num_classes: int = VGGFACE2_CLASSES):
        super().__init__()
        self.conv2d_1a = ConvBN(3, 32, 3, stride=2)
        self.conv2d_2a = ConvBN(32, 32, 3)
        self.conv2d_2b = ConvBN(32, 64, 3, padding=1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = ConvBN(64, 80, 1)
        self.conv2d_4a = ConvBN(80, 192, 3)
        self.conv2d_4b = ConvBN(192, 256, 3, stride=2)
        self.repeat_1 = nn.Sequential(*[block35() for _ in range(5)])
        self.mixed_6a = Reduction([ConvBN(256, 384, 3, stride=2),
                                   nn.Sequential(ConvBN(256, 192, 1), ConvBN(192, 192, 3, padding=1),
                                                 ConvBN(192, 256, 3, stride=2)),
                                   nn.MaxPool2d(3, stride=2)])
        self.repeat_2 = nn.Sequential(*[block17() for _ in range(10)])
        self.mixed_7a = Reduction([nn.Sequential(ConvBN(896, 256, 1), ConvBN(256, 384, 3, stride=2)),
                                   nn.Sequential(ConvBN(896, 256, 1), ConvBN(256, 256, 3, stride=2)),
                                   nn.Sequential(ConvBN(896, 256, 1), ConvBN(256, 256, 3, padding=1),
                                                 ConvBN(256, 256, 3, stride=2)),
                                   nn.MaxPool2d(3, stride=2)])
        self.repeat_3 = nn.Sequential(*[block8() for _ in range(5)])
        self.block8 = block8(scale=1.0, relu=False)
        self.avgpool_1a = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.6)
        self.last_linear = nn.Linear(1792, 512, bias=False)
        self.last_bn = nn.BatchNorm1d(512, eps=0.001, momentum=0.1)
        self.logits = nn.Linear(512, num_classes)  # VGGFace2's identities: in the file, unused for embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in (self.conv2d_1a, self.conv2d_2a, self.conv2d_2b, self.maxpool_3a, self.conv2d_3b,
                      self.conv2d_4a, self.conv2d_4b, self.repeat_1, self.mixed_6a, self.repeat_2, self.mixed_7a,
                      self.repeat_3, self.block8, self.avgpool_1a, self.dropout):
            x = stage(x)
        x = self.last_bn(self.last_linear(x.flatten(1)))
        return F.normalize(x, p=2, dim=1)


def fetch_facenet(cache_dir: str | os.PathLike | None = None, allow_download: bool = True,
                  sha256: str | None = None) -> Path:
    """The path of integrity-checked FaceNet weights (see `downloads.fetch`); $FASTCOMPOSER_FACENET_SHA256 pins
    the hash. Raises `FaceNetWeightsError` (with where to put the file by hand), or `OSError` on a failed download."""
    return fetch(FACENET, cache_dir, allow_download, sha256, error=FaceNetWeightsError)


def load_facenet(weights: str | os.PathLike, device: str = "cpu") -> InceptionResnetV1:
    """FaceNet with `weights` (the VGGFace2 release), loaded strictly and without running pickled code."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FaceNetWeightsError(f"{Path(weights).name} does not hold a state dict")
    classes = state["logits.weight"].shape[0] if "logits.weight" in state else VGGFACE2_CLASSES
    model = InceptionResnetV1(num_classes=classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise FaceNetWeightsError(f"{Path(weights).name} is not a FaceNet InceptionResnetV1: {str(e)[:300]}") from None
    return model.to(device).eval()


def face_crops(image: Image.Image, boxes: list) -> torch.Tensor:
    """The paper's crops: each box (margin 0) cut at whole pixels inside the image, resized to 160x160 (bilinear),
    standardised as (x - 127.5) / 128: (n, 3, 160, 160)."""
    width, height = image.size
    crops = []
    for x0, y0, x1, y1 in boxes:
        box = (int(max(x0, 0)), int(max(y0, 0)), int(min(x1, width)), int(min(y1, height)))
        face = image.crop(box).resize((FACE_SIZE, FACE_SIZE), Image.Resampling.BILINEAR)
        crops.append(torch.from_numpy(np.asarray(face, dtype=np.float32)).permute(2, 0, 1))
    return (torch.stack(crops) - 127.5) / 128.0 if crops else torch.zeros(0, 3, FACE_SIZE, FACE_SIZE)


class PaperIdentity:
    """FastComposer's identity metric for generated images: MTCNN (the authors' settings) and FaceNet.

    Per image: the faces MTCNN finds, largest first; as many as there are subjects are kept (too few: the missing
    ones count as no face). Each kept face's FaceNet embedding is compared with each subject's reference by cosine,
    pairs are taken greedily (the most similar first), and the image scores the least similar subject's cosine,
    clamped at 0. An image without a face scores 0.

    Args:
        model: a loaded `InceptionResnetV1` (tests); else the VGGFace2 weights, fetched on first use.
        cache_dir, allow_download: where the weights live, and whether they may be downloaded.
    """

    name = "FaceNet (InceptionResnetV1, VGGFace2) with MTCNN: the paper's metric"
    detector_name = "mtcnn (the paper's settings)"

    def __init__(self, model: nn.Module | None = None, cache_dir: str | os.PathLike | None = None,
                 allow_download: bool = True, device: str = "cpu"):
        from ..inputs.mtcnn import MTCNN

        self.model, self.cache_dir, self.allow_download, self.device = model, cache_dir, allow_download, device
        self.detector = MTCNN.load()  # min face 20 px, thresholds 0.6/0.7/0.7, factor 0.709: the authors'

    def unavailable_reason(self) -> str | None:
        """Why FaceNet cannot be used here (it is fetched now if needed), or None."""
        if self.model is None:
            try:
                self.model = load_facenet(fetch_facenet(self.cache_dir, self.allow_download), self.device)
            except DownloadError as e:
                return str(e)
            except OSError as e:  # the download itself failed (no network, a refused connection)
                return (f"{FACENET.name} could not be downloaded ({type(e).__name__}: {str(e)[:200]}); download it "
                        f"from {FACENET.url} and copy it to {FACENET.path(self.cache_dir)}")
        return None

    @torch.no_grad()
    def embeddings(self, image: Image.Image) -> tuple[list[tuple[float, ...]], np.ndarray]:
        """Every face's box, largest first, and its unit FaceNet embedding: (n, 512)."""
        rgb = image.convert("RGB")
        boxes = sorted((face.box for face in self.detector.detect(rgb)),
                       key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)
        if not boxes:
            return [], np.zeros((0, 512))
        return boxes, self.model(face_crops(rgb, boxes).to(self.device)).cpu().numpy().astype(np.float64)

    def reference(self, photos) -> np.ndarray | None:
        """A subject's reference: the largest face of each of its photos, averaged and normalised; None: no face."""
        from .matching import mean_embedding

        photos = [photos] if isinstance(photos, Image.Image) else list(photos)
        found = [emb[0] for emb in (self.embeddings(photo)[1] for photo in photos) if len(emb)]
        return mean_embedding(np.stack(found)) if found else None

    def score(self, image: Image.Image, references: np.ndarray) -> dict:
        """One image: `identity` (the paper's score), per-subject `subjects`, `num_faces` (all found), `blended`."""
        from .matching import score_faces

        boxes, emb = self.embeddings(image)
        result = score_faces(emb[: len(references)], references)  # the largest faces, as many as subjects
        return {**result, "num_faces": len(boxes)}
