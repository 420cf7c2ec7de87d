"""LoRAs: parse `PATH_OR_HUB_REPO[:SCALE]`, check a file fits the model, load it once, switch sets per request.

Loading itself is diffusers' (`StableDiffusionLoraLoaderMixin.load_lora_weights`, on the PEFT backend), which
reads both the diffusers/PEFT key layout (`unet.…to_q.lora_A.weight`) and kohya/sd-scripts files
(`lora_unet_…_to_q.lora_down.weight` with `.alpha`). What this module adds:

- a spec syntax for the command line and the app, with Windows drive letters and colons in file names handled;
- a strict check before loading. diffusers only logs a warning for LoRA keys that match no layer (and loads
  the rest), silently drops keys of components this pipeline lacks (an SDXL LoRA's `text_encoder_2`), and
  fails half-way on a shape mismatch with a bare `RuntimeError` (or an `IndexError` for an unknown text-encoder
  layer), having already loaded the UNet part. Here every key must land on a layer of the right shape, or
  nothing is loaded and a `LoraError` names the file and the keys;
- one named adapter per file, loaded once, so a server can switch LoRA sets between requests with
  `set_adapters` / `disable_lora` instead of reloading.

Example:
    >>> pipe = load_pipeline(loras=["style.safetensors:0.8"])    # or apply_loras(pipe, ["style.safetensors"])
    >>> apply_loras(pipe, [])                                      # back to the base model, adapters kept
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..messages import Wording, escape
from .lora_files import (  # noqa: F401  (re-exported: `fastcomposer.lora.parse_lora_spec` and co.)
    HUB_DEFAULT_FILE,
    LORAS_ENV,
    LoraError,
    LoraSpec,
    _lora_ref,
    list_local_loras,
    lora_file,
    parse_lora_spec,
)

logger = logging.getLogger(__name__)

_COMPONENTS = ("unet", "text_encoder")  # what a Stable Diffusion 1.5 LoRA may change


# -- finding the file ----------------------------------------------------------------------------------------


# -- checking it fits ----------------------------------------------------------------------------------------


def _peft_keys(component: str, state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> dict:
    """The keys of one component as diffusers hands them to PEFT (the same conversions, in the same order)."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if component == "unet":
        first = next(iter(state_dict))
        return state_dict if "lora_A" in first else convert_unet_state_dict_to_peft(state_dict)
    converted = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state_dict))
    if not hasattr(model, "text_model"):  # transformers 5 flattened CLIPTextModel; old files keep `text_model.`
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    return converted


def _shape_problem(module: torch.nn.Module, key: str, value: torch.Tensor, rank: int | None) -> str | None:
    """Why `value` (a LoRA factor) cannot sit on `module`, or None when it fits."""
    module = getattr(module, "base_layer", module)  # a layer that holds other LoRAs already is PEFT-wrapped
    if isinstance(module, torch.nn.Linear):
        fan_in, fan_out, ndim = module.in_features, module.out_features, 2
    elif isinstance(module, torch.nn.Conv2d):
        fan_in, fan_out, ndim = module.in_channels, module.out_channels, 4
    else:
        return f"targets a {type(module).__name__}, not a linear or convolution layer"
    shape = tuple(value.shape)
    if key.endswith(".lora_B.bias"):  # PEFT's `lora_bias=True`
        ok, expected = shape == (fan_out,), f"({fan_out},)"
    elif ".lora_A." in key:
        ok = len(shape) == ndim and shape[1] == fan_in
        expected = f"(rank, {fan_in}, ...)"
    elif ".lora_B." in key:
        ok = len(shape) == ndim and shape[0] == fan_out and (rank is None or shape[1] == rank)
        expected = f"({fan_out}, {rank if rank is not None else 'rank'}, ...)"
    else:
        return "is not a LoRA factor (lora_A / lora_B)"
    return None if ok else f"has shape {shape}, the layer needs {expected}"


def _unusable(path: Path, what: str, error: Exception) -> LoraError:
    """A file that failed to read or load. The library's reason goes to the command line and Python only: it
    may quote server paths, which the page never shows."""
    reason = str(error).strip().splitlines()[-1][:300] if str(error).strip() else type(error).__name__
    told = f"the LoRA {path.name} {what}"
    return LoraError(Wording(page=escape(f"{told}: the file is damaged or is not a LoRA"),
                             cli=escape(f"{told}: {reason}"), api=escape(f"{told}: {reason}")))


def check_lora(pipe, path: Path) -> None:
    """Refuse a LoRA file unless every key lands on a layer of `pipe` with a matching shape.

    The keys are converted exactly as diffusers will convert them (kohya -> diffusers -> PEFT), then looked up
    in the UNet and the text encoder.

    Raises:
        `LoraError` naming the file and up to five offending keys.
    """
    try:
        state_dict, _alphas = type(pipe).lora_state_dict(str(path.parent), weight_name=path.name, use_safetensors=True)
    except Exception as e:  # an unreadable file, or kohya keys diffusers cannot rename
        raise _unusable(path, "could not be read", e) from e
    if not state_dict:
        raise LoraError(f"the LoRA {path.name} holds no weights")

    problems: list[str] = []
    by_component: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        component, _, rest = key.partition(".")
        if component in _COMPONENTS and rest:
            by_component.setdefault(component, {})[rest] = value
        else:
            problems.append(f"{key} (no such part in a Stable Diffusion 1.5 model)")
    for component, part in by_component.items():
        model = getattr(pipe, component)
        modules = dict(model.named_modules())
        ranks: dict[str, int] = {}
        keys = _peft_keys(component, part, model)
        for key in sorted(keys, key=lambda k: ".lora_B." in k):  # A first: it fixes each layer's rank
            layer, sep, _ = key.partition(".lora_")
            module = modules.get(layer) if sep else None
            if module is None:
                problems.append(f"{component}.{key} (no such layer)")
                continue
            problem = _shape_problem(module, key, keys[key], ranks.get(layer))
            if problem:
                problems.append(f"{component}.{key} {problem}")
            elif ".lora_A." in key:
                ranks[layer] = keys[key].shape[0]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise LoraError(
            f"the LoRA {path.name} does not fit this model ({len(problems)} of {len(state_dict)} keys): {shown}. "
            "Is it a LoRA for Stable Diffusion 1.5 (not SDXL, SD2 or Flux)?"
        )


# -- loading and switching -----------------------------------------------------------------------------------


# Their warnings on a LoRA load are noise once `check_lora` has passed: "no LoRA keys for the text encoder"
# for every UNet-only LoRA (LCM-LoRA, Hyper-SD), and transformers' load report, which lists the text encoder's
# base weights as MISSING because an adapter state dict holds none of them. Errors still get through.
_LOAD_LOGGERS = ("diffusers.loaders.peft", "diffusers.loaders.lora_base", "transformers.integrations.peft")


@contextlib.contextmanager
def _quiet_load():
    """Silence the load-time noise above, transformers' progress bar and PEFT's "several adapters" warning."""
    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(name) for name in _LOAD_LOGGERS]
    levels = [lg.level for lg in loggers]
    bar = hf_logging.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bar:
            hf_logging.enable_progress_bar()


def _adapters(pipe) -> dict[str, tuple[str, tuple[int, int]]]:
    """The files loaded into `pipe`: resolved path -> (adapter name, (size, mtime) when loaded)."""
    if not hasattr(pipe, "_lora_adapters"):
        pipe._lora_adapters = {}
    return pipe._lora_adapters


def _adapter_name(pipe, path: Path) -> str:
    """A new adapter name from the file name (PEFT keeps adapters in module dicts: no dots)."""
    base = re.sub(r"[^A-Za-z0-9_]", "_", path.stem)[:40] or "lora"
    taken = {name for names in pipe.get_list_adapters().values() for name in names}
    taken |= {name for name, _ in _adapters(pipe).values()}
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def load_lora(pipe, lora: LoraSpec, allow_download: bool = True) -> str:
    """Load `lora`'s file into `pipe` as a named adapter, once per file (again only if the file changed).

    Which adapters run, and how strongly, is then set by `apply_loras` (diffusers activates each new one).

    Returns:
        The adapter name.

    Raises:
        `LoraError`; nothing of a file that fails is left loaded.
    """
    path = lora_file(lora, allow_download).resolve()
    stat = path.stat()
    stamp = (stat.st_size, stat.st_mtime_ns)
    loaded = _adapters(pipe)
    if str(path) in loaded:
        name, old_stamp = loaded.pop(str(path))
        present = any(name in names for names in pipe.get_list_adapters().values())
        if old_stamp == stamp and present:
            loaded[str(path)] = (name, stamp)
            return name
        if present:  # the file was replaced: drop the stale copy
            pipe.delete_adapters(name)

    check_lora(pipe, path)
    name = _adapter_name(pipe, path)
    try:
        with _quiet_load():
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name, use_safetensors=True)
    except Exception as e:
        if any(name in names for names in pipe.get_list_adapters().values()):
            pipe.delete_adapters(name)
        raise _unusable(path, "could not be loaded", e) from e
    loaded[str(path)] = (name, stamp)
    logger.info("loaded LoRA %s as adapter %r", path.name, name)
    return name


def _activate(pipe, loras: Sequence[LoraSpec]) -> None:
    """Run exactly `loras` at their scales (none: every LoRA layer off, the base model's outputs exactly)."""
    if not any(pipe.get_list_adapters().values()):
        return
    if not loras:
        pipe.disable_lora()
        return
    pipe.enable_lora()  # undo an earlier disable_lora: set_adapters alone does not re-enable the layers
    pipe.set_adapters([lora.adapter_name for lora in loras], adapter_weights=[lora.scale for lora in loras])


def apply_loras(pipe, loras: Sequence[str | LoraSpec], allow_download: bool = True) -> list[LoraSpec]:
    """Make exactly `loras` active on `pipe`, each at its scale; an empty list turns every LoRA off.

    Each file is loaded once as a named adapter and kept, so calling this per request only switches adapters
    (`set_adapters` / `disable_lora`): cheap, and safe between pipeline runs (not during one). On an error the
    previous set stays active. The set is recorded in `pipe.active_loras` (for PNG metadata).

    Args:
        pipe: a [`FastComposerPipeline`] (any diffusers SD1.5 pipeline works).
        loras: specs `PATH_OR_HUB_REPO[:SCALE]` or parsed [`LoraSpec`]s.
        allow_download: False never touches the network (Hub LoRAs must then be in the Hugging Face cache).

    Returns:
        The active [`LoraSpec`]s, with their adapter names.

    Raises:
        `LoraError` with a message that names the file and the fix.
    """
    specs = [parse_lora_spec(spec) for spec in loras]
    previous = list(getattr(pipe, "active_loras", []))
    try:
        active = [replace(spec, adapter_name=load_lora(pipe, spec, allow_download)) for spec in specs]
        names = [lora.adapter_name for lora in active]
        twice = sorted({lora.name for lora in active if names.count(lora.adapter_name) > 1})
        if twice:
            raise LoraError(Wording(page="{names}: the same LoRA was chosen twice; choose each once",
                                    cli="--lora {names} was given twice; give each LoRA once, with one scale",
                                    api="{names} was given twice in the LoRA list; give each once, with one scale"),
                            names=", ".join(twice))
    except LoraError:
        _activate(pipe, previous)  # loading switched adapters on: put the previous set back
        raise
    _activate(pipe, active)
    pipe.active_loras = active
    return active


def remove_loras(pipe) -> None:
    """Unload every LoRA from `pipe`, freeing their memory; the networks are the base model's again."""
    if _adapters(pipe):
        pipe.unload_lora_weights()
    _adapters(pipe).clear()
    pipe.active_loras = []
