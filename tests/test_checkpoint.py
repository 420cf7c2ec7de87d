"""Loading the released checkpoint layout: round trip, strictness, safety, conversion, resolution."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastcomposer.models.architecture import build_modules, tiny_architecture
from fastcomposer.models.checkpoint import CheckpointError, read_state_dict
from fastcomposer.models.testing import released_state_dict, write_model_folders
from fastcomposer.models.weights import WeightsUnavailableError, resolve_weights
from fastcomposer.pipeline.loading import assemble, load_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    """A tiny checkpoint in the released layout plus the folders describing its architecture."""
    d = tmp_path_factory.mktemp("release")
    arch = tiny_architecture()
    modules = build_modules(arch, empty=False, seed=1)
    state = released_state_dict(modules)  # old VAE names, no text_model., position_ids, bf16/fp32 mix
    torch.save(state, d / "pytorch_model.bin")
    write_model_folders(arch, d / "base", d / "clip")
    # The reference: the same modules with the release's bf16 rounding applied, never saved or loaded.
    rounded = build_modules(arch, empty=False, seed=1)
    for name, module in rounded.items():
        with torch.no_grad():
            for key, p in module.state_dict().items():
                if p.is_floating_point():
                    released = state.get(f"{name}.{key}")
                    if released is None and name == "vae":
                        released = next(v for k, v in state.items() if k.startswith("vae.") and
                                        _old_vae(k) == f"vae.{key}")
                    p.copy_(released.float())
    return dict(dir=d, state=state, reference=assemble(rounded, arch), arch=arch)


def _old_vae(key: str) -> str:
    for old, new in ((".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")):
        key = key.replace(old, new)
    return key


def _images(pipe, photo, seed=3):
    return pipe("a woman img at the beach", [photo], num_inference_steps=3, height=64, width=64,
                generator=torch.Generator().manual_seed(seed), output_type="np").images


def test_released_layout_has_the_documented_quirks(tiny_release):
    state = tiny_release["state"]
    assert state["text_encoder.embeddings.position_ids"].dtype == torch.int64
    assert "image_encoder.vision_model.embeddings.position_ids" in state
    assert not any(k.startswith("text_encoder.text_model.") for k in state)
    assert "vae.encoder.mid_block.attentions.0.query.weight" in state
    assert not any(".to_q." in k for k in state if k.startswith("vae."))
    assert state["unet.conv_in.weight"].dtype == torch.float32
    assert state["text_encoder.final_layer_norm.weight"].dtype == torch.bfloat16
    assert state["image_encoder.vision_model.embeddings.patch_embedding.weight"].dtype == torch.bfloat16
    assert state["image_encoder.vision_model.encoder.layers.1.mlp.fc1.weight"].dtype == torch.float32  # trained


def test_round_trip_gives_identical_images(tiny_release, photos):
    d = tiny_release["dir"]
    pipe = load_pipeline(d / "pytorch_model.bin", device="cpu", dtype="fp32", safety_checker=False,
                         base_model=d / "base", image_encoder=d / "clip", cache_converted=False)
    ours, ref = _images(pipe, photos["astronaut"]), _images(tiny_release["reference"], photos["astronaut"])
    np.testing.assert_array_equal(ours, ref)


def test_first_load_caches_a_safetensors_copy_that_later_starts_use(tiny_release, photos, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCOMPOSER_CACHE", str(tmp_path))
    d = tiny_release["dir"]
    kwargs = dict(device="cpu", dtype="fp32", safety_checker=False, base_model=d / "base", image_encoder=d / "clip")
    first = load_pipeline(d / "pytorch_model.bin", **kwargs)
    cached = list((tmp_path / "converted").iterdir())
    assert len(cached) == 1 and (cached[0] / "model_index.json").is_file()
    assert list(cached[0].rglob("*.safetensors")) and not list(cached[0].rglob("*.bin"))
    second = load_pipeline(d / "pytorch_model.bin", **kwargs)
    assert second.weights_label.startswith("local-") and first.weights_label == "pytorch_model.bin"
    np.testing.assert_allclose(_images(first, photos["astronaut"]), _images(second, photos["astronaut"]), atol=1e-5)


def test_convert_command_writes_a_loadable_folder(tiny_release, photos, tmp_path):
    d = tiny_release["dir"]
    out = tmp_path / "converted"
    result = subprocess.run(
        [sys.executable, "-m", "fastcomposer", "convert", str(d / "pytorch_model.bin"), str(out),
         "--base-model", str(d / "base"), "--image-encoder", str(d / "clip")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    pipe = load_pipeline(out, device="cpu", dtype="fp32", safety_checker=False)
    reference = _images(tiny_release["reference"], photos["astronaut"])
    np.testing.assert_allclose(_images(pipe, photos["astronaut"]), reference, atol=1e-5)


def test_released_layout_as_safetensors_loads_too(tiny_release, photos, tmp_path):
    d = tiny_release["dir"]
    save_file(tiny_release["state"], str(tmp_path / "fastcomposer.safetensors"))
    pipe = load_pipeline(tmp_path / "fastcomposer.safetensors", device="cpu", dtype="fp32", safety_checker=False,
                         base_model=d / "base", image_encoder=d / "clip", cache_converted=False)
    reference = _images(tiny_release["reference"], photos["astronaut"])
    np.testing.assert_array_equal(_images(pipe, photos["astronaut"]), reference)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("unet.conv_in.weight"), r"missing keys: unet\.conv_in\.weight"),
        (lambda s: s.pop("postfuse_module.mlp2.fc1.bias"), r"missing keys: postfuse_module\.mlp2\.fc1\.bias"),
        (lambda s: s.__setitem__("unet.extra.weight", torch.zeros(1)), r"unexpected keys: unet\.extra\.weight"),
        (lambda s: s.__setitem__("optimizer.step", torch.zeros(1)), r"unexpected keys: optimizer\.step"),
        (lambda s: s.__setitem__("unet.conv_in.bias", torch.zeros(3)), r"wrong shapes: unet\.conv_in\.bias"),
    ],
)
def test_missing_unexpected_and_misshapen_keys_are_named(tiny_release, tmp_path, edit, message):
    d = tiny_release["dir"]
    state = dict(tiny_release["state"])
    edit(state)
    torch.save(state, tmp_path / "bad.bin")
    with pytest.raises(CheckpointError, match=message) as err:
        load_pipeline(tmp_path / "bad.bin", device="cpu", safety_checker=False, base_model=d / "base",
                      image_encoder=d / "clip", cache_converted=False)
    assert "bad.bin" in str(err.value)


def test_the_real_architecture_rejects_a_tiny_checkpoint_with_a_hint(tiny_release):
    with pytest.raises(CheckpointError, match="--base-model"):
        load_pipeline(tiny_release["dir"] / "pytorch_model.bin", device="cpu", safety_checker=False,
                      cache_converted=False)


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_malicious_pickle_never_executes(tmp_path):
    sentinel = tmp_path / "pwned"
    torch.save({"unet.conv_in.weight": torch.zeros(1), "evil": _Payload(str(sentinel))}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="other than tensors"):
        read_state_dict(tmp_path / "evil.bin")
    assert not sentinel.exists()


def test_garbage_and_truncated_files_are_named(tmp_path, tiny_release):
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.bin"):
        read_state_dict(tmp_path / "junk.bin")
    data = (tiny_release["dir"] / "pytorch_model.bin").read_bytes()
    (tmp_path / "partial.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="partial.bin"):
        read_state_dict(tmp_path / "partial.bin")


def test_a_pinned_sha256_is_enforced(tiny_release, monkeypatch):
    path = tiny_release["dir"] / "pytorch_model.bin"
    with pytest.raises(CheckpointError, match="sha256"):
        read_state_dict(path, expected_sha256="0" * 64)
    import hashlib

    assert read_state_dict(path, expected_sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def test_no_unsafe_torch_load_anywhere():
    pattern = re.compile(r"weights_only\s*=\s*False")
    offenders = [p for p in list((ROOT / "fastcomposer").rglob("*.py")) + [ROOT / "app.py"]
                 if p.exists() and pattern.search(p.read_text())]
    assert offenders == []


def test_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCOMPOSER_CACHE", str(tmp_path))
    monkeypatch.delenv("FASTCOMPOSER_WEIGHTS", raising=False)
    assert resolve_weights("tiny").kind == "tiny"
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        resolve_weights(tmp_path / "nope.bin")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(WeightsUnavailableError, match="not a checkpoint file"):
        resolve_weights(tmp_path / "notes.txt")
    # Nothing local and no network: the error says how to supply the file, in each audience's terms.
    with pytest.raises(WeightsUnavailableError) as err:
        resolve_weights(None, allow_download=False)
    assert "--weights PATH" in err.value.message_for("cli") and "weights=PATH" in str(err.value)
    assert "--weights PATH" in err.value.message_for("page") and str(tmp_path) not in err.value.message_for("page")
    # A converted copy in the cache wins over downloading.
    from fastcomposer.models.weights import checkpoint_revision, converted_dir

    folder = converted_dir(checkpoint_revision())
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    assert resolve_weights(None, allow_download=False).origin == "cache"


def test_hub_failure_names_the_reason_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCOMPOSER_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as err:
        resolve_weights(None, allow_download=True)
    for audience, how in (("cli", "--weights PATH"), ("api", "`weights=PATH`"), ("page", "--weights PATH")):
        message = err.value.message_for(audience)
        assert "could not be downloaded" in message and how in message and "huggingface.co" in message, audience
    assert str(err.value) == err.value.message_for("api")
