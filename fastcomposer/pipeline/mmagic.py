"""OpenMMLab mmagic's FastComposer interface, for code written against it: `infer` and `special_tokenizer`."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch
from diffusers.utils import logging
from transformers import CLIPTokenizer

from ..config import MARKER

logger = logging.get_logger(__name__)


class MMagicMixin:
    """mmagic's `FastComposer.infer`, `special_tokenizer` and `image_token_id` on our pipeline."""

    tokenizer: CLIPTokenizer
    _special_tokenizer: tuple[CLIPTokenizer, CLIPTokenizer] | None = None  # (source, copy with `img`)

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
