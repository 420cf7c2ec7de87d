"""What the face pass costs: seconds per face against one main image at the same settings, in one process.

SD1.5-sized random weights (bf16 on a CPU, fp16 on a GPU), 512 px, the *fast* preset's sampler (DPM++ 2M, 20
steps; the main image with its feature caching, the face without: a face runs only the schedule's last
`strength` and caching would skip most of that). A face at strength 0.4 is a VAE encode, 8 full UNet passes of a
512 px crop and a decode. The face is redrawn on a bundled portrait (random weights draw no face to find).

    python benchmarks/bench_face_pass.py --output benchmarks/results/cpu-face-pass-512.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import PIL.Image
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere

from benchmarks.bench_layout import build  # noqa: E402
from benchmarks.bench_pipeline import device_name  # noqa: E402
from fastcomposer.generation.face_detail import DETAIL, face_crop  # noqa: E402
from fastcomposer.inputs.faces import FaceCropper  # noqa: E402
from fastcomposer.pipeline.loading import pick_device  # noqa: E402
from fastcomposer.pipeline.presets import PRESETS  # noqa: E402


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    device = pick_device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    torch.manual_seed(0)
    pipe = build("sd15", device, dtype, False)
    fast = PRESETS["fast"]
    pipe.use_scheduler(fast.scheduler)
    photo = PIL.Image.open(ROOT / "assets" / "astronaut.png").convert("RGB")
    face = FaceCropper(allow_download=False, detector="mtcnn").detect(photo)[0]
    crop = photo.crop(face_crop(face.box, photo.size)).resize((DETAIL.side, DETAIL.side))

    def main_image():
        pipe("a woman img in a garden", [photo], num_inference_steps=fast.num_inference_steps, height=512, width=512,
             cache_interval=fast.cache_interval, generator=torch.Generator().manual_seed(1))

    def one_face():
        pipe.redraw(crop, "a close-up portrait photo of a woman img", [photo], DETAIL.strength,
                    num_inference_steps=fast.num_inference_steps, generator=torch.Generator().manual_seed(2))

    main_image(), one_face()  # warm-up
    images, faces = [], []
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        images.append(timed(main_image, device))
        faces.append(timed(one_face, device))
    image_s, face_s = statistics.median(images), statistics.median(faces)
    report = {"benchmark": "bench_face_pass", "device": device_name(device),
              "dtype": str(dtype).removeprefix("torch."),
              "threads": torch.get_num_threads(), "sampler": "dpm, 20 steps", "strength": DETAIL.strength,
              "face_steps": min(int(fast.num_inference_steps * DETAIL.strength), fast.num_inference_steps),
              "seconds_per_main_image": round(image_s, 2), "seconds_per_face": round(face_s, 2),
              "face_over_image": round(face_s / image_s, 3), "runs": {"image": images, "face": faces}}
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
