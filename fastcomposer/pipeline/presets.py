"""Speed presets: sampler, steps and feature caching in one word.

    original  PNDM, 50 steps, no cache   the paper's path; reproduces the released demo's images
    balanced  DPM++ 2M, 25 steps         about half the work, close to PNDM-50 in quality
    fast      DPM++ 2M, 20 steps, cache  DeepCache every 3rd step: about 1/2.5 of balanced's UNet work

A preset only chooses those three things. Each stays visible and can be overridden one by one: an
explicit sampler, step count or cache interval always wins over the preset's.

Scripts (the CLI and the Python API) default to *original*, so their results do not change with the
machine they run on; the web app defaults to *fast* on a CPU and *original* on a GPU (see
`default_app_preset`), and `FASTCOMPOSER_PRESET` overrides that default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PRESET_ENV = "FASTCOMPOSER_PRESET"


@dataclass(frozen=True)
class Preset:
    """One named bundle of sampler, steps and caching."""

    name: str  # what --preset and the API take
    label: str  # what the web page shows
    scheduler: str  # a name from schedulers.SCHEDULERS
    num_inference_steps: int  # denoising steps (PNDM runs one more loop iteration than this)
    cache_interval: int  # 1 = every UNet pass is full; N = deep features reused for N-1 of every N steps
    summary: str  # one line for help texts and the page


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("original", "Original", "pndm", 50, 1,
               "PNDM, 50 steps: the paper's sampler; reproduces the original demo"),
        Preset("balanced", "Balanced", "dpm", 25, 1,
               "DPM++ 2M, 25 steps: half the work, near-identical quality"),
        # DPM++ at 20 steps is the usual quality floor for SD1.5; DeepCache's uniform interval 3 is the
        # setting its paper reports as close to the uncached images on SD1.5. Together about 7 full and
        # 13 shallow UNet passes instead of 25 full ones.
        Preset("fast", "Fast", "dpm", 20, 3,
               "DPM++ 2M, 20 steps, deep features reused 2 steps in 3 (DeepCache)"),
    )
}
DEFAULT_PRESET = "original"


def get_preset(name: str | Preset | None) -> Preset:
    """The preset called `name` (None means the scripts' default, *original*).

    Raises:
        `ValueError` naming the choices.
    """
    if isinstance(name, Preset):
        return name
    key = (name or DEFAULT_PRESET).strip().lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose {', '.join(PRESETS)}")
    return PRESETS[key]


@dataclass(frozen=True)
class SamplingPlan:
    """What a run actually uses once a preset and explicit choices are combined."""

    preset: str
    scheduler: str
    num_inference_steps: int
    cache_interval: int


def resolve(
    preset: str | Preset | None = None,
    scheduler: str | None = None,
    num_inference_steps: int | None = None,
    cache_interval: int | None = None,
) -> SamplingPlan:
    """Combine a preset with explicit choices; each explicit (non-None) value wins."""
    p = get_preset(preset)
    return SamplingPlan(
        preset=p.name,
        scheduler=scheduler if scheduler is not None else p.scheduler,
        num_inference_steps=int(num_inference_steps) if num_inference_steps is not None else p.num_inference_steps,
        cache_interval=int(cache_interval) if cache_interval is not None else p.cache_interval,
    )


# Steps for a sampler picked on its own (no preset): what each needs for a good image.
SAMPLER_STEPS = {"dpm": 25, "lcm": 4, "tcd": 4}


def default_steps(scheduler: str) -> int:
    """The step count a sampler chosen without a preset starts at (50 unless it converges faster)."""
    return SAMPLER_STEPS.get(scheduler, PRESETS[DEFAULT_PRESET].num_inference_steps)


def default_app_preset(device_type: str) -> tuple[str, str]:
    """The web app's default preset on `device_type` ("cpu", "cuda", "mps") and the reason, for the page.

    A GPU runs the paper's path in seconds, so it keeps *original*; a CPU needs minutes for it, so *fast*.
    """
    chosen = os.environ.get(PRESET_ENV, "").strip().lower()
    if chosen:
        get_preset(chosen)  # a typo in the variable is an error at start-up, not a silent fallback
        return chosen, f"set by {PRESET_ENV}"
    if device_type == "cpu":
        return "fast", "this server has no GPU, so the fastest setting is the default"
    return "original", f"running on a GPU ({device_type}), so the paper's own setting is the default"
