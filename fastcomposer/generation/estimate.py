"""How long a generation takes: seconds from steps, feature caching, size, images, dtype and device.

    >>> estimator = Estimator(Hardware("cpu", "bf16", threads=2))
    >>> work = Workload.of(scheduler="dpm", steps=20, cache_interval=3, width=512, height=512)
    >>> estimator.seconds(work)          # about a minute on a 2-core CPU
    >>> estimator.observe(work, seconds_per_iteration=2.1)   # after a real run: this machine's speed

The web page says up front what a run will cost, and ZeroGPU reserves GPU time per call from the same
number. The starting constants are measurements (below); after each real run `observe` folds the measured
seconds per loop iteration into a running average, so the estimate becomes this machine's.

The model: one loop iteration costs a full UNet pass, or about a tenth of one when DeepCache reuses the deep
features (caching.py); a pass scales with the pixel count and the number of images; classifier-free guidance
doubles the batch. Around the loop come one CLIP ViT-L/14 pass per photo and one VAE decode per image.
Imports nothing heavy: the app's page imports it at start-up.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass

from ..config import DETAIL

# A DeepCache step reruns only the outermost UNet layers: "about a tenth of a full one" (caching.py).
CACHED_STEP_COST = 0.1
# The VAE's encoder (the face pass encodes each face crop) costs about half its decoder: it has about half the
# decoder's layers at each resolution.
VAE_ENCODE_SHARE = 0.5
# Each run's measured speed counts at least this much in the running average, so the estimate follows a
# machine whose speed changes (other load, thermal limits) instead of freezing after many runs.
MIN_OBSERVATION_WEIGHT = 0.25


@dataclass(frozen=True)
class Hardware:
    """Where the pipeline runs."""

    device: str  # "cpu", "cuda", "mps", or "zerogpu" (a Hugging Face ZeroGPU slice)
    dtype: str  # "fp32", "fp16" or "bf16"
    threads: int = 2  # CPU threads torch computes with (torch.get_num_threads()); unused on GPUs


@dataclass(frozen=True)
class CostModel:
    """Seconds for the parts of one call, at 512x512 with classifier-free guidance."""

    step_512: float  # one full UNet iteration for one image (a batch of 2 with guidance)
    size_exponent: float  # a step scales with (pixels / 512^2) ** size_exponent
    extra_image: float  # each image beyond the first adds this fraction of a step (1.0: linear)
    decode_512: float  # VAE decode of one 512 px image (scales with pixels)
    encode_photo: float  # CLIP ViT-L/14 over one subject photo
    fixed: float  # text encoding, the post-fuse MLP, the safety checker, PNG encoding
    threads: int = 0  # CPU threads the figures were measured with (0: a GPU, threads do not matter)


# CPU figures: the project's 2-core AVX-512 machine, SD1.5-sized networks (reference/environment.md):
# a UNet step at batch 2 takes 9.4 s (fp32) / 6.3 s (bf16) at 512 px and 2.8 s / 1.3 s at 256 px, which gives
# the size exponents log(9.4/2.8)/log(4) = 0.87 and log(6.3/1.3)/log(4) = 1.14; a 512 px VAE decode 17 s / 8 s;
# CLIP ViT-L/14 over one photo 1.1 s / 0.55 s; the extra text encode and fusion 0.3 s (README "Performance").
# The CPU has no vectorised fp16, so fp16 there is at least as slow as fp32: fp32's figures are a floor.
_CPU_FP32 = CostModel(9.4, 0.87, 1.0, 17.0, 1.1, 0.3, threads=2)
_CPU_BF16 = CostModel(6.3, 1.14, 1.0, 8.0, 0.55, 0.3, threads=2)
# GPU figures: an H100 in fp16 (README "Performance"): PNDM 50 (51 iterations) in 2.00 s and DPM++ 25 in
# 1.01 s at one image, so 38.1 ms per iteration and 57 ms around the loop (split here as a 30 ms decode, 10 ms
# of CLIP and 17 ms of the rest); four images take 2.17 s, so each extra image adds about 1.4% of a step (at one
# to four images a 512 px step is bound by kernel launches, not arithmetic).
_H100_FP16 = CostModel(0.0381, 1.0, 0.014, 0.030, 0.010, 0.017)
# A ZeroGPU slice is an H200 MIG 3g partition with 60 streaming multiprocessors (the `spaces` package's own
# device description) against the H100's 132: planned as 132/60 = 2.2x slower, a safe side for a reservation.
ZEROGPU_SLOWDOWN = 132 / 60
# Apple's MPS was not measured: start 10x slower than the H100 (deliberately pessimistic); the first run corrects it.
MPS_SLOWDOWN = 10.0


def _scaled(model: CostModel, factor: float) -> CostModel:
    return CostModel(model.step_512 * factor, model.size_exponent, model.extra_image, model.decode_512 * factor,
                     model.encode_photo * factor, model.fixed * factor, model.threads)


def cost_model(hardware: Hardware) -> CostModel:
    """The measured starting point for `hardware` (see the constants above)."""
    if hardware.device == "cpu":
        return _CPU_BF16 if hardware.dtype == "bf16" else _CPU_FP32
    if hardware.device == "zerogpu":
        return _scaled(_H100_FP16, ZEROGPU_SLOWDOWN)
    if hardware.device == "mps":
        return _scaled(_H100_FP16, MPS_SLOWDOWN)
    # fp32 on a GPU runs without tensor cores' fp16 rates: about 2x the fp16 time on recent NVIDIA GPUs
    return _H100_FP16 if hardware.dtype != "fp32" else _scaled(_H100_FP16, 2.0)


@dataclass(frozen=True)
class Workload:
    """What one call computes."""

    iterations: int  # denoising loop iterations (PNDM runs steps + 1)
    full_passes: int  # iterations that run the whole UNet (the rest reuse cached features)
    width: int
    height: int
    num_images: int
    photos: int = 1  # subject photos through CLIP ViT-L/14
    guidance: bool = True  # classifier-free guidance doubles the UNet batch
    schedule: tuple[bool, ...] = ()  # per iteration: a full UNet pass (True) or a cached one; () = all full
    faces: int = 0  # faces the face pass redraws (one per subject and image, as planned)
    face_steps: int = 0  # loop iterations per face (the schedule's last `strength`), each a full pass at 512 px

    @classmethod
    def of(
        cls,
        scheduler: str,
        steps: int,
        cache_interval: int = 1,
        width: int = 512,
        height: int = 512,
        num_images: int = 1,
        photos: int = 1,
        alpha: float = 0.75,
        guidance_scale: float = 5.0,
        faces: int = 0,
        face_strength: float = DETAIL.strength,
    ) -> Workload:
        """The workload of a request; full passes follow the cache's own rule (see `caching.is_full_pass`)."""
        iterations = int(steps) + 1 if scheduler == "pndm" else int(steps)
        switch = (1.0 - float(alpha)) * int(steps)  # the pipeline's last text-only index
        first_subject = next((i for i in range(iterations) if i > switch), None)
        interval = max(1, int(cache_interval))
        schedule = tuple(_is_full_pass(i, interval, first_subject) for i in range(iterations))
        # As `redraw.img2img_timesteps` takes them; PNDM's schedule has its one extra iteration there too
        face_steps = min(int(int(steps) * float(face_strength)), int(steps)) if faces else 0
        face_steps += 1 if faces and scheduler == "pndm" else 0
        return cls(iterations, sum(schedule), int(width), int(height), int(num_images), int(photos),
                   guidance_scale > 1.0, schedule, int(faces), face_steps)

    def is_full(self, i: int) -> bool:
        """Whether iteration `i` runs the whole UNet."""
        return self.schedule[i] if i < len(self.schedule) else True

    @property
    def step_units(self) -> float:
        """The loop's cost in full UNet passes."""
        return self.full_passes + CACHED_STEP_COST * (self.iterations - self.full_passes)


def _is_full_pass(i: int, interval: int, first_subject_step: int | None) -> bool:
    # The same rule as caching.is_full_pass, restated here so this module stays free of torch and diffusers.
    if interval <= 1:
        return True
    start = first_subject_step if first_subject_step is not None and i >= first_subject_step else 0
    return (i - start) % interval == 0


class Estimator:
    """Seconds per call on one machine: measured constants, then this machine's running average.

    Thread-safe; one per served pipeline.
    """

    def __init__(self, hardware: Hardware):
        self.hardware = hardware
        self.model = cost_model(hardware)
        self.speed = 1.0  # measured time / modelled time of a full UNet iteration, averaged over runs (1.0 before)
        self.cached_ratio = CACHED_STEP_COST  # a cached iteration over a full one, as measured here
        self.tail_scale = 1.0  # the decode, safety check and PNGs after the loop: measured / modelled
        self.runs = 0  # runs observed
        self._lock = threading.Lock()

    def _threads_factor(self) -> float:
        # CPU figures scale with the threads torch uses (linearly: optimistic beyond a handful of cores)
        if not self.model.threads:
            return 1.0
        return self.model.threads / max(1, self.hardware.threads)

    def _step_seconds(self, work: Workload) -> float:
        """One full UNet iteration for the whole batch, before this machine's correction."""
        m = self.model
        pixels = work.width * work.height / 512**2
        batch = 1 + m.extra_image * (work.num_images - 1)
        cfg = 1.0 if work.guidance else 0.5
        return m.step_512 * pixels**m.size_exponent * batch * cfg * self._threads_factor()

    def loop_units(self, work: Workload) -> float:
        """The loop's cost in full UNet passes, with this machine's cost of a cached one."""
        return work.full_passes + self.cached_ratio * (work.iterations - work.full_passes)

    def full_step_seconds(self, work: Workload) -> float:
        """One full UNet iteration of `work` on this machine."""
        return self.speed * self._step_seconds(work)

    def iteration_seconds(self, work: Workload) -> float:
        """The average loop iteration of `work` on this machine (cached iterations included)."""
        return self.full_step_seconds(work) * self.loop_units(work) / max(1, work.iterations)

    def tail_seconds(self, work: Workload) -> float:
        """After the loop: the VAE decode of every image, the safety checker, the PNGs (this machine's, once seen)."""
        m = self.model
        pixels = work.width * work.height / 512**2
        return self.tail_scale * (m.decode_512 * pixels * work.num_images + m.fixed) * self._threads_factor()

    def face_seconds(self, work: Workload) -> float:
        """One face of the face pass: a VAE encode, `face_steps` full iterations of one 512 px image, a decode."""
        face = Workload(work.face_steps, work.face_steps, 512, 512, 1, 1, work.guidance)
        vae = self.tail_scale * self.model.decode_512 * (1 + VAE_ENCODE_SHARE) * self._threads_factor()
        return self.full_step_seconds(face) * work.face_steps + vae

    def seconds(self, work: Workload) -> float:
        """The whole call: photos, loop, decode and the rest, and the face pass."""
        photos = self.speed * self.model.encode_photo * work.photos * self._threads_factor()
        loop = self.full_step_seconds(work) * self.loop_units(work)
        return photos + loop + self.tail_seconds(work) + work.faces * self.face_seconds(work)

    def observe_run(self, work: Workload, full_step: float | None, cached_step: float | None = None,
                    tail: float | None = None) -> None:
        """Fold one run's measured costs in: a full iteration, a cached one and the tail after the loop (seconds;
        None for what the run did not show)."""
        with self._lock:
            self.runs += 1
            weight = max(1.0 / self.runs, MIN_OBSERVATION_WEIGHT)
            if _usable(full_step):
                self.speed += weight * (full_step / self._step_seconds(work) - self.speed)
                if _usable(cached_step):
                    self.cached_ratio += weight * (min(1.0, cached_step / full_step) - self.cached_ratio)
            modelled_tail = self.tail_seconds(work) / self.tail_scale
            if _usable(tail) and modelled_tail > 0:
                self.tail_scale += weight * (tail / modelled_tail - self.tail_scale)

    def observe(self, work: Workload, seconds_per_iteration: float) -> None:
        """Fold one run's measured seconds per loop iteration (all kinds averaged) into the running average."""
        modelled = self._step_seconds(work) * self.loop_units(work) / max(1, work.iterations)
        if not (seconds_per_iteration > 0 and math.isfinite(seconds_per_iteration)) or modelled <= 0:
            return
        with self._lock:
            self.runs += 1
            weight = max(1.0 / self.runs, MIN_OBSERVATION_WEIGHT)
            self.speed += weight * (seconds_per_iteration / modelled - self.speed)


def _usable(seconds: float | None) -> bool:
    return seconds is not None and seconds > 0 and math.isfinite(seconds)


def format_seconds(seconds: float) -> str:
    """"3 s", "45 s", "80 s", "4 min": round enough that the number does not pretend to be exact."""
    if seconds < 10:
        return f"{max(1, round(seconds))} s"
    if seconds < 100:
        return f"{round(seconds / 5) * 5} s"
    if seconds < 180:
        return f"{round(seconds / 10) * 10} s"
    return f"{round(seconds / 60)} min"


def is_zerogpu() -> bool:
    """True on a Hugging Face ZeroGPU Space (the variable the `spaces` package itself reads)."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")
