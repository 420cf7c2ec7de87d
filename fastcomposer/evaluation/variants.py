"""Variants to compare in one evaluation run: the same cases, prompts and seeds, one model load.

    evaluate CASES --variants original,balanced,fast
    evaluate CASES --variants original,layout,separate
    evaluate CASES --variants original,lora=style.safetensors:0.8,photos=1

| name | what changes |
|---|---|
| `original`, `balanced`, `fast` | the speed preset: sampler, steps and feature caching (presets.py) |
| `layout` | a box per subject, side by side (one subject: none) |
| `separate` | keep people apart (automatic separation) |
| `detail` | the face pass: each subject's face redrawn with that subject alone (strength 0.4) |
| `lora=FILE:SCALE` | a LoRA on the model for this variant's runs |
| `photos=1` | only each subject's first photo |

Every other setting is the run's own (`--steps`, `--alpha`, ...). The first variant is the baseline the others
are compared with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from .errors import EvaluationError

PRESET_NAMES = ("original", "balanced", "fast")
NAMES = (*PRESET_NAMES, "layout", "separate", "detail", "lora=FILE:SCALE", "photos=1")


@dataclass(frozen=True)
class Variant:
    """One way of generating: a name for the report, a change to each request, and an optional LoRA."""

    name: str
    change: Callable  # GenerationRequest -> GenerationRequest
    lora: str | None = None  # a LoRA spec applied for this variant's runs


def _preset(name: str) -> Callable:
    from ..pipeline.presets import get_preset

    preset = get_preset(name)
    return lambda r: replace(r, scheduler=preset.scheduler, num_inference_steps=preset.num_inference_steps,
                             cache_interval=preset.cache_interval, preset=preset.name)


def parse_variant(text: str) -> Variant:
    name = text.strip()
    if name in PRESET_NAMES:
        return Variant(name, _preset(name))
    if name == "layout":
        from ..pipeline.boxes import side_by_side

        return Variant(name, lambda r: replace(r, boxes=side_by_side(len(r.images)) if len(r.images) > 1 else None))
    if name == "separate":
        return Variant(name, lambda r: replace(r, separate=True))
    if name == "detail":
        return Variant(name, lambda r: replace(r, detail_faces=True))
    if name == "photos=1":
        return Variant(name, lambda r: replace(r, images=[group[:1] if isinstance(group, list) else group
                                                          for group in r.images]))
    if name.startswith("lora="):
        from ..models.lora import parse_lora_spec

        spec = name.removeprefix("lora=")
        try:
            parse_lora_spec(spec)
        except ValueError as e:
            raise EvaluationError(f"variant {name!r}: {e}") from None
        return Variant(name, lambda r: r, lora=spec)
    raise EvaluationError(f"unknown variant {name!r}; the variants are {', '.join(NAMES)}")


def parse_variants(text: str | None) -> list[Variant]:
    """"original,fast" -> the variants, in order; None or "" -> one variant that changes nothing ("as given")."""
    if not text:
        return [Variant("as given", lambda r: r)]
    names = [part for part in (p.strip() for p in text.split(",")) if part]
    if len(set(names)) != len(names):
        raise EvaluationError("each variant may be named once in --variants")
    return [parse_variant(name) for name in names]
