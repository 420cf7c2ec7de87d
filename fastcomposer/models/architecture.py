"""Model architectures: the bundled SD1.5 + CLIP ViT-L/14 configs, user-supplied ones, and a tiny one.

The released checkpoint holds only weights, so the architecture comes from here. `build_modules`
builds every network from an `Architecture`, either on the meta device (no memory, no random init:
the checkpoint's tensors are assigned straight in) or with seeded random weights (the tiny model).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from .postfuse import PostfuseModule

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # data shared by the layers, beside the package root
COMPONENTS = ("unet", "vae", "text_encoder", "image_encoder", "postfuse_module")  # what the checkpoint holds


@dataclass(frozen=True)
class Architecture:
    """Everything needed to build the networks and the tokenizer, but no weights."""

    unet: dict[str, Any]  # UNet2DConditionModel config
    vae: dict[str, Any]  # AutoencoderKL config
    text_encoder: dict[str, Any]  # CLIPTextConfig fields
    image_encoder: dict[str, Any]  # CLIPVisionConfig fields, plus projection_dim of the visual projection
    scheduler: dict[str, Any]  # the base scheduler config (SD1.5's PNDM); other samplers derive from it
    feature_extractor: dict[str, Any]  # CLIPImageProcessor config used by the safety checker
    tokenizer_dir: Path  # folder with vocab.json + merges.txt
    name: str = "sd15"  # "sd15" for the released model, "tiny" for tests, or the folder given

    @property
    def embed_dim(self) -> int:
        """Width of the text embeddings, and so of the post-fuse MLP."""
        return self.text_encoder["hidden_size"]

    def validate(self) -> None:
        """Refuse combinations that would build but could never load a consistent checkpoint."""
        if self.image_encoder.get("projection_dim") != self.embed_dim:
            raise ValueError(
                f"the image encoder projects to {self.image_encoder.get('projection_dim')} dimensions but the "
                f"text encoder is {self.embed_dim} wide; the post-fuse MLP needs them equal"
            )
        if self.unet.get("cross_attention_dim") != self.embed_dim:
            raise ValueError(
                f"the UNet cross-attends to {self.unet.get('cross_attention_dim')}-d embeddings but the text "
                f"encoder is {self.embed_dim} wide"
            )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"missing config file {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def bundled_architecture() -> Architecture:
    """SD1.5 UNet/VAE/scheduler with the CLIP ViT-L/14 towers: the released model's architecture."""
    return Architecture(
        unet=_read_json(CONFIG_DIR / "unet.json"),
        vae=_read_json(CONFIG_DIR / "vae.json"),
        text_encoder=_read_json(CONFIG_DIR / "text_encoder.json"),
        image_encoder=_read_json(CONFIG_DIR / "image_encoder.json"),
        scheduler=_read_json(CONFIG_DIR / "scheduler.json"),
        feature_extractor=_read_json(CONFIG_DIR / "feature_extractor.json"),
        tokenizer_dir=CONFIG_DIR / "tokenizer",
    )


def with_overrides(
    arch: Architecture, base_model: str | Path | None = None, image_encoder: str | Path | None = None
) -> Architecture:
    """Replace parts of `arch` with configs from folders laid out like the Hub repos.

    Args:
        base_model: a diffusers Stable Diffusion folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
            `scheduler/`). Its configs, tokenizer and scheduler are used; any weights in it are not.
        image_encoder: a CLIP folder laid out like `openai/clip-vit-large-patch14`, whose `config.json`
            is a full `CLIPConfig`; its `vision_config` and `projection_dim` are used.
    """
    if base_model is not None:
        base = Path(base_model)
        if not base.is_dir():
            raise FileNotFoundError(f"--base-model {base} is not a folder")
        updates: dict[str, Any] = dict(
            unet=_read_json(base / "unet" / "config.json"),
            vae=_read_json(base / "vae" / "config.json"),
            text_encoder=_read_json(base / "text_encoder" / "config.json"),
            scheduler=_read_json(base / "scheduler" / "scheduler_config.json"),
            name=str(base),
        )
        if (base / "tokenizer" / "vocab.json").exists():
            updates["tokenizer_dir"] = base / "tokenizer"
        if (base / "feature_extractor" / "preprocessor_config.json").exists():
            updates["feature_extractor"] = _read_json(base / "feature_extractor" / "preprocessor_config.json")
        arch = replace(arch, **updates)
    if image_encoder is not None:
        clip = _read_json(Path(image_encoder) / "config.json")
        if "vision_config" in clip:  # a full CLIPConfig
            vision = dict(clip["vision_config"], projection_dim=clip.get("projection_dim", 512))
        else:  # already a CLIPVisionConfig
            vision = clip
        arch = replace(arch, image_encoder=vision)
    arch.validate()
    return arch


def tiny_architecture() -> Architecture:
    """A few-megabyte model with the released model's structure, for tests, benchmarks and previews.

    Attention sits on the lower-resolution blocks so a 512 px preview stays cheap on a CPU; the text
    tower keeps the real 49,408-token vocabulary so the real tokenizer works unchanged.
    """
    width = 32
    return Architecture(
        unet=dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=32,
            cross_attention_dim=width,
            attention_head_dim=8,
            flip_sin_to_cos=True,
            freq_shift=0,
        ),
        vae=dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=512,
            scaling_factor=0.18215,
        ),
        text_encoder=dict(
            vocab_size=49408,
            hidden_size=width,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            projection_dim=width,
        ),
        image_encoder=dict(
            hidden_size=width,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,
            patch_size=14,
            num_channels=3,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            projection_dim=width,
        ),
        scheduler=_read_json(CONFIG_DIR / "scheduler.json"),
        feature_extractor=_read_json(CONFIG_DIR / "feature_extractor.json"),
        tokenizer_dir=CONFIG_DIR / "tokenizer",
        name="tiny",
    )


def build_modules(arch: Architecture, empty: bool = True, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Build the five networks of `arch`.

    Args:
        empty: build on the meta device, allocating nothing (load weights with `assign=True` next).
            Otherwise build with random weights, each component after `torch.manual_seed(seed)` so the
            tiny model is the same everywhere.

    Returns:
        `dict` mapping each name in `COMPONENTS` to its module, in eval mode.
    """
    arch.validate()
    builders = {
        "unet": lambda: UNet2DConditionModel.from_config(arch.unet),
        "vae": lambda: AutoencoderKL.from_config(arch.vae),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig.from_dict(arch.text_encoder)),
        "image_encoder": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(arch.image_encoder)),
        "postfuse_module": lambda: PostfuseModule(embed_dim=arch.embed_dim),
    }
    modules = {}
    for name, build in builders.items():
        if empty:
            with init_empty_weights():
                module = build()
        else:
            torch.manual_seed(seed)
            module = build()
        modules[name] = module.eval().requires_grad_(False)
    return modules
