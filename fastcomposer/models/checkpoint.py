"""Reading the released `pytorch_model.bin` safely and mapping it onto current diffusers/transformers.

The released file is the `state_dict()` of the original training wrapper (spec section 6):

    text_encoder.{embeddings,encoder,final_layer_norm}.*        CLIP text tower, no `text_model.` level
    image_encoder.vision_model.*, image_encoder.visual_projection.weight
    vae.*           diffusers 0.16 names: mid-block attention is query/key/value/proj_attn
    unet.*          UNet2DConditionModel
    postfuse_module.{mlp1,mlp2,layer_norm}.*
    plus two int64 `position_ids` buffers; tensors are a bf16/fp32 mix.

Every key must land somewhere and every expected key must be present with the right shape; anything
else is a `CheckpointError` that names the keys. The pickle is only ever read with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..messages import UserFacingError, Wording, escape

logger = logging.getLogger(__name__)

# Old diffusers (<= 0.16) names of the VAE mid-block attention, and their current names.
_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_VAE_ATTENTION_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
# Buffers the released file carries but current transformers re-creates (non-persistent).
_DROPPED_KEYS = {"text_encoder.embeddings.position_ids", "image_encoder.vision_model.embeddings.position_ids"}


class CheckpointError(UserFacingError, ValueError):
    """The file is not a FastComposer checkpoint we can load; the message names the file and the keys. The page's
    wording (the app's preview banner) names the file without its folder: paths must not reach web users."""

    def __init__(self, message: str, path: Path | None = None):
        page = message.replace(str(path), path.name) if path is not None else message
        super().__init__(Wording(page=escape(page), cli=escape(message), api=escape(message)))


def sha256_of(path: str | Path, chunk_size: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks so a 4.5 GB file never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str | Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a flat tensor dict from `.safetensors` or a torch pickle, never executing code from the file.

    Args:
        path: the checkpoint file.
        expected_sha256: when given, the file's sha256 must match before anything is read from it.

    Raises:
        `CheckpointError`: the file is missing, damaged, not a plain tensor dict, or its hash differs.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file", path)
    if expected_sha256:
        actual = sha256_of(path)
        if actual.lower() != expected_sha256.lower():
            raise CheckpointError(
                f"checkpoint {path} has sha256 {actual}, expected {expected_sha256}: the file is damaged, "
                "partial or a different file; download it again", path
            )
    try:
        if path.suffix == ".safetensors":
            state_dict = load_file(str(path))
        else:
            state_dict = _torch_load(path)
    except pickle.UnpicklingError as e:
        # weights_only refused an object that is not a tensor or container: maybe malicious, never run it.
        raise CheckpointError(
            f"checkpoint {path} contains Python objects other than tensors, so it was not loaded "
            f"(safe loading refused: {str(e).splitlines()[0][:200]})", path
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} could not be read ({type(e).__name__}: {e}); is it complete?", path
        ) from None
    if isinstance(state_dict, dict) and "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]  # a training-checkpoint wrapper
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"checkpoint {path} is not a flat dictionary of tensors", path)
    return state_dict


def _torch_load(path: Path) -> object:
    """`torch.load` with `weights_only=True`; memory-mapped when the file is in the zip format."""
    try:
        # mmap: tensors are paged in from the file as they are used instead of read up front.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format


def _component_key(key: str) -> tuple[str, str] | None:
    """Map one released key to (component, key inside that component), or None if it is unknown."""
    component, _, rest = key.partition(".")
    if component == "text_encoder":
        return component, rest.removeprefix("text_model.")  # accept either CLIP text layout
    if component == "image_encoder":
        return component, rest
    if component == "vae":
        match = _VAE_ATTENTION_KEY.match(rest)
        if match:
            prefix, old, kind = match.groups()
            rest = f"{prefix}.{_OLD_VAE_ATTENTION[old]}.{kind}"
        return component, rest
    if component in ("unet", "postfuse_module"):
        return component, rest
    return None


def split_released_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Split a released-layout state dict into per-component dicts with current key names.

    Returns:
        (components, unknown): `components[name][key]` tensors, and the keys that map nowhere.
    """
    components: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        if key in _DROPPED_KEYS:
            continue
        mapped = _component_key(key)
        if mapped is None:
            unknown.append(key)
            continue
        components.setdefault(mapped[0], {})[mapped[1]] = tensor
    return components, unknown


def _describe(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def load_into_modules(
    modules: dict[str, torch.nn.Module],
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype | None,
    source: str = "the checkpoint",
) -> None:
    """Assign the checkpoint's tensors to (meta-device) modules, strictly.

    Floating tensors are cast to `dtype` (None keeps the file's mixed bf16/fp32); the modules then
    own the loaded tensors, so no random
    initialisation ever happens and the weights are held once.

    Raises:
        `CheckpointError` naming missing, unexpected and wrongly shaped keys.
    """
    components, unknown = split_released_state_dict(state_dict)
    problems = []
    if unknown:
        problems.append(f"unexpected keys: {_describe(unknown)}")
    for name, module in modules.items():
        expected = module.state_dict()
        given = components.get(name, {})
        missing = [f"{name}.{k}" for k in expected if k not in given]
        extra = [f"{name}.{k}" for k in given if k not in expected]
        shapes = [
            f"{name}.{k} {tuple(given[k].shape)} != {tuple(v.shape)}"
            for k, v in expected.items()
            if k in given and given[k].shape != v.shape
        ]
        if missing:
            problems.append(f"missing keys: {_describe(missing)}")
        if extra:
            problems.append(f"unexpected keys: {_describe(extra)}")
        if shapes:
            problems.append(f"wrong shapes: {_describe(shapes, 2)}")
    for name in components.keys() - modules.keys():
        problems.append(f"unexpected component {name!r} ({len(components[name])} tensors)")
    if problems:
        hint = (
            " Tensor shapes differ, so it was made for another architecture: pass that model's configs with "
            "--base-model DIR and --image-encoder DIR." if any(p.startswith("wrong shapes") for p in problems)
            else " Is it the complete released mit-han-lab/fastcomposer pytorch_model.bin?"
        )
        summary = "; ".join(problems[:6])
        raise CheckpointError(f"{source} does not match the FastComposer architecture: {summary}.{hint}")
    for name, module in modules.items():
        tensors = {k: (v.to(dtype) if dtype and v.is_floating_point() else v) for k, v in components[name].items()}
        module.load_state_dict(tensors, strict=True, assign=True)
    logger.info("loaded %d tensors from %s", sum(len(c) for c in components.values()), source)
