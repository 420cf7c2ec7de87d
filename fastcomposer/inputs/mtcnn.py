"""MTCNN: a face detector whose weights ship with the package, so faces are found offline.

K. Zhang, Z. Zhang, Z. Li and Y. Qiao, "Joint Face Detection and Alignment using Multi-task Cascaded Convolutional
Networks", IEEE Signal Processing Letters, 2016 (arXiv 1604.02878). Three small networks in a cascade:

    P-Net  on an image pyramid (each level 0.709 x the last, down to 12 px faces): a 12x12 window every 2 px
           says "face?" and nudges its box                              -> NMS per level (IoU 0.5), then 0.7
    R-Net  on each candidate resized to 24x24: "face?" and a better box  -> NMS (IoU 0.7)
    O-Net  on 48x48: "face?", the final box and 5 landmarks              -> NMS (intersection over the smaller, 0.7)

Between stages each box is corrected by its regression and made square around its centre. This is also the
detector of FastComposer's evaluation (through facenet-pytorch). Written here from the paper and the published
weights' shapes: facenet-pytorch itself pins torch < 2.3. The weights (about 2 MB, MIT licence: the MTCNN authors'
release converted by facenet-pytorch) are `configs/mtcnn/mtcnn.safetensors`, checked against `WEIGHTS_SHA256`.

    >>> faces = MTCNN.load().detect(Image.open("assets/camera.png"))   # [(box, score, landmarks), ...]
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

WEIGHTS = Path(__file__).resolve().parents[1] / "configs" / "mtcnn" / "mtcnn.safetensors"
WEIGHTS_SHA256 = "dbe40e89422ecc465c7d246ca17e3cbdf74f45ebe08762964ffd607746efffb6"


@dataclass(frozen=True)
class MTCNNSettings:
    """The cascade's settings; the defaults are the authors' (and facenet-pytorch's, used by FastComposer's eval)."""

    min_face: int = 20  # smallest face searched, in pixels
    factor: float = 0.709  # each pyramid level's scale over the last (about 1/sqrt(2))
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)  # face probability to pass P-, R- and O-Net


def _prelu_conv(c_in: int, c_out: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k), nn.PReLU(c_out)]


class PNet(nn.Module):
    """12x12 windows, fully convolutional: (box offsets (n, 4, h, w), face probability (n, 2, h, w))."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = _prelu_conv(3, 10, 3)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = _prelu_conv(10, 16, 3)
        self.conv3, self.prelu3 = _prelu_conv(16, 32, 3)
        self.conv4_1 = nn.Conv2d(32, 2, 1)  # face / not face
        self.conv4_2 = nn.Conv2d(32, 4, 1)  # box offsets

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), self.conv4_1(x).softmax(dim=1)


def _flatten_like_the_release(x: torch.Tensor) -> torch.Tensor:
    """The released dense layers were trained on (width, height, channel)-ordered features (Caffe's layout)."""
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class RNet(nn.Module):
    """24x24 candidates: (box offsets (n, 4), face probability (n, 2))."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = _prelu_conv(3, 28, 3)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = _prelu_conv(28, 48, 3)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = _prelu_conv(48, 64, 2)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu4(self.dense4(_flatten_like_the_release(self.prelu3(self.conv3(x)))))
        return self.dense5_2(x), self.dense5_1(x).softmax(dim=1)


class ONet(nn.Module):
    """48x48 candidates: (box offsets (n, 4), landmarks (n, 10: 5 x then 5 y), face probability (n, 2))."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = _prelu_conv(3, 32, 3)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = _prelu_conv(32, 64, 3)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = _prelu_conv(64, 64, 3)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = _prelu_conv(64, 128, 2)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu5(self.dense5(_flatten_like_the_release(self.prelu4(self.conv4(x)))))
        return self.dense6_2(x), self.dense6_3(x), self.dense6_1(x).softmax(dim=1)


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - 127.5) * 0.0078125  # the release's input range, [-1, 1]


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Each (x0, y0, x1, y1) grown to a square of its longer side, around its centre."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    x0, y0 = boxes[:, 0] + (w - side) / 2, boxes[:, 1] + (h - side) / 2
    return torch.stack([x0, y0, x0 + side, y0 + side], dim=1)


def _regress(boxes: torch.Tensor, offsets: torch.Tensor, inclusive: bool = True) -> torch.Tensor:
    """Boxes moved by their predicted offsets, in units of their size (inclusive: pixel-count sizes, +1)."""
    extra = 1.0 if inclusive else 0.0
    size = torch.stack([boxes[:, 2] - boxes[:, 0] + extra, boxes[:, 3] - boxes[:, 1] + extra] * 2, dim=1)
    return boxes + offsets * size


def _crops(image: torch.Tensor, boxes: torch.Tensor, side: int) -> torch.Tensor:
    """Each box's pixels (the part inside the image; boxes are taken at whole pixels, 1-based as the release
    was trained), resized by area averaging to side x side."""
    _, _, height, width = image.shape
    out = []
    for x0, y0, x1, y1 in boxes.trunc().int().tolist():
        x0, y0, x1, y1 = max(x0, 1), max(y0, 1), min(x1, width), min(y1, height)
        patch = image[:, :, y0 - 1:y1, x0 - 1:x1]
        out.append(F.interpolate(patch, size=(side, side), mode="area") if patch.numel() else
                   torch.zeros(1, 3, side, side))
    return torch.cat(out) if out else torch.zeros(0, 3, side, side)


def nms_min(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy NMS on intersection over the smaller box (the cascade's last step; torchvision's NMS only knows IoU,
    hence written out). Pixel-count areas (+1), as the release's boxes are inclusive."""
    order = scores.argsort(descending=True)
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    keep = []
    while order.numel():
        i, rest = order[0], order[1:]
        keep.append(int(i))
        inter_w = (torch.minimum(boxes[i, 2], boxes[rest, 2]) - torch.maximum(boxes[i, 0], boxes[rest, 0]) + 1)
        inter_h = (torch.minimum(boxes[i, 3], boxes[rest, 3]) - torch.maximum(boxes[i, 1], boxes[rest, 1]) + 1)
        inter = inter_w.clamp(min=0) * inter_h.clamp(min=0)
        order = rest[inter / torch.minimum(areas[i], areas[rest]) <= threshold]
    return torch.tensor(keep, dtype=torch.long)


@dataclass
class MTCNNFace:
    """One face: its box (x0, y0, x1, y1) in the photo's pixels, the O-Net probability and 5 landmarks (x, y):
    left eye, right eye, nose, left and right mouth corner, as seen in the photo."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: tuple[tuple[float, float], ...]


class MTCNN(nn.Module):
    """The three networks and the cascade. Build with `MTCNN.load()` (the shipped weights) or `MTCNN()` (random)."""

    def __init__(self, settings: MTCNNSettings = MTCNNSettings()):
        super().__init__()
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        self.settings = settings

    @classmethod
    def load(cls, path: str | Path = WEIGHTS, settings: MTCNNSettings = MTCNNSettings(),
             sha256: str | None = WEIGHTS_SHA256) -> MTCNN:
        """The detector with the shipped weights, checked against their sha256 and loaded strictly."""
        from safetensors.torch import load_file

        data = Path(path).read_bytes()
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"{Path(path).name} is not the MTCNN weights this package shipped (sha256 differs); "
                             "reinstall the package")
        model = cls(settings)
        model.load_state_dict(load_file(str(path)), strict=True)
        return model.eval()

    @torch.no_grad()
    def detect(self, image: Image.Image) -> list[MTCNNFace]:
        """Every face in `image` (converted to RGB), strongest first."""
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
        t = self.settings.thresholds
        boxes = self._propose(pixels)
        if len(boxes):
            boxes = self._refine(pixels, boxes, t[1])
        if not len(boxes):
            return []
        return self._finish(pixels, boxes, t[2])

    def scales(self, height: int, width: int) -> list[float]:
        """The pyramid: scale 12 / min_face first (a min_face face becomes 12 px), down while the image is >= 12 px."""
        s = self.settings
        scale, shortest, out = 12.0 / s.min_face, min(height, width) * 12.0 / s.min_face, []
        while shortest >= 12:
            out.append(scale)
            scale, shortest = scale * s.factor, shortest * s.factor
        return out

    def _propose(self, pixels: torch.Tensor) -> torch.Tensor:
        """P-Net over the pyramid: candidate boxes (n, 5: box and score), merged, regressed and squared."""
        from torchvision.ops import nms

        _, _, height, width = pixels.shape
        found = []
        for scale in self.scales(height, width):
            level = F.interpolate(pixels, size=(int(height * scale + 1), int(width * scale + 1)), mode="area")
            offsets, probs = self.pnet(_normalise(level))
            rows, cols = torch.nonzero(probs[0, 1] >= self.settings.thresholds[0], as_tuple=True)
            if not len(rows):
                continue
            corner = torch.stack([cols, rows], dim=1).float()  # each 12x12 window's corner, every 2 px
            start, end = ((2 * corner + 1) / scale).floor(), ((2 * corner + 12) / scale).floor()
            candidates = torch.cat([start, end, probs[0, 1, rows, cols, None], offsets[0, :, rows, cols].T], dim=1)
            found.append(candidates[nms(candidates[:, :4], candidates[:, 4], 0.5)])
        if not found:
            return torch.zeros(0, 5)
        merged = torch.cat(found)
        merged = merged[nms(merged[:, :4], merged[:, 4], 0.7)]
        boxes = _square(_regress(merged[:, :4], merged[:, 5:9], inclusive=False))
        return torch.cat([boxes, merged[:, 4:5]], dim=1)

    def _refine(self, pixels: torch.Tensor, boxes: torch.Tensor, threshold: float) -> torch.Tensor:
        """R-Net on 24x24 crops: keep the faces, regress and square them."""
        from torchvision.ops import nms

        offsets, probs = self.rnet(_normalise(_crops(pixels, boxes[:, :4], 24)))
        keep = probs[:, 1] > threshold
        boxes = torch.cat([boxes[keep, :4], probs[keep, 1:2]], dim=1)
        offsets = offsets[keep]
        picked = nms(boxes[:, :4], boxes[:, 4], 0.7)
        boxes, offsets = boxes[picked], offsets[picked]
        return torch.cat([_square(_regress(boxes[:, :4], offsets)), boxes[:, 4:5]], dim=1)

    def _finish(self, pixels: torch.Tensor, boxes: torch.Tensor, threshold: float) -> list[MTCNNFace]:
        """O-Net on 48x48 crops: the final boxes, scores and landmarks."""
        offsets, points, probs = self.onet(_normalise(_crops(pixels, boxes[:, :4], 48)))
        keep = probs[:, 1] > threshold
        boxes, offsets, points, scores = boxes[keep, :4], offsets[keep], points[keep], probs[keep, 1]
        size_w = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        size_h = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        xs = size_w * points[:, :5] + boxes[:, :1] - 1  # landmarks in the photo, from the box before regression
        ys = size_h * points[:, 5:] + boxes[:, 1:2] - 1
        boxes = _regress(boxes, offsets)
        picked = nms_min(boxes, scores, 0.7)
        return [MTCNNFace(tuple(float(v) for v in boxes[i]), float(scores[i]),
                          tuple((float(xs[i, j]), float(ys[i, j])) for j in range(5))) for i in picked.tolist()]


def round_box(box: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A float box as whole pixels, inside a (width, height) image."""
    width, height = size
    x0, y0, x1, y1 = box
    return (min(max(math.floor(x0), 0), width), min(max(math.floor(y0), 0), height),
            min(max(math.ceil(x1), 0), width), min(max(math.ceil(y1), 0), height))
