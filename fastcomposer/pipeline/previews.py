"""Live previews: what the image looks like so far, without the VAE.

A 512 px VAE decode costs 8-17 s on a 2-core CPU, far too much to run every few steps. SD1.5's four
latent channels are close to a linear function of colour, so a 4x3 matrix turns the denoiser's current
estimate of the clean latents into a recognisable (blurry, slightly off-colour) picture in well under a
millisecond, with no weights to download. The final image always comes from the full VAE.

The matrix is the widely used linear fit of the SD1.x VAE decoder published by Kevin Turner ("keturn",
2022); it maps *scaled* latents (the ones the UNet sees) to RGB in [-1, 1].
"""

from __future__ import annotations

import PIL.Image
import torch

# rows: latent channels 0..3; columns: R, G, B
LATENT_RGB_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
PREVIEW_UPSCALE = 4  # 64x64 latents -> 256 px previews: enough to judge pose and layout


def latents_to_rgb(latents: torch.Tensor, upscale: int = PREVIEW_UPSCALE) -> list[PIL.Image.Image]:
    """(n, 4, h, w) scaled latents -> n RGB images of (w * upscale, h * upscale) pixels."""
    factors = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32)
    rgb = torch.einsum("nchw,cr->nrhw", latents.detach().float().cpu(), factors)
    rgb = ((rgb + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    images = []
    for array in rgb:
        image = PIL.Image.fromarray(array)
        if upscale > 1:
            image = image.resize((image.width * upscale, image.height * upscale), PIL.Image.Resampling.BILINEAR)
        images.append(image)
    return images


def predict_clean_latents(
    scheduler, scaled_latents: torch.Tensor, noise_pred: torch.Tensor, timestep: torch.Tensor | float
) -> torch.Tensor:
    """The denoiser's current estimate of the clean latents x0, for previews only.

    Every sampler we offer predicts epsilon on variance-preserving inputs: `scaled_latents` is what
    `scheduler.scale_model_input` gave the UNet, so x0 = (x - sqrt(1 - abar_t) * eps) / sqrt(abar_t), with
    abar interpolated at `timestep` (Euler's timesteps are not integers).
    """
    abar = scheduler.alphas_cumprod.to(torch.float64)
    t = float(timestep)
    low = min(max(int(t), 0), len(abar) - 1)
    high = min(low + 1, len(abar) - 1)
    a = float(abar[low] + (abar[high] - abar[low]) * (t - low))
    x, eps = scaled_latents.float(), noise_pred.float()
    return (x - (1 - a) ** 0.5 * eps) / max(a, 1e-8) ** 0.5
