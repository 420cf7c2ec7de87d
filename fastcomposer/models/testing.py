"""Fixtures shared by the tests and benchmarks: released-layout checkpoints and a tiny safety checker.

`released_state_dict` writes modules out the way the original training code saved them (spec
section 6.1), spelled out here independently of the loader's mapping in checkpoint.py, so a
round trip through both checks the loader against the documented layout rather than against itself.
"""

from __future__ import annotations

from pathlib import Path

import torch

# diffusers <= 0.16 called the VAE mid-block attention projections by these names.
_NEW_TO_OLD_VAE = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


def _is_fp32_in_release(key: str, num_vision_layers: int) -> bool:
    """The released file kept trained parts in fp32 and frozen parts in bf16 (spec 6.1)."""
    if key.startswith(("unet.", "postfuse_module.")) or key == "image_encoder.visual_projection.weight":
        return True
    trained = (f"image_encoder.vision_model.encoder.layers.{num_vision_layers - 2}.",
               f"image_encoder.vision_model.encoder.layers.{num_vision_layers - 1}.")
    return key.startswith(trained)


def released_state_dict(modules: dict[str, torch.nn.Module], mixed_dtypes: bool = True) -> dict[str, torch.Tensor]:
    """A state dict in the exact layout of mit-han-lab/fastcomposer's `pytorch_model.bin`.

    Args:
        modules: "unet", "vae", "text_encoder", "image_encoder", "postfuse_module" as built by
            `architecture.build_modules`.
        mixed_dtypes: store frozen parts in bf16 as the release does (fp32 everywhere otherwise).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in modules["text_encoder"].state_dict().items():
        out[f"text_encoder.{key}"] = value  # current transformers has no `text_model.` level either
    out["text_encoder.embeddings.position_ids"] = torch.arange(
        modules["text_encoder"].config.max_position_embeddings
    ).unsqueeze(0)
    for key, value in modules["image_encoder"].state_dict().items():
        out[f"image_encoder.{key}"] = value
    vision = modules["image_encoder"].config
    num_positions = (vision.image_size // vision.patch_size) ** 2 + 1
    out["image_encoder.vision_model.embeddings.position_ids"] = torch.arange(num_positions).unsqueeze(0)
    for key, value in modules["vae"].state_dict().items():
        if ".attentions." in key:
            for new, old in _NEW_TO_OLD_VAE.items():
                key = key.replace(new, old)
        out[f"vae.{key}"] = value
    for name in ("unet", "postfuse_module"):
        for key, value in modules[name].state_dict().items():
            out[f"{name}.{key}"] = value

    if mixed_dtypes:
        num_layers = vision.num_hidden_layers
        for key, value in out.items():
            if value.is_floating_point():
                out[key] = value.float() if _is_fp32_in_release(key, num_layers) else value.to(torch.bfloat16)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def tiny_safety_checker(flag_everything: bool, seed: int = 0):
    """A tiny `StableDiffusionSafetyChecker` whose thresholds force a verdict, and its feature extractor.

    With `flag_everything` the concept thresholds are -1 (cosine similarity always exceeds them);
    otherwise +2 (never reached). Flags can then be tested without the 1.2 GB real checker.
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=16, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    weight = -1.0 if flag_everything else 2.0
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(weight)
        checker.special_care_embeds_weights.fill_(weight)
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker, extractor


def write_model_folders(arch, base_dir: str | Path, image_encoder_dir: str | Path) -> None:
    """Write `arch` as a diffusers SD folder (configs, tokenizer, scheduler) and a CLIP folder (CLIPConfig).

    These are the folders `--base-model` and `--image-encoder` take, laid out like
    `stable-diffusion-v1-5/stable-diffusion-v1-5` and `openai/clip-vit-large-patch14`.
    """
    import json

    from transformers import CLIPConfig

    from ..inputs.prompt import load_tokenizer

    base, clip = Path(base_dir), Path(image_encoder_dir)
    for name, cfg, filename in (("unet", arch.unet, "config.json"), ("vae", arch.vae, "config.json"),
                                ("text_encoder", arch.text_encoder, "config.json"),
                                ("scheduler", arch.scheduler, "scheduler_config.json")):
        (base / name).mkdir(parents=True, exist_ok=True)
        (base / name / filename).write_text(json.dumps(dict(cfg), indent=2))
    load_tokenizer(arch.tokenizer_dir).save_pretrained(base / "tokenizer")
    vision = {k: v for k, v in arch.image_encoder.items() if k != "projection_dim"}
    CLIPConfig(text_config=arch.text_encoder, vision_config=vision,
               projection_dim=arch.image_encoder["projection_dim"]).save_pretrained(clip)
