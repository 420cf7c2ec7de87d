"""Which LoRA file: the `PATH_OR_HUB_REPO[:SCALE]` spec, the local folder the app lists, Hub downloads.

The spec syntax handles Windows drive letters and colons in file names; a Hub LoRA is downloaded once (through
huggingface_hub's cache) and a missing one says how to supply the file by hand.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..downloads import hub_unreachable
from ..messages import UserFacingError, Wording, escape

logger = logging.getLogger(__name__)

HUB_DEFAULT_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' trainers save, and load by default


LORAS_ENV = "FASTCOMPOSER_LORAS"  # the folder the app lists LoRAs from


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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

            offline = not allow_download or hub_unreachable() is not None
            return Path(hf_hub_download(lora.source, filename, local_files_only=offline))
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
