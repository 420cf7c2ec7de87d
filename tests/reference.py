"""The released FastComposer inference, re-written from the spec (sections 1.1, 1.2, 2.2, 3, 4.1).

Independent of the package's code paths (it uses only the networks and the tokenizer), so tests can
compare our pipeline and CLI against it. Mirrors mit-han-lab/fastcomposer's demo pipeline as run with
diffusers 0.16: `prompt.replace("img", "")`, an added special `img` token, in-place masked_scatter_,
PNDM, a CPU generator, round(x * 255) conversion.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms as T


def original_tokenize_and_mask(prompt: str, tokenizer) -> tuple[list[int], list[bool]]:
    special = copy.deepcopy(tokenizer)
    special.add_tokens(["img"], special_tokens=True)
    marker_id = special.convert_tokens_to_ids("img")
    ids = special.encode(prompt)
    mask = [False] * len(ids)
    clean = []
    for token in ids:
        if token == marker_id:
            mask[len(clean) - 1] = True
        else:
            clean.append(token)
    length = special.model_max_length
    clean = clean[:length] + [tokenizer.pad_token_id] * (length - len(clean))
    mask = mask[:length] + [False] * (length - len(mask))
    return clean, mask


def _pad_to_square(image: torch.Tensor) -> torch.Tensor:
    _, h, w = image.shape
    if h == w:
        return image
    if h > w:
        p = (h - w) // 2
        return torch.nn.functional.pad(image, (p, p, 0, 0), "constant", 0)
    p = (w - h) // 2
    return torch.nn.functional.pad(image, (0, 0, p, p), "constant", 0)


@torch.no_grad()
def original_generate(pipe, prompt, images, negative_prompt, steps, guidance, alpha, num_images, seed, height, width,
                      object_resolution=256):
    """Images (uint8 numpy, N x H x W x 3) as the released demo would make them with these networks."""
    from diffusers import PNDMScheduler

    tok, text_encoder, dtype = pipe.tokenizer, pipe.text_encoder, pipe.unet.dtype

    def encode(text):
        ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return text_encoder(ids)[0]

    neg = encode(negative_prompt or "").repeat(num_images, 1, 1)
    txt = encode(prompt.replace("img", "")).repeat(num_images, 1, 1)

    transforms = torch.nn.Sequential(
        T.Resize((object_resolution, object_resolution), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.ConvertImageDtype(torch.float32),
    )
    pixels = [transforms(_pad_to_square(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)))
              for im in images]
    pixels = torch.stack(pixels).unsqueeze(0).to(dtype)
    b, k, c, h, w = pixels.shape
    x = pixels.view(b * k, c, h, w)
    size = pipe.image_encoder.config.image_size
    x = F.interpolate(x, (size, size), mode="bilinear", antialias=True)
    x = T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))(x)
    objects = pipe.image_encoder.visual_projection(pipe.image_encoder.vision_model(x)[1]).view(b, k, 1, -1)

    ids, mask = original_tokenize_and_mask(prompt, tok)
    ids, mask = torch.tensor([ids]), torch.tensor([mask])
    num_objects = mask.sum(dim=1)
    embeds = text_encoder(ids)[0]
    objects = objects.to(embeds.dtype)
    valid = torch.arange(k)[None, :] < num_objects[:, None]
    valid_objects = objects.view(-1, 1, objects.shape[-1])[valid.flatten()].view(-1, objects.shape[-1])
    flat = embeds.view(-1, embeds.shape[-1])
    flat_mask = mask.view(-1)
    fused = pipe.postfuse_module.fuse_fn(flat[flat_mask], valid_objects)
    flat.masked_scatter_(flat_mask[:, None], fused)
    aug = flat.view(1, 77, -1).repeat(num_images, 1, 1)

    # SD1.5's own scheduler config, read from the file, not from the pipeline under test.
    config = json.loads((Path(__file__).resolve().parents[1] / "fastcomposer/configs/scheduler.json").read_text())
    scheduler = PNDMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    generator = torch.manual_seed(seed)  # the demo used the global CPU generator
    shape = (num_images, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    latents = torch.randn(shape, generator=generator, dtype=dtype) * scheduler.init_noise_sigma
    start = (1 - alpha) * steps
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        cond = torch.cat([neg, txt]) if i <= start else torch.cat([neg, aug])
        noise = pipe.unet(model_input, t, encoder_hidden_states=cond).sample
        uncond, text = noise.chunk(2)
        noise = uncond + guidance * (text - uncond)
        latents = scheduler.step(noise, t, latents).prev_sample
    image = pipe.vae.decode(1 / 0.18215 * latents).sample
    image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
    return (image * 255).round().astype("uint8")
