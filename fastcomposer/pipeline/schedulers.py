"""The samplers on offer, all built from the same base scheduler config (SD1.5's)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    SchedulerMixin,
    TCDScheduler,
)

SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    # The released demo's sampler. With skip_prk_steps, N steps give N + 1 loop iterations.
    # "leading" spacing is SD1.5's; set it explicitly so a config that passed through another sampler
    # (whose default is "linspace") can never shift PNDM's timesteps.
    "pndm": (PNDMScheduler, {"skip_prk_steps": True, "timestep_spacing": "leading"}),
    # DPM-Solver++ (2M): about as good at 20-25 steps as PNDM at 50.
    "dpm": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    # SD's latents span about [-4, 4]; DDIM's default clip_sample=True would clip its x0 estimate to [-1, 1]
    # (SD1.5's own scheduler file sets it False, our bundled config leaves it unset).
    "ddim": (DDIMScheduler, {"clip_sample": False}),
    "euler": (EulerDiscreteScheduler, {}),
    # Few-step samplers for distilled LoRAs, at 2-8 steps. LCM (for LCM-LoRA; guidance 1-2) re-noises the
    # predicted image at every step with the call's generator. TCD (for TCD-LoRA and Hyper-SD) takes
    # `eta` (gamma, its own default 0.3; 0 is deterministic) in `step`. Both pick their timesteps from a
    # 50-step distillation schedule, evenly from t=999 down, so they allow at most 50 steps.
    "lcm": (LCMScheduler, {"original_inference_steps": 50}),
    "tcd": (TCDScheduler, {"original_inference_steps": 50}),
}

SCHEDULER_LABELS = {
    "pndm": "PNDM (original, 50 steps)",
    "dpm": "DPM++ 2M (fast, 25 steps)",
    "ddim": "DDIM",
    "euler": "Euler",
    "lcm": "LCM (needs an LCM-LoRA; 4-8 steps, guidance 1-2)",
    "tcd": "TCD (needs a TCD or Hyper-SD LoRA; 4-8 steps)",
}


def make_scheduler(name: str, base_config: dict[str, Any]) -> SchedulerMixin:
    """Build sampler `name` (a key of `SCHEDULERS`) from a diffusers scheduler config."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    return cls.from_config({**config, **overrides})


def max_steps(name: str) -> int | None:
    """The most steps sampler `name` can take (the few-step samplers' distillation schedule), or None."""
    return SCHEDULERS[name][1].get("original_inference_steps") if name in SCHEDULERS else None


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """The short name of a scheduler built by `make_scheduler` (or its class name)."""
    for name, (cls, _) in SCHEDULERS.items():
        if type(scheduler) is cls:
            return name
    return type(scheduler).__name__


class SamplerMixin:
    """Sampler switching for a pipeline: every sampler is built from the base model's scheduler config."""

    scheduler: SchedulerMixin
    _base_scheduler_config: dict[str, Any]

    def set_base_scheduler(self, config: dict[str, Any]) -> None:
        """Make `config` (the base model's scheduler config) the one every sampler is built from; back to PNDM."""
        self._base_scheduler_config = dict(config)
        self.scheduler = make_scheduler("pndm", self._base_scheduler_config)

    def use_scheduler(self, name: str) -> None:
        """Switch the sampler (a name in `SCHEDULERS`), keeping the model's noise schedule."""
        if scheduler_name(self.scheduler) != name:
            self.scheduler = make_scheduler(name, self._base_scheduler_config)

    @contextmanager
    def sampler(self, name: str | None) -> Iterator[None]:
        """Use sampler `name` for one call (None: the current one), then put the previous one back."""
        if name is None or scheduler_name(self.scheduler) == name:
            yield
            return
        previous = self.scheduler
        self.scheduler = make_scheduler(name, self._base_scheduler_config)
        try:
            yield
        finally:
            self.scheduler = previous
