"""Prompt and settings: identity strength, images, LoRA, the Speed choice and what it sets under Advanced.

Speed is one control for three settings (sampler, steps, feature cache interval). Choosing Original,
Balanced or Fast sets all three; each stays visible under Advanced and can be changed, and then Speed
shows "Custom" (changing them back to a preset's values shows that preset again). What runs is always
what the three controls say: Speed itself is never sent as an override, so an API call that gives
sampler, steps and cache interval gets exactly those.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ..config import GenerationDefaults, Limits
from ..generation.estimate import Estimator, Workload, format_seconds
from ..pipeline.presets import PRESETS, default_steps, get_preset

CUSTOM = "custom"
SPEED_CHOICES = [(p.label, p.name) for p in PRESETS.values()] + [("Custom", CUSTOM)]


def speed_of(sampler: str, steps: float, cache_interval: float) -> str:
    """The preset whose sampler, steps and cache interval these are, or "custom"."""
    for p in PRESETS.values():
        if (p.scheduler, p.num_inference_steps, p.cache_interval) == (sampler, int(steps), int(cache_interval)):
            return p.name
    return CUSTOM


class SpeedAdvice:
    """The line under Speed: which setting is active, why, and about how long an image takes here."""

    def __init__(self, estimator: Estimator, default: str, reason: str):
        self.estimator, self.default, self.reason = estimator, default, reason

    def seconds_per_image(self, sampler, steps, cache_interval, width, height, num_images) -> float:
        work = Workload.of(sampler, int(steps), int(cache_interval), int(width), int(height), int(num_images))
        return self.estimator.seconds(work) / max(1, int(num_images))

    def note(self, speed, sampler, steps, cache_interval, width, height, num_images) -> str:
        try:
            per_image = self.seconds_per_image(sampler, steps, cache_interval, width, height, num_images)
        except (TypeError, ValueError):  # a half-typed number box: say nothing about time until it is valid
            per_image = None
        if speed == CUSTOM:
            cache = f", cache every {int(cache_interval)}" if int(cache_interval) > 1 else ""
            head = f"**Custom** · {sampler}, {int(steps)} steps{cache}"
        else:
            preset = get_preset(speed)
            head = f"**{preset.label}** · {self.reason if speed == self.default else preset.summary}"
        return head + (f" · about {format_seconds(per_image)} per image on this hardware" if per_image else "")


@dataclass
class SettingsControls:
    """The components of the settings section."""

    prompt: gr.Textbox
    hint: gr.Markdown  # "2 subjects in prompt · 2 photos ✓"
    alpha: gr.Slider
    num_images: gr.Slider
    lora: gr.Dropdown  # "" for none; hidden when ./loras holds no LoRA files
    lora_scale: gr.Slider
    negative: gr.Textbox
    sampler: gr.Dropdown
    steps: gr.Slider
    cache_interval: gr.Slider
    guidance: gr.Slider
    width: gr.Slider
    height: gr.Slider
    seed: gr.Number
    speed: gr.Radio | None = None  # built next to Generate (`build_speed`)
    speed_note: gr.Markdown | None = None


def build_settings(d: GenerationDefaults, limits: Limits, preset: str, loras: dict[str, Path]) -> SettingsControls:
    """Prompt, identity strength, images, LoRA and the Advanced accordion (inside a Blocks context)."""
    from ..pipeline.schedulers import SCHEDULER_LABELS

    p = get_preset(preset)
    prompt = gr.Textbox(label="Prompt", lines=2, max_lines=4, elem_id="prompt",
                        placeholder="a woman img and a man img hiking in the Alps")
    hint = gr.Markdown(elem_id="prompt-hint")
    alpha = gr.Slider(0.0, 1.0, value=d.alpha, step=0.05, label="Identity strength (alpha)",
                      info="Higher: more like the photos. Lower: follows the prompt more freely.")
    num_images = gr.Slider(1, limits.max_images_per_run, value=d.num_images, step=1, label="Images")
    with gr.Row(visible=bool(loras)):
        lora = gr.Dropdown([("none", "")] + [(name, name) for name in loras], value="", label="LoRA",
                           info="a style or concept file from the server's loras/ folder", elem_id="lora")
        lora_scale = gr.Slider(0.0, 1.5, value=0.8, step=0.05, label="LoRA strength")
    with gr.Accordion("Advanced settings", open=False):
        negative = gr.Textbox(label="Negative prompt", value=d.negative_prompt, lines=2)
        with gr.Row():
            sampler = gr.Dropdown([(label, name) for name, label in SCHEDULER_LABELS.items()], value=p.scheduler,
                                  label="Sampler", elem_id="sampler")
            steps = gr.Slider(limits.min_steps, limits.max_steps, value=p.num_inference_steps, step=1, label="Steps",
                              elem_id="steps")
        cache_interval = gr.Slider(1, limits.max_cache_interval, value=p.cache_interval, step=1,
                                   label="Feature cache interval", elem_id="cache-interval",
                                   info="1: off. N: deep UNet features are reused for N-1 of every N steps "
                                   "(DeepCache): faster, slightly different images.")
        guidance = gr.Slider(limits.min_guidance, limits.max_guidance, value=d.guidance_scale, step=0.5,
                             label="Guidance scale")
        with gr.Row():
            width = gr.Slider(limits.min_side, limits.max_side, value=d.width, step=64, label="Width", elem_id="width")
            height = gr.Slider(limits.min_side, limits.max_side, value=d.height, step=64, label="Height",
                               elem_id="height")
        # No `precision`: Gradio would round 2.5 to 2 before our check could refuse it (see generation/request.py)
        seed = gr.Number(value=-1, label="Seed (-1: random)", minimum=-1, maximum=limits.max_seed, step=1,
                         elem_id="seed")
    return SettingsControls(prompt, hint, alpha, num_images, lora, lora_scale, negative, sampler, steps,
                            cache_interval, guidance, width, height, seed)


def build_speed(controls: SettingsControls, advice: SpeedAdvice, d: GenerationDefaults) -> None:
    """The Speed choice and its line, next to Generate (inside a Blocks context)."""
    p = get_preset(advice.default)
    controls.speed = gr.Radio(SPEED_CHOICES, value=p.name, label="Speed", elem_id="speed")
    controls.speed_note = gr.Markdown(
        advice.note(p.name, p.scheduler, p.num_inference_steps, p.cache_interval, d.width, d.height, d.num_images),
        elem_id="speed-note")


def wire_speed(c: SettingsControls, advice: SpeedAdvice) -> None:
    """Speed sets the three controls; changing any of them marks Speed as Custom (or as the preset they match)."""
    size = [c.width, c.height, c.num_images]

    def choose(speed, sampler, steps, cache, *sizes):
        if speed == CUSTOM:
            return sampler, steps, cache, advice.note(speed, sampler, steps, cache, *sizes)
        p = get_preset(speed)
        note = advice.note(speed, p.scheduler, p.num_inference_steps, p.cache_interval, *sizes)
        return p.scheduler, p.num_inference_steps, p.cache_interval, note

    def sampler_picked(sampler, steps):
        """A sampler picked by hand starts at its own step count, unless the steps were set by hand too."""
        usual = {default_steps(s) for s in ("pndm", "dpm", "lcm")} | {p.num_inference_steps for p in PRESETS.values()}
        return default_steps(sampler) if int(steps) in usual else steps

    def follow(sampler, steps, cache, *sizes):
        speed = speed_of(sampler, steps, cache)
        return speed, advice.note(speed, sampler, steps, cache, *sizes)

    quiet = dict(queue=False, show_progress="hidden", api_visibility="private")
    three = [c.sampler, c.steps, c.cache_interval]
    c.speed.input(choose, [c.speed, *three, *size], [*three, c.speed_note], **quiet)
    c.sampler.input(sampler_picked, [c.sampler, c.steps], c.steps, **quiet)
    gr.on([x.change for x in three], follow, [*three, *size], [c.speed, c.speed_note], **quiet)
    gr.on([x.change for x in size], lambda *v: advice.note(*v), [c.speed, *three, *size], c.speed_note, **quiet)


def wire_hint(c: SettingsControls, galleries: list, tokenizer, limits: Limits) -> None:
    """The live "2 subjects in prompt · 2 photos ✓" line, unqueued (it runs on every keystroke). It counts subjects
    (slots with photos), not photos: a subject's several photos fill one `img`."""
    from ..generation.hints import prompt_hint
    from .photos import photos_of

    def hint(prompt: str, *values) -> str:
        subjects = photos_of(list(values))
        return prompt_hint(prompt, len(subjects), tokenizer, limits.max_subjects, limits.max_prompt_chars,
                           total_photos=sum(len(paths) for _, paths in subjects)).text

    gr.on([c.prompt.change, *(g.change for g in galleries)], hint, [c.prompt, *galleries], c.hint, api_name="hint",
          queue=False, api_visibility="undocumented")
