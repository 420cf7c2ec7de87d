"""FastComposerPipeline: Stable Diffusion 1.5 with subjects, by delayed subject conditioning.

A small `StableDiffusionPipeline` subclass. What it adds (spec section 4):

1. The prompt is read twice: as plain text (markers removed) and "augmented", where each subject
   word's embedding is fused with a CLIP embedding of that subject's photo (see model.py).
2. Delayed conditioning: the conditional branch sees the plain text while the loop index
   i <= (1 - alpha) * num_inference_steps, so the layout forms from the prompt first, and the
   augmented embedding afterwards, so the subjects' identities fill that layout. The unconditional
   branch always sees the negative prompt and never the subjects.

The rest is diffusers' own: the networks, samplers, latents, progress bar and the safety checker's
`run_safety_checker`; only the last step differs, replacing flagged images by a grey placeholder.

Example:
    >>> from fastcomposer import load_pipeline
    >>> from PIL import Image
    >>> pipe = load_pipeline()  # downloads mit-han-lab/fastcomposer once
    >>> out = pipe("a man img and a woman img hiking", [Image.open("him.jpg"), Image.open("her.jpg")])
    >>> out.images[0].save("hike.png")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import PIL.Image
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import logging
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from ..config import SETTINGS
from ..inputs.prompt import ParsedPrompt, parse_prompt
from ..models.postfuse import PostfuseModule
from .attention import SubjectAttention
from .checks import check_call
from .denoising import DelayedConditioning, LoopAddons, LoopSettings, last_text_only_index
from .layout import Box, normalise_boxes, text_only_positions
from .layout_attention import LayoutPlan
from .mmagic import MMagicMixin
from .output import FastComposerPipelineOutput, placeholder_image
from .presets import DEFAULT_PRESET, resolve
from .previews import predict_clean_latents
from .redraw import RedrawMixin
from .schedulers import SamplerMixin
from .subjects import SubjectEncodingMixin, SubjectImages, subject_groups

logger = logging.get_logger(__name__)

__all__ = ["FastComposerPipeline", "FastComposerPipelineOutput", "SubjectImages", "placeholder_image",
           "subject_groups"]


class FastComposerPipeline(SubjectEncodingMixin, SamplerMixin, MMagicMixin, RedrawMixin, StableDiffusionPipeline):
    r"""Text-to-image generation of one to four given subjects with FastComposer (arXiv 2305.10431).

    Components are those of [`StableDiffusionPipeline`] plus `image_encoder` (CLIP ViT-L/14 vision tower
    with its projection) and `postfuse_module` ([`PostfuseModule`]).
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->postfuse_module->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor"]
    _exclude_from_cpu_offload = ["safety_checker"]
    # "denoised": the current estimate of the clean latents (for live previews), computed only when asked.
    _callback_tensor_inputs = ["latents", "denoised"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection,
        postfuse_module: PostfuseModule,
        safety_checker: StableDiffusionSafetyChecker | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        requires_safety_checker: bool = True,
        object_resolution: int = 256,
    ):
        # Keyword arguments only: the parent's positional order has changed across diffusers releases.
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        self.register_modules(postfuse_module=postfuse_module)
        self.register_to_config(object_resolution=object_resolution)
        self.init_subject_encoding(image_encoder, object_resolution)
        # The sampler config every `use_scheduler` call starts from: the one this pipeline was built with,
        # which `load_pipeline` makes the base model's PNDM config (see `set_base_scheduler`).
        self._base_scheduler_config = dict(scheduler.config) if scheduler is not None else {}
        # What a call without `preset` uses for the steps and the cache (load_pipeline(preset=...) sets it).
        self.default_preset = DEFAULT_PRESET
        self._special_tokenizer = None  # see MMagicMixin.special_tokenizer

    # -- stages ---------------------------------------------------------------------------------------

    def check_inputs(  # type: ignore[override]
        self, parsed: ParsedPrompt, groups: list[list[PIL.Image.Image]], height: int, width: int,
        num_inference_steps: int, guidance_scale: float, alpha: float, num_images_per_prompt: int,
        callback_on_step_end_tensor_inputs: list[str], cache_interval: int = 1, boxes: Sequence | None = None,
    ) -> None:
        """Raise `ValueError` naming the argument, the value given and what is expected (see checks.py)."""
        check_call(
            parsed, groups, height, width, num_inference_steps, guidance_scale, alpha, num_images_per_prompt,
            cache_interval, boxes,
        )
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be in {self._callback_tensor_inputs}, got {bad}"
            )

    def encode_text(self, text: str, device: torch.device) -> torch.Tensor:
        """(1, L, D) CLIP text embeddings, padded to and cut at the context length (end token kept).

        Written out instead of the inherited `encode_prompt`, which logs the cut-off text of long prompts.
        """
        ids = self.tokenizer(
            text, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(device))[0]

    def encode_prompts(
        self, parsed: ParsedPrompt, negative_prompt: str | None, device: torch.device, num_images: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, L, D) each: the plain-text prompt (markers removed) and the negative prompt ("" when None)."""
        text_embeds = self.encode_text(parsed.text_only, device).repeat(num_images, 1, 1)
        negative_embeds = self.encode_text(negative_prompt or "", device).repeat(num_images, 1, 1)
        return text_embeds, negative_embeds

    def encode_subjects(
        self, parsed: ParsedPrompt, groups: list[list[PIL.Image.Image]], device: torch.device, num_images: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """(n, L, D): the prompt with each subject's photo embedding fused into its word."""
        object_embeds = self.encode_subject_images(groups, device)
        augmented = self.encode_augmented_prompt(parsed, object_embeds, device)
        return augmented.to(dtype).repeat(num_images, 1, 1)

    last_text_only_index = staticmethod(last_text_only_index)

    def prepare_layout(self, parsed: ParsedPrompt, boxes: Sequence | None, separate: bool) -> LayoutPlan | None:
        """The call's layout, with each subject's token position in both prompts; None without boxes or separation."""
        boxes = normalise_boxes(boxes, parsed.num_subjects)
        if not separate and all(box is None for box in boxes):
            return None  # nothing is installed: the loop is exactly the plain one
        positions = list(parsed.subject_positions)
        text_positions = text_only_positions(self.tokenizer, parsed.text_only, parsed.input_ids, positions)
        return LayoutPlan(boxes, bool(separate), positions, text_positions)

    def prepare_conditioning(
        self, text_embeds: torch.Tensor, negative_embeds: torch.Tensor, augmented_embeds: torch.Tensor,
        alpha: float, num_inference_steps: int, num_iterations: int, do_cfg: bool,
    ) -> DelayedConditioning:
        """Delayed subject conditioning: the text-only batch first, the subject-augmented one after the switch."""
        return DelayedConditioning(
            text=torch.cat([negative_embeds, text_embeds]) if do_cfg else text_embeds,
            subject=torch.cat([negative_embeds, augmented_embeds]) if do_cfg else augmented_embeds,
            switch=last_text_only_index(alpha, num_inference_steps),
            num_iterations=num_iterations,
        )

    def decode_and_check(
        self, latents: torch.Tensor, output_type: str, device: torch.device, dtype: torch.dtype
    ) -> tuple[Any, list[bool] | None]:
        """VAE decode, safety check, convert; flagged images become placeholders."""
        latents = 1 / self.vae.config.scaling_factor * latents
        image = self.vae.decode(latents, return_dict=False)[0]
        image, nsfw = self.run_safety_checker(image, device, dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not flag for flag in nsfw]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
        if nsfw is not None and output_type == "pil":
            image = [placeholder_image(*im.size) if flag else im for im, flag in zip(image, nsfw)]
        return image, (None if nsfw is None else [bool(f) for f in nsfw])

    # -- the loop -------------------------------------------------------------------------------------

    def denoise(
        self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: DelayedConditioning,
        settings: LoopSettings, parsed: ParsedPrompt, num_inference_steps: int,
    ) -> tuple[torch.Tensor, SubjectAttention | None]:
        """The denoising loop: one UNet pass and one sampler step per timestep, with the call's add-ons attached.

        Returns the final latents and, with `settings.return_attention`, each subject's attention map.
        """
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        with LoopAddons(self.unet, settings, conditioning, tuple(latents.shape[-2:]), latents.device,
                        conditioning.text.dtype, self.scheduler.config.num_train_timesteps) as addons, \
                self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    break
                addons.before_step(i, t)
                latents, denoised = self.denoising_step(i, t, latents, conditioning.at(i), settings)
                if settings.callback is not None:
                    tensors = {"latents": latents, "denoised": denoised}
                    outputs = settings.callback(self, i, t, {k: tensors[k] for k in settings.tensor_inputs})
                    latents = (outputs or {}).pop("latents", latents)
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
            return latents, addons.attention(parsed)

    def denoising_step(
        self, i: int, t: torch.Tensor, latents: torch.Tensor, embeds: torch.Tensor, settings: LoopSettings
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One iteration: the UNet on the (guided) batch, then the sampler. Also returns the clean-latent
        estimate when the callback asked for "denoised" (live previews), else None."""
        model_input = torch.cat([latents] * 2) if settings.do_cfg else latents
        model_input = self.scheduler.scale_model_input(model_input, t)
        noise_pred = self.unet(
            model_input, t, encoder_hidden_states=embeds, cross_attention_kwargs=settings.cross_attention_kwargs,
            return_dict=False,
        )[0]
        if settings.do_cfg:
            noise_uncond, noise_cond = noise_pred.chunk(2)
            noise_pred = noise_uncond + settings.guidance_scale * (noise_cond - noise_uncond)
        denoised = (
            predict_clean_latents(self.scheduler, model_input[-settings.num_images:], noise_pred, t)
            if "denoised" in settings.tensor_inputs else None
        )
        latents = self.scheduler.step(noise_pred, t, latents, **settings.extra_step_kwargs, return_dict=False)[0]
        return latents, denoised

    # -- the call -------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        subject_images: SubjectImages,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float = SETTINGS.defaults.guidance_scale,
        alpha: float = SETTINGS.defaults.alpha,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        eta: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        # Added parameters (FastComposer Studio)
        preset: str | None = None,
        cache_interval: int | None = None,
        return_attention: bool = False,
        boxes: Sequence[Box | None] | None = None,
        separate: bool = False,
    ) -> FastComposerPipelineOutput | tuple:
        r"""Generate images of the given subjects.

        Args:
            prompt (`str`): text with `img` after each subject word, e.g. "a man img and a woman img hiking".
            subject_images (`list`): per `img` marker, in order, one PIL photo of that subject or a list of
                1-4 photos of them (their embeddings are averaged; see `encode_subject_images`).
            negative_prompt (`str`, *optional*): what to steer away from; None means "". Passed through as
                text (parenthesis weights such as "((ugly))" are not interpreted).
            height, width (`int`, *optional*, defaults to the UNet's sample size x 8 = 512).
            num_inference_steps (`int`, *optional*): defaults to the preset's (50 for *original*).
            guidance_scale (`float`, defaults to 5.0): classifier-free guidance weight; 1 disables guidance
                (and the negative prompt).
            alpha (`float`, defaults to 0.75): share of the denoising loop conditioned on the subjects. Higher
                keeps identity better, lower follows the prompt better.
            num_images_per_prompt (`int`, defaults to 1).
            generator (`torch.Generator`, *optional*): seed source. A CPU generator gives the same image on
                every device.
            latents (`torch.Tensor`, *optional*): starting noise instead of drawing it from `generator`.
            eta (`float`, *optional*): DDIM's eta (default 0) or TCD's gamma (default 0.3); None keeps the
                sampler's own default. Ignored by the other samplers.
            output_type (`str`, defaults to "pil"): "pil", "np", "pt" or "latent".
            return_dict (`bool`, defaults to True): return a `FastComposerPipelineOutput` instead of a tuple.
            cross_attention_kwargs (`dict`, *optional*): passed to the UNet's attention processors.
            callback_on_step_end (`Callable`, *optional*): called as `fn(pipe, i, t, tensors)` after each loop
                iteration; call `pipe.request_stop()` inside it to stop the run.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): tensors passed to the callback:
                "latents" (default) and/or "denoised" (the current estimate of the clean latents).
            preset (`str`, *optional*): "original", "balanced" or "fast" (see presets.py): the sampler, steps
                and cache interval for this call; explicit `num_inference_steps`/`cache_interval` win. None
                keeps the current sampler and takes steps and caching from `self.default_preset`.
            cache_interval (`int`, *optional*): DeepCache feature caching (see caching.py); 1 = off. Defaults
                to the preset's.
            return_attention (`bool`, defaults to False): also return each subject's cross-attention map
                (`output.attention`, see attention.py). Capturing leaves the images unchanged.
            boxes (`list`, *optional*): where each subject goes, one per subject in marker order: `(x0, y0, x1, y1)`
                as fractions of width and height, or None for a free subject (a shorter list leaves the rest
                free). Attention masks keep each subject in its box and out of the others' (see layout.py).
            separate (`bool`, defaults to False): keep the subjects apart without boxes: each free subject gets the
                region its word attends to most during the text-only steps, and the others are shut out of it.

        Returns:
            [`FastComposerPipelineOutput`] or `(images, nsfw_content_detected)`.
        """
        # 0. Default size from the UNet, as the released pipeline did; the preset fills what was not given
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        plan = resolve(preset or self.default_preset, None, num_inference_steps, cache_interval)
        num_inference_steps, n = plan.num_inference_steps, num_images_per_prompt

        # 1. Parse the prompt and check inputs
        parsed = parse_prompt(prompt, self.tokenizer)
        groups = subject_groups(subject_images)
        self.check_inputs(
            parsed, groups, height, width, num_inference_steps, guidance_scale, alpha, n, tensor_inputs,
            plan.cache_interval, boxes,
        )
        self._guidance_scale = guidance_scale
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        device = self._execution_device

        with self.sampler(plan.scheduler if preset is not None else None):
            # 2. Encode the plain-text prompt and the negative prompt: (n, L, D) each
            text_embeds, negative_embeds = self.encode_prompts(parsed, negative_prompt, device, n)

            # 3. Encode the subjects and fuse them into the prompt: (n, L, D)
            augmented_embeds = self.encode_subjects(parsed, groups, device, n, text_embeds.dtype)

            # 4. Prepare timesteps
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            timesteps = self.scheduler.timesteps
            self._num_timesteps = len(timesteps)

            # 5. Prepare latents: drawn with `generator` (on its device), then moved
            latents = self.prepare_latents(
                n, self.unet.config.in_channels, height, width, text_embeds.dtype, device, generator, latents,
            )
            extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
            if eta is None:  # each sampler's own default (TCD's gamma is 0.3, DDIM's eta 0)
                extra_step_kwargs.pop("eta", None)

            # 6. Delayed subject conditioning: which embedding the UNet batch sees, per iteration
            settings = LoopSettings(
                guidance_scale, n, plan.cache_interval, return_attention, extra_step_kwargs, tensor_inputs,
                callback_on_step_end, cross_attention_kwargs, self.prepare_layout(parsed, boxes, separate),
            )
            conditioning = self.prepare_conditioning(
                text_embeds, negative_embeds, augmented_embeds, alpha, num_inference_steps, len(timesteps),
                settings.do_cfg,
            )

            # 7. Denoising loop, with the call's add-ons (feature cache, attention capture, layout) attached
            latents, attention = self.denoise(latents, timesteps, conditioning, settings, parsed, num_inference_steps)

        # 8. Stopped early: skip the decode (seconds on a CPU) and return nothing
        if self.interrupt:
            self.maybe_free_model_hooks()
            return FastComposerPipelineOutput(images=[], nsfw_content_detected=None, interrupted=True)

        # 9. Decode, run the safety checker, convert
        if output_type == "latent":
            images, nsfw = latents, None
        else:
            images, nsfw = self.decode_and_check(latents, output_type, device, text_embeds.dtype)
        self.maybe_free_model_hooks()

        if not return_dict:
            return images, nsfw
        return FastComposerPipelineOutput(images=images, nsfw_content_detected=nsfw, attention=attention)

    def request_stop(self) -> None:
        """Ask a running call to stop after the current step (safe to call from a step callback)."""
        self._interrupt = True
