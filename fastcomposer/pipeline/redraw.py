"""Redraw an image with FastComposer, from a partly noised copy of it: the face pass's second look at one face.

Stable Diffusion draws a face well when it fills the frame and badly when it is small. A face crop, enlarged to the
model's 512 px, encoded by the VAE, noised to `strength` (0.4: the last 40% of the schedule) and denoised again keeps
the composition and redraws the detail. Here the denoising is a FastComposer run of one subject: its word and
`img` in the prompt, its photos fused in, and the subject conditioning on from the first step (the layout already
exists, so there is nothing to delay). `redraw` is that run, as a mixin of the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
from diffusers.utils.torch_utils import randn_tensor

from ..config import DETAIL
from ..inputs.prompt import parse_prompt
from .denoising import DelayedConditioning, LoopSettings
from .subjects import SubjectImages, subject_groups


@dataclass
class RedrawOutput:
    image: PIL.Image.Image | None  # None when a step callback stopped it, or the safety checker flagged it
    interrupted: bool = False
    steps: int = 0  # loop iterations run


class RedrawMixin:
    """`redraw`: image to image, with subjects, for a pipeline with the FastComposer stages."""

    def img2img_timesteps(self, num_inference_steps: int, strength: float) -> tuple[torch.Tensor, int]:
        """The last `strength` of the schedule (as diffusers' img2img takes it) and how many steps that is."""
        start_steps = min(int(num_inference_steps * strength), num_inference_steps)
        skip = max(num_inference_steps - start_steps, 0)
        timesteps = self.scheduler.timesteps[skip * self.scheduler.order:]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(skip * self.scheduler.order)
        return timesteps, num_inference_steps - skip

    def image_latents(self, image: PIL.Image.Image, generator: torch.Generator | None, dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
        """The VAE's latents of `image` (the mean of its latent distribution), scaled as the UNet sees them."""
        pixels = self.image_processor.preprocess(image.convert("RGB")).to(device=device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        return (latents * self.vae.config.scaling_factor).to(dtype)

    @torch.no_grad()
    def redraw(
        self,
        image: PIL.Image.Image,
        prompt: str,
        subject_images: SubjectImages,
        strength: float = DETAIL.strength,
        *,
        negative_prompt: str | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        generator: torch.Generator | None = None,
        callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None,
    ) -> RedrawOutput:
        """Redraw `image` (its size, a multiple of 8) from `strength` of the schedule with the subjects of `prompt`.

        Args:
            image: what to redraw, e.g. a face crop enlarged to 512 px.
            prompt, subject_images: as for `__call__` (the face pass gives one subject).
            strength: how much of the schedule runs again, in (0, 1]: 0.4 keeps the shape, redraws the detail.
            num_inference_steps: the full schedule's steps; about `strength` of them run.
        """
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"`strength` must be above 0 and at most 1 but is {strength}")
        # 1. Parse the prompt and check inputs
        width, height = image.size
        parsed = parse_prompt(prompt, self.tokenizer)
        groups = subject_groups(subject_images)
        self.check_inputs(parsed, groups, height, width, num_inference_steps, guidance_scale, 1.0, 1, ["latents"])
        self._interrupt = False
        device = self._execution_device
        do_cfg = guidance_scale > 1.0

        # 2-3. The prompts, the subject fused into its word
        text_embeds, negative_embeds = self.encode_prompts(parsed, negative_prompt, device, 1)
        augmented = self.encode_subjects(parsed, groups, device, 1, text_embeds.dtype)

        # 4. The last `strength` of the schedule
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps, steps = self.img2img_timesteps(num_inference_steps, strength)
        self._num_timesteps = len(timesteps)

        # 5. The image's latents, noised to the first of those timesteps
        clean = self.image_latents(image, generator, text_embeds.dtype, device)
        noise = randn_tensor(clean.shape, generator=generator, device=device, dtype=clean.dtype)
        latents = self.scheduler.add_noise(clean, noise, timesteps[:1])

        # 6. The subject from the first step: the switch lies before the loop
        settings = LoopSettings(guidance_scale, 1, 1, False, self.prepare_extra_step_kwargs(generator, 0.0),
                                ["latents"], callback_on_step_end)
        settings.extra_step_kwargs.pop("eta", None)
        conditioning = DelayedConditioning(
            text=torch.cat([negative_embeds, text_embeds]) if do_cfg else text_embeds,
            subject=torch.cat([negative_embeds, augmented]) if do_cfg else augmented,
            switch=-1.0, num_iterations=len(timesteps),
        )

        # 7. Denoise, 8. stopped: nothing, 9. decode and check
        latents, _ = self.denoise(latents, timesteps, conditioning, settings, parsed, steps)
        if self.interrupt:
            return RedrawOutput(None, True, 0)
        images, nsfw = self.decode_and_check(latents, "pil", device, text_embeds.dtype)
        if nsfw and nsfw[0]:  # flagged: the caller keeps what it had, never a grey patch
            return RedrawOutput(None, False, len(timesteps))
        return RedrawOutput(images[0], False, len(timesteps))
