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
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..messages import UserFacingError, Wording, escape

logger = logging.getLogger(__name__)

HUB_DEFAULT_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' trainers save, and load by default
LORAS_ENV = "FASTCOMPOSER_LORAS"  # the folder the app lists LoRAs from
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMPONENTS = ("unet", "text_encoder")  # what a Stable Diffusion 1.5 LoRA may change


class LoraError(UserFacingError, ValueError):
    """A LoRA that cannot be used as given; the message names the file and the fix, worded for where it shows.

    The web page names a LoRA by its file name only (it lists files from the server's folder, whose path must not
    reach visitors); the command line names the `--lora` value; Python code names the spec it was given.
    """


def _lora_ref(spec: str) -> Wording:
    """How each audience names one LoRA: its file name on the page, the flag on the command line."""
    return Wording(escape(f"the LoRA {Path(spec).name or spec}"), escape(f"--lora {spec}"), escape(f"LoRA {spec!r}"))


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply, as parsed from `PATH_OR_HUB_REPO[:SCALE]`."""

    source: str  # a local file (or a folder holding one), or a Hub repo id "owner/name"
    scale: float = 1.0  # strength: 0 leaves the model as it is, 1 as trained; negative values are allowed
    hub: bool = False  # `source` is a Hub repo id, not a local path
    weight_name: str | None = None  # the file inside a Hub repo; None: `pytorch_lora_weights.safetensors`
    adapter_name: str | None = None  # the PEFT adapter it was loaded as (set by `apply_loras`)

    @property
    def name(self) -> str:
        """A short name for metadata: the file name for local files, `owner/name/file` for the Hub."""
        if self.hub:
            return f"{self.source}/{self.weight_name or HUB_DEFAULT_FILE}"
        return Path(self.source).name

    @property
    def label(self) -> str:
        """`name:scale`, the spec syntax, as stored in PNG metadata."""
        return f"{self.name}:{self.scale:g}"


def _is_hub_id(text: str) -> bool:
    """`owner/name` as the Hub spells repo ids (a relative path `dir/x.safetensors` is not one)."""
    parts = text.split("/")
    return len(parts) == 2 and all(_HUB_NAME.match(p) for p in parts) and not text.endswith(_WEIGHT_SUFFIXES)


def _split_scale(spec: str) -> tuple[str, float | None]:
    """`PATH:0.8` -> ("PATH", 0.8); no float after the last colon (e.g. `C:\\x.safetensors`) -> (spec, None)."""
    head, sep, tail = spec.rpartition(":")
    if not sep or not head:
        return spec, None
    try:
        scale = float(tail)
    except ValueError:
        return spec, None
    if not math.isfinite(scale):
        raise LoraError(Wording.same("{lora}: the scale must be a finite number, got {got}"),
                        lora=_lora_ref(spec), got=repr(tail))
    return head, scale


def parse_lora_spec(spec: str | LoraSpec) -> LoraSpec:
    """Parse `PATH_OR_HUB_REPO[:SCALE]` (syntax only: whether the file exists is checked when it is loaded).

    The source is a local `.safetensors` file (or a folder holding one), a Hub repo `owner/name` (its
    `pytorch_lora_weights.safetensors`), or `owner/name/file.safetensors` for another file in that repo. An
    existing local path is always taken whole, even when its name contains a colon; otherwise a float after the
    last colon is the scale (default 1.0). A Windows path such as `C:\\loras\\x.safetensors` has no float
    after its colon, so it stays one path.

    Raises:
        `LoraError` for an empty spec or a scale that is not a finite number.
    """
    if isinstance(spec, LoraSpec):
        return spec
    text = str(spec).strip()
    if not text:
        raise LoraError(Wording(page="choose a LoRA from the list, or none",
                                cli="--lora needs a file or a Hub repo, e.g. --lora style.safetensors:0.8",
                                api="a LoRA spec needs a file or a Hub repo, e.g. 'style.safetensors:0.8'"))
    if Path(text).expanduser().exists():
        return LoraSpec(text)
    source, scale = _split_scale(text)
    scale = 1.0 if scale is None else scale
    if Path(source).expanduser().exists():
        return LoraSpec(source, scale)
    if _is_hub_id(source):
        return LoraSpec(source, scale, hub=True)
    parts = source.split("/")
    if len(parts) >= 3 and _is_hub_id("/".join(parts[:2])) and parts[-1].endswith(".safetensors"):
        return LoraSpec("/".join(parts[:2]), scale, hub=True, weight_name="/".join(parts[2:]))
    return LoraSpec(source, scale)  # a local path; `lora_file` says if it is missing


def list_local_loras(folder: str | os.PathLike | None = None) -> list[Path]:
    """The `.safetensors` files in `folder` ($FASTCOMPOSER_LORAS, else `./loras`), sorted by name; [] if none."""
    root = Path(folder if folder is not None else os.environ.get(LORAS_ENV) or "loras").expanduser()
    if not root.is_dir():
        return []
    files = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".safetensors"]
    return sorted(files, key=lambda p: (p.name.lower(), p.name))


# -- finding the file ----------------------------------------------------------------------------------------


def lora_file(lora: LoraSpec, allow_download: bool = True) -> Path:
    """The local `.safetensors` file of `lora`: the path itself, the LoRA file in a folder, or a Hub download.

    Hub files are cached and checked by huggingface_hub, like the checkpoint.

    Raises:
        `LoraError` saying how to supply the file by hand when it cannot be had.
    """
    if lora.hub:
        filename = lora.weight_name or HUB_DEFAULT_FILE
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(lora.source, filename, local_files_only=not allow_download))
        except Exception as e:  # offline, missing repo or file, auth: all end the same way for the user
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no details'}"
            failed = f"the LoRA {lora.source}/{filename} could not be downloaded from the Hugging Face Hub"
            by_hand = f"Download {filename} from https://huggingface.co/{lora.source} by hand and "
            to_pass = f"PATH/{Path(filename).name}:{lora.scale:g}"
            raise LoraError(Wording(  # the library's reason may quote server paths: not on the page
                page=escape(f"{failed}. {by_hand}put it in the server's LoRA folder"),
                cli=escape(f"{failed} ({reason}). {by_hand}pass its path: --lora {to_pass}"),
                api=escape(f"{failed} ({reason}). {by_hand}pass its path: '{to_pass}'"))) from e
    path = Path(lora.source).expanduser()
    if path.is_dir():
        candidates = [path / HUB_DEFAULT_FILE] if (path / HUB_DEFAULT_FILE).is_file() else list_local_loras(path)
        if len(candidates) != 1:
            raise LoraError(Wording.same("{lora}: expected one .safetensors file in the folder, found {found}"),
                            lora=_lora_ref(lora.source), found=len(candidates))
        path = candidates[0]
    if not path.is_file():
        raise LoraError(Wording(page="{lora} is no longer on the server; reload the page and choose again",
                                cli="{lora}: no such file; check the path", api="{lora}: no such file"),
                        lora=_lora_ref(lora.source))
    if path.suffix.lower() != ".safetensors":
        raise LoraError(Wording.same("{lora}: only .safetensors LoRAs are loaded (pickled files can run code)"),
                        lora=_lora_ref(lora.source))
    return path


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
