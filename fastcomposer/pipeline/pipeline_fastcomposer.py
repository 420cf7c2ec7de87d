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

import copy
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import is_compiled_module
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from ..config import MARKER, SETTINGS
from ..inputs.prompt import ParsedPrompt, parse_prompt
from ..models.postfuse import PostfuseModule, SubjectImageProcessor, encode_subjects
from .attention import SubjectAttention, capture_attention
from .caching import FeatureCache, is_full_pass
from .presets import DEFAULT_PRESET, resolve
from .previews import predict_clean_latents
from .schedulers import make_scheduler, scheduler_name

logger = logging.get_logger(__name__)

SUBJECT_CACHE_SIZE = 8  # photo sets whose CLIP embeddings are kept (a few KB each)

SubjectImages = Sequence[PIL.Image.Image | Sequence[PIL.Image.Image]]  # per subject: one photo or several


def subject_groups(subject_images: SubjectImages) -> list[list[PIL.Image.Image]]:
    """Per subject, the list of its photos: a plain image means one photo."""
    return [[item] if isinstance(item, PIL.Image.Image) else list(item) for item in subject_images]


def _fingerprint(image: PIL.Image.Image) -> tuple:
    return image.size, image.mode, hashlib.sha1(image.tobytes()).hexdigest()


@dataclass
class FastComposerPipelineOutput(BaseOutput):
    """What a pipeline call returns.

    Args:
        images: the generated images (PIL list, numpy array or tensor, by `output_type`). An image the
            safety checker flagged is replaced by a plain grey placeholder; its pixels are never returned.
        nsfw_content_detected: per image, whether the safety checker flagged it (None without a checker).
        interrupted: True when a step callback stopped the run; `images` is then empty.
        attention: with `return_attention=True`, each subject's cross-attention map (see attention.py).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None
    interrupted: bool = False
    attention: SubjectAttention | None = None


def placeholder_image(width: int, height: int) -> PIL.Image.Image:
    """What a flagged image is replaced by: flat grey, so nothing of the original survives."""
    return PIL.Image.new("RGB", (width, height), (128, 128, 128))


class FastComposerPipeline(StableDiffusionPipeline):
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
        self.subject_processor = SubjectImageProcessor(object_resolution)
        self._subject_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # see encode_subject_images
        self._subject_cache_owner = image_encoder
        # The sampler config every `use_scheduler` call starts from: the one this pipeline was built with,
        # which `load_pipeline` makes the base model's PNDM config (see `set_base_scheduler`).
        self._base_scheduler_config = dict(scheduler.config) if scheduler is not None else {}
        # What a call without `preset` uses for the steps and the cache (load_pipeline(preset=...) sets it).
        self.default_preset = DEFAULT_PRESET
        self._special_tokenizer: tuple[CLIPTokenizer, CLIPTokenizer] | None = None  # (source, copy with `img`)

    # -- stages ---------------------------------------------------------------------------------------

    def check_inputs(  # type: ignore[override]
        self,
        parsed: ParsedPrompt,
        groups: list[list[PIL.Image.Image]],
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        alpha: float,
        num_images_per_prompt: int,
        callback_on_step_end_tensor_inputs: list[str],
        cache_interval: int = 1,
    ) -> None:
        """Raise `ValueError` naming the argument, the value given and what is expected."""
        n = len(groups)
        if parsed.num_subjects != n:
            raise ValueError(
                f"the prompt has {parsed.num_subjects} subject marker(s) but {n} subject image(s) were given "
                "(one `subject_images` entry per subject: a photo or a list of photos); write `img` after each "
                "subject word, one per subject, in the same order"
            )
        if n == 0:
            raise ValueError("at least one subject image and one `img` marker are needed")
        max_photos = SETTINGS.limits.max_photos_per_subject
        for k, group in enumerate(groups):
            if not 1 <= len(group) <= max_photos:
                raise ValueError(
                    f"subject {k + 1} has {len(group)} photos in `subject_images`; give 1 to {max_photos}"
                )
        if not all(isinstance(im, PIL.Image.Image) for group in groups for im in group):
            raise ValueError("`subject_images` must be PIL images, or lists of PIL images (several per subject)")
        if height % 8 or width % 8 or height <= 0 or width <= 0:
            raise ValueError(f"`height` and `width` must be positive multiples of 8 but are {height} and {width}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer but is {num_inference_steps!r}")
        if not isinstance(cache_interval, int) or cache_interval < 1:
            raise ValueError(f"`cache_interval` must be a positive integer (1 = no caching) but is {cache_interval!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must be between 0 and 1 but is {alpha}")
        if guidance_scale < 1.0:
            raise ValueError(
                f"`guidance_scale` must be >= 1 but is {guidance_scale}: below 1 pushes away from the prompt"
            )
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer but is {num_images_per_prompt!r}")
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

    def encode_subject_images(self, subject_images: SubjectImages, device: torch.device) -> torch.Tensor:
        """(1, k, 1, D) CLIP embeddings of the k subjects (pad to square, 256, then 224 in the encoder).

        A subject with several photos gets the mean of its photos' projected CLIP embeddings, with equal
        weights and before the post-fuse MLP. That point, not after the MLP: the MLP is nonlinear and ends
        in a LayerNorm, so averaging its outputs gives a vector it never produced (shorter than any it
        does), while the mean of CLIP embeddings of one person is itself a CLIP-like embedding (CLIP's
        space is close to linear for such averages) with photo-specific pose and light averaged out, and
        the trained MLP then fuses it as it fuses any one photo. Unnormalised, like a single embedding.

        Identical photos within a subject count once, and every photo of every subject goes through the
        encoder in one batch in subject order, so one photo per subject encodes exactly as before and
        the same photo given twice equals giving it once, bit for bit.

        Cached for the last few photo sets (keyed on every photo of every subject): people re-run new
        prompts with the same photos, and the ViT-L/14 pass costs about a second per photo on a CPU.
        """
        if self._subject_cache_owner is not self.image_encoder:  # a new encoder: old embeddings are void
            self._subject_cache.clear()
            self._subject_cache_owner = self.image_encoder
        unique: list[list[PIL.Image.Image]] = []
        prints: list[tuple] = []
        for group in subject_groups(subject_images):
            seen: dict[tuple, PIL.Image.Image] = {}
            for image in group:
                seen.setdefault(_fingerprint(image), image)
            unique.append(list(seen.values()))
            prints.append(tuple(seen))
        key = (str(device), self.image_encoder.dtype, self.subject_processor.resolution, tuple(prints))
        if key in self._subject_cache:
            self._subject_cache.move_to_end(key)
            return self._subject_cache[key]
        flat = [image for group in unique for image in group]
        pixels = self.subject_processor(flat).to(device=device, dtype=self.image_encoder.dtype)
        embeds = encode_subjects(self.image_encoder, pixels)  # (1, photos, 1, D)
        per_subject, start = [], 0
        for group in unique:
            chunk = embeds[:, start:start + len(group)]
            start += len(group)
            # One photo: the embedding itself (no arithmetic, so bit-identical to a single-photo run).
            per_subject.append(chunk if len(group) == 1 else chunk.float().mean(dim=1, keepdim=True).to(chunk.dtype))
        embeds = torch.cat(per_subject, dim=1)
        self._subject_cache[key] = embeds
        while len(self._subject_cache) > SUBJECT_CACHE_SIZE:
            self._subject_cache.popitem(last=False)
        return embeds

    def encode_augmented_prompt(
        self, parsed: ParsedPrompt, object_embeds: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """(1, L, D) text embeddings of the clean ids with each subject's embedding fused in."""
        input_ids = torch.tensor([parsed.input_ids], device=device)
        mask = torch.tensor([parsed.image_token_mask], device=device)
        text_embeds = self.text_encoder(input_ids)[0]
        num_objects = torch.tensor([parsed.num_subjects], device=device)
        return self.postfuse_module(text_embeds, object_embeds, mask, num_objects)

    @staticmethod
    def last_text_only_index(alpha: float, num_inference_steps: int) -> float:
        """The last loop index (inclusive) at which the conditional branch sees only the text.

        A float, not rounded, compared with the loop index as the released code did. With PNDM's
        N + 1 iterations and alpha = 1 the first iteration is still text-only.
        """
        return (1.0 - alpha) * num_inference_steps

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

        Returns:
            [`FastComposerPipelineOutput`] or `(images, nsfw_content_detected)`.
        """
        # 0. Default size from the UNet, as the released pipeline did; the preset fills what was not given
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        plan = resolve(preset or self.default_preset, None, num_inference_steps, cache_interval)
        num_inference_steps, cache_interval = plan.num_inference_steps, plan.cache_interval

        # 1. Parse the prompt and check inputs
        parsed = parse_prompt(prompt, self.tokenizer)
        groups = subject_groups(subject_images)
        self.check_inputs(
            parsed, groups, height, width, num_inference_steps, guidance_scale, alpha,
            num_images_per_prompt, tensor_inputs, cache_interval,
        )
        self._guidance_scale = guidance_scale
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        do_cfg = guidance_scale > 1.0
        device = self._execution_device

        with self._sampler(plan.scheduler if preset is not None else None):
            # 2. Encode the plain-text prompt and the negative prompt: (n, L, D) each
            text_embeds = self.encode_text(parsed.text_only, device).repeat(num_images_per_prompt, 1, 1)
            negative_embeds = self.encode_text(negative_prompt or "", device).repeat(num_images_per_prompt, 1, 1)

            # 3. Encode the subjects and fuse them into the prompt: (n, L, D)
            object_embeds = self.encode_subject_images(groups, device)
            augmented_embeds = self.encode_augmented_prompt(parsed, object_embeds, device)
            augmented_embeds = augmented_embeds.to(text_embeds.dtype).repeat(num_images_per_prompt, 1, 1)

            # 4. Prepare timesteps
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            timesteps = self.scheduler.timesteps
            self._num_timesteps = len(timesteps)

            # 5. Prepare latents: drawn with `generator` (on its device), then moved
            latents = self.prepare_latents(
                num_images_per_prompt, self.unet.config.in_channels, height, width,
                text_embeds.dtype, device, generator, latents,
            )
            extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
            if eta is None:  # each sampler's own default (TCD's gamma is 0.3, DDIM's eta 0)
                extra_step_kwargs.pop("eta", None)

            # 6. Delayed subject conditioning: which embedding the conditional branch sees, per iteration
            switch = self.last_text_only_index(alpha, num_inference_steps)
            text_cond = torch.cat([negative_embeds, text_embeds]) if do_cfg else text_embeds
            subject_cond = torch.cat([negative_embeds, augmented_embeds]) if do_cfg else augmented_embeds
            first_subject_step = next((i for i in range(len(timesteps)) if i > switch), None)

            # 7. Denoising loop, with the optional feature cache and attention capture around it
            if cache_interval > 1 and is_compiled_module(self.unet):
                # Not verified with CUDA graphs (the cached pass changes the graph every step): run every pass full.
                logger.warning("feature caching is off for a compiled UNet; every UNet pass runs in full")
                cache_interval = 1
            cache = FeatureCache.attach(self.unet, cache_interval) if cache_interval > 1 else nullcontext()
            capture = (
                capture_attention(self.unet, num_images_per_prompt, tuple(latents.shape[-2:]),
                                  num_images_per_prompt if do_cfg else 0)
                if return_attention else nullcontext((None, []))
            )
            num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
            with cache as feature_cache, capture as (store, attention_layers), \
                    self.progress_bar(total=num_inference_steps) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        break
                    subject_step = i > switch
                    if feature_cache is not None:  # full passes at 0, at the switch, then every N-th
                        feature_cache.full = is_full_pass(i, cache_interval, first_subject_step)
                    if store is not None:
                        store.active = subject_step
                        store.steps += subject_step
                    model_input = torch.cat([latents] * 2) if do_cfg else latents
                    model_input = self.scheduler.scale_model_input(model_input, t)
                    noise_pred = self.unet(
                        model_input, t, encoder_hidden_states=subject_cond if subject_step else text_cond,
                        cross_attention_kwargs=cross_attention_kwargs, return_dict=False,
                    )[0]
                    if do_cfg:
                        noise_uncond, noise_cond = noise_pred.chunk(2)
                        noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
                    denoised = (
                        predict_clean_latents(self.scheduler, model_input[-num_images_per_prompt:], noise_pred, t)
                        if "denoised" in tensor_inputs else None
                    )
                    latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                    if callback_on_step_end is not None:
                        local_tensors = {"latents": latents, "denoised": denoised}
                        outputs = callback_on_step_end(self, i, t, {k: local_tensors[k] for k in tensor_inputs})
                        latents = (outputs or {}).pop("latents", latents)
                    if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                        progress_bar.update()
                attention = None
                if store is not None:
                    token_maps = store.token_maps()
                    maps = token_maps[:, parsed.subject_positions] if token_maps.shape[1] else token_maps
                    attention = SubjectAttention(maps, token_maps, list(parsed.subject_positions),
                                                 attention_layers, store.steps)

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

    # -- conveniences ---------------------------------------------------------------------------------

    def set_base_scheduler(self, config: dict[str, Any]) -> None:
        """Make `config` (the base model's scheduler config) the one every sampler is built from; back to PNDM."""
        self._base_scheduler_config = dict(config)
        self.scheduler = make_scheduler("pndm", self._base_scheduler_config)

    def use_scheduler(self, name: str) -> None:
        """Switch the sampler (a name in `schedulers.SCHEDULERS`), keeping the model's noise schedule."""
        if scheduler_name(self.scheduler) != name:
            self.scheduler = make_scheduler(name, self._base_scheduler_config)

    @contextmanager
    def _sampler(self, name: str | None) -> Iterator[None]:
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

    @property
    def special_tokenizer(self) -> CLIPTokenizer:
        """A second tokenizer with `img` added as a special token, as mmagic and the original demo have it.

        For code written against mmagic's FastComposer, which counts subjects with
        `(np.array(model.special_tokenizer.encode(prompt)) == model.image_token_id).sum()`. Built from the
        pipeline's own tokenizer files (never the network) on first use. Its quirk is the original's: an
        added token matches inside words too ("imgur" counts). Our own `parse_prompt` counts whole words
        only; on ordinary prompts both agree.
        """
        source = self.tokenizer
        if self._special_tokenizer is None or self._special_tokenizer[0] is not source:
            special = copy.deepcopy(source)
            special.add_tokens([MARKER], special_tokens=True)
            self._special_tokenizer = (source, special)
        return self._special_tokenizer[1]

    @property
    def image_token_id(self) -> int:
        """The id of `img` in `special_tokenizer` (49408 for SD1.5's vocabulary)."""
        return self.special_tokenizer.convert_tokens_to_ids(MARKER)

    def request_stop(self) -> None:
        """Ask a running call to stop after the current step (safe to call from a step callback)."""
        self._interrupt = True

    def infer(
        self,
        prompt: str,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        alpha_: float = 0.7,
        reference_subject_images: Sequence[PIL.Image.Image] | None = None,
        **unused: Any,
    ) -> dict[str, Any]:
        """OpenMMLab mmagic's `FastComposer.infer`, with its defaults (guidance 7.5, alpha 0.7).

        Returns `{"samples": images, "nsfw_content_detected": flags}` so mmagic snippets port by changing
        only how the model is built.
        """
        if unused:
            logger.warning("infer(): ignoring unsupported arguments %s", sorted(unused))
        out = self(
            prompt,
            reference_subject_images or [],
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            alpha=alpha_,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            latents=latents,
            eta=eta,
            output_type=output_type,
        )
        return {"samples": out.images, "nsfw_content_detected": out.nsfw_content_detected}
