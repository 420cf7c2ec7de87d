"""The offline face detector (OpenCV's cascades) on small faces in large photos: found or not, and how long.

Synthetic photos, made here from the bundled portraits: a head-and-shoulders cut of the astronaut or of Grace
Hopper, scaled so the face is 70 or 95 px wide, pasted at random places into 1600x1200 backgrounds (plain,
Gaussian noise, and the cameraman photo's grass blown up). A photo counts as found when the largest box holds
the pasted face's centre. Face-free photos (parts of the bundled photos without faces, blown up to 1600x1200,
and the backgrounds) count false faces. Each photo is detected with and without the second pass.

    python benchmarks/bench_faces.py > faces.json     # about a minute on 2 cores

Times are wall-clock seconds per photo: the first pass alone (what the detector did before the second pass
existed) and `FaceCropper.crop` with both. They mean something only on an idle machine:
`loadavg_1min_at_end` says how busy it was.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastcomposer.inputs import face_detectors as detectors  # noqa: E402
from fastcomposer.inputs import faces  # noqa: E402

# (photo, face region by eye, head-and-shoulders cut): the same regions tests/test_faces.py uses.
PORTRAITS = [("astronaut.png", (180, 60, 270, 185), (100, 0, 400, 360)),
             ("grace_hopper.jpg", (160, 140, 370, 335), (60, 40, 470, 520))]
# Parts of the bundled photos without a face.
FACE_FREE = [("astronaut.png", (300, 0, 512, 300)), ("astronaut.png", (0, 250, 512, 512)),
             ("grace_hopper.jpg", (0, 380, 512, 600)), ("grace_hopper.jpg", (0, 0, 140, 600)),
             ("camera.png", (0, 330, 512, 512)), ("camera.png", (300, 0, 512, 512))]
SIZE = (1600, 1200)


def load(name: str) -> Image.Image:
    with Image.open(ROOT / "assets" / name) as image:
        return image.convert("RGB")


def backgrounds(rng: np.random.Generator) -> dict[str, Image.Image]:
    noise = np.clip(rng.normal(120, 25, (SIZE[1], SIZE[0], 3)), 0, 255).astype(np.uint8)
    grass = load("camera.png").crop((0, 380, 512, 512)).resize(SIZE, Image.Resampling.BICUBIC)
    return {"plain": Image.new("RGB", SIZE, (96, 128, 160)), "noisy": Image.fromarray(noise), "grass": grass}


def photos_with_faces(rng: np.random.Generator, per_case: int) -> list[tuple[str, Image.Image, tuple[float, float]]]:
    cases = []
    for name, face, cut in PORTRAITS:
        for width in (70, 95):
            s = width / (face[2] - face[0])
            piece = load(name).crop(cut)
            piece = piece.resize((round(piece.width * s), round(piece.height * s)), Image.Resampling.LANCZOS)
            for bg_name, bg in backgrounds(rng).items():
                for _ in range(per_case):
                    x, y = int(rng.integers(0, SIZE[0] - piece.width)), int(rng.integers(0, SIZE[1] - piece.height))
                    photo = bg.copy()
                    photo.paste(piece, (x, y))
                    centre = (x + ((face[0] + face[2]) / 2 - cut[0]) * s, y + ((face[1] + face[3]) / 2 - cut[1]) * s)
                    cases.append((f"{name.split('.')[0]} {width}px {bg_name}", photo, centre))
    return cases


def face_free_photos(rng: np.random.Generator) -> list[Image.Image]:
    out = []
    for name, (x0, y0, x1, y1) in FACE_FREE:
        for _ in range(4):
            w = int(rng.integers(100, x1 - x0 + 1))
            h = min(y1 - y0, int(w * 0.75))
            x, y = int(rng.integers(x0, x1 - w + 1)), int(rng.integers(y0, y1 - h + 1))
            out.append(load(name).crop((x, y, x + w, y + h)).resize(SIZE, Image.Resampling.BICUBIC))
    return out + list(backgrounds(rng).values())


def mtcnn_figures(cases, empty) -> dict:
    """MTCNN (the offline detector before the Haar cascades) on the same photos, and the bundled portraits."""
    cropper = faces.FaceCropper(allow_download=False, detector="mtcnn")
    assert cropper.detector_name == "mtcnn"
    found, seconds = {}, []
    for label, photo, (cx, cy) in cases:
        counts = found.setdefault(label, {"found": 0, "photos": 0})
        counts["photos"] += 1
        start = time.perf_counter()
        detected = cropper.detect(photo)
        seconds.append(time.perf_counter() - start)
        if detected:
            x0, y0, x1, y1 = max((f.box for f in detected), key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
            counts["found"] += x0 <= cx <= x1 and y0 <= cy <= y1
    false_faces = sum(bool(cropper.detect(p)) for p in empty)
    bundled = {name: [f.box for f in cropper.detect(load(name))] for name in
               ("astronaut.png", "grace_hopper.jpg", "camera.png")}
    return {"found_total": sum(c["found"] for c in found.values()), "photos": len(cases),
            "face_free_with_a_face_found": false_faces, "bundled_portraits": bundled,
            "seconds_per_1600x1200_photo": {"median_s": round(statistics.median(seconds), 3),
                                           "max_s": round(max(seconds), 3)}}


def main() -> None:
    cropper = faces.FaceCropper(allow_download=False, detector="opencv")
    assert cropper.detector_name == "opencv"
    cascades = cropper._model
    rng = np.random.default_rng(0)
    cases, empty = photos_with_faces(rng, per_case=8), face_free_photos(np.random.default_rng(1))

    found: dict[str, dict[str, int]] = {}
    for label, photo, (cx, cy) in cases:
        counts = found.setdefault(label, {"first_pass": 0, "both_passes": 0, "photos": 0})
        counts["photos"] += 1
        for key, second in (("first_pass", False), ("both_passes", True)):
            boxes = detectors._detect_opencv(cascades, photo, second_pass=second)
            if boxes:
                x0, y0, x1, y1 = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
                counts[key] += x0 <= cx <= x1 and y0 <= cy <= y1
    false_faces = {key: sum(bool(detectors._detect_opencv(cascades, p, second_pass=second)) for p in empty)
                   for key, second in (("first_pass", False), ("both_passes", True))}

    def timed(photos: list[Image.Image]) -> dict[str, dict[str, float]]:
        """Seconds per photo for the detection alone without the second pass, and for a whole crop with it."""
        seconds: dict[str, list[float]] = {"first_pass_only": [], "crop_with_second_pass": []}
        for photo in photos:
            start = time.perf_counter()
            detectors._detect_opencv(cascades, photo, second_pass=False)
            seconds["first_pass_only"].append(time.perf_counter() - start)
            start = time.perf_counter()
            try:
                cropper.crop(photo)
            except faces.NoFaceFoundError:
                pass
            seconds["crop_with_second_pass"].append(time.perf_counter() - start)
        return {k: {"median_s": round(statistics.median(v), 3), "max_s": round(max(v), 3)} for k, v in seconds.items()}

    result = {
        "found": found,
        "found_total": {k: sum(c[k] for c in found.values()) for k in ("first_pass", "both_passes", "photos")},
        "face_free_photos": len(empty),
        "face_free_with_a_face_found": false_faces,
        "crop_time_photos_with_faces": timed([p for _, p, _ in cases]),
        "crop_time_95px_face": timed([p for label, p, _ in cases if " 95px " in label]),
        "crop_time_face_free": timed(empty),
        "mtcnn": mtcnn_figures(cases, empty),
        "haar_on_bundled_portraits": {name: detectors._detect_opencv(cascades, load(name)) for name in
                                      ("astronaut.png", "grace_hopper.jpg", "camera.png")},
        "cpu_count": os.cpu_count(),
        "loadavg_1min_at_end": round(os.getloadavg()[0], 2),
    }
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
