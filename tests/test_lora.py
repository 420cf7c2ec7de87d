"""LoRAs on the tiny model: spec parsing, both key formats against the formula, images, errors, switching.

The LoRA files are written here, in the diffusers/PEFT layout and in kohya/sd-scripts' layout, from matrices
the tests keep, so every effect is checked against `W x + scale * (alpha / rank) * B A x` computed by hand.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import pytest
import torch
from safetensors.torch import save_file

from fastcomposer.models.lora import (
    LoraError,
    LoraSpec,
    apply_loras,
    list_local_loras,
    parse_lora_spec,
    remove_loras,
)

ROOT = Path(__file__).resolve().parents[1]
ASTRONAUT = str(ROOT / "assets" / "astronaut.png")
RANK = 4
# Layers of the tiny model (architecture.tiny_architecture) and their (in, out) widths.
UNET_LAYERS = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64),
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (32, 64),
    "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v": (32, 64),
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2": (256, 64),
}
TEXT_LAYERS = {f"encoder.layers.0.self_attn.{p}": (32, 32) for p in ("q_proj", "k_proj", "v_proj", "out_proj")}


def lora_factors(seed: int = 0, std: float = 0.3) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """(component, layer) -> (A: rank x in, B: out x rank), random but seeded."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for component, layers in (("unet", UNET_LAYERS), ("text_encoder", TEXT_LAYERS)):
        for layer, (fan_in, fan_out) in layers.items():
            out[component, layer] = (torch.randn(RANK, fan_in, generator=g) * std,
                                     torch.randn(fan_out, RANK, generator=g) * std)
    return out


def write_peft(path: Path, factors) -> Path:
    """The diffusers/PEFT layout: `unet.<layer>.lora_A.weight`, `text_encoder.<layer>.lora_B.weight`."""
    tensors = {}
    for (component, layer), (a, b) in factors.items():
        tensors[f"{component}.{layer}.lora_A.weight"] = a.contiguous()
        tensors[f"{component}.{layer}.lora_B.weight"] = b.contiguous()
    save_file(tensors, path)
    return path


def write_kohya(path: Path, factors, alpha: float) -> Path:
    """kohya/sd-scripts' layout: `lora_unet_<layer_with_underscores>.lora_down.weight`, `.lora_up`, `.alpha`."""
    tensors = {}
    for (component, layer), (a, b) in factors.items():
        prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
        name = prefix + layer.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = a.contiguous()
        tensors[f"{name}.lora_up.weight"] = b.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, path)
    return path


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    """A tiny model of its own (the shared `tiny_pipe` stays LoRA-free and serves as the base model)."""
    from fastcomposer.pipeline.loading import load_pipeline

    return load_pipeline("tiny", device="cpu", dtype="fp32", safety_checker=False)


@pytest.fixture(autouse=True)
def _clean(request):
    yield
    if "pipe" in request.fixturenames:
        remove_loras(request.getfixturevalue("pipe"))


def image(p, face) -> np.ndarray:
    return p("a woman img in a garden", [face], num_inference_steps=3, guidance_scale=5.0, negative_prompt="blurry",
             generator=gen(11), output_type="np", height=64, width=64).images


# -- parsing ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("style.safetensors", LoraSpec("style.safetensors")),
        ("style.safetensors:0.8", LoraSpec("style.safetensors", 0.8)),
        ("loras/style.safetensors:-0.5", LoraSpec("loras/style.safetensors", -0.5)),
        (r"C:\loras\x.safetensors", LoraSpec(r"C:\loras\x.safetensors")),
        (r"C:\loras\x.safetensors:0.6", LoraSpec(r"C:\loras\x.safetensors", 0.6)),
        ("latent-consistency/lcm-lora-sdv1-5", LoraSpec("latent-consistency/lcm-lora-sdv1-5", hub=True)),
        ("h94/lora:1.5", LoraSpec("h94/lora", 1.5, hub=True)),
        ("ByteDance/Hyper-SD/Hyper-SD15-8steps-CFG-lora.safetensors:0.9",
         LoraSpec("ByteDance/Hyper-SD", 0.9, hub=True, weight_name="Hyper-SD15-8steps-CFG-lora.safetensors")),
    ],
)
def test_parse_lora_spec(spec, expected):
    assert parse_lora_spec(spec) == expected


def test_an_existing_file_with_a_colon_is_taken_whole(tmp_path):
    weird = tmp_path / "v2:0.5"
    weird.write_bytes(b"")
    assert parse_lora_spec(str(weird)) == LoraSpec(str(weird))
    assert parse_lora_spec(f"{weird}:0.25") == LoraSpec(str(weird), 0.25)


@pytest.mark.parametrize(("spec", "message"), [("", "needs a file"), ("x.safetensors:nan", "finite")])
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(LoraError, match=message):
        parse_lora_spec(spec)


def test_labels_for_metadata():
    assert LoraSpec("/a/b/style.safetensors", 0.8).label == "style.safetensors:0.8"
    assert LoraSpec("o/n", 1.0, hub=True).label == "o/n/pytorch_lora_weights.safetensors:1"


def test_list_local_loras(tmp_path, monkeypatch):
    for name in ("b.safetensors", "A.safetensors", "notes.txt", "old.ckpt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "dir.safetensors").mkdir()
    assert [p.name for p in list_local_loras(tmp_path)] == ["A.safetensors", "b.safetensors"]
    monkeypatch.setenv("FASTCOMPOSER_LORAS", str(tmp_path))
    assert [p.name for p in list_local_loras()] == ["A.safetensors", "b.safetensors"]
    monkeypatch.delenv("FASTCOMPOSER_LORAS")
    monkeypatch.chdir(tmp_path)  # no ./loras here
    assert list_local_loras() == []


# -- the effect, against the formula ---------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "alpha"), [("peft", RANK), ("kohya", 2.0), ("kohya", RANK)])
def test_patched_layers_compute_the_lora_formula(pipe, tmp_path, fmt, alpha):
    factors = lora_factors(1)
    if fmt == "peft":  # this layout stores no alpha: the convention is alpha == rank
        path = write_peft(tmp_path / "style.safetensors", factors)
    else:
        path = write_kohya(tmp_path / "style.safetensors", factors, alpha)
    layers = {("unet", name): pipe.unet.get_submodule(name) for name in UNET_LAYERS}
    layers |= {("text_encoder", name): pipe.text_encoder.get_submodule(name) for name in TEXT_LAYERS}
    base = {key: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
            for key, m in layers.items()}

    scale = 0.7
    active = apply_loras(pipe, [f"{path}:{scale}"])
    assert [lora.label for lora in pipe.active_loras] == ["style.safetensors:0.7"] and active == pipe.active_loras
    x = torch.randn(3, 256, generator=gen(2))
    with torch.no_grad():
        for (component, name), (w, b) in base.items():
            a, bb = factors[component, name]
            xi = x[:, : w.shape[1]]
            expected = xi @ w.T + (0 if b is None else b) + scale * (alpha / RANK) * (xi @ a.T) @ bb.T
            got = getattr(pipe, component).get_submodule(name)(xi)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_scale_zero_is_the_base_model_and_a_lora_changes_the_image(pipe, tiny_pipe, photos, tmp_path):
    face = photos["astronaut"]
    base = image(tiny_pipe, face)
    assert np.array_equal(image(pipe, face), base)  # the same seeded tiny model
    path = write_peft(tmp_path / "style.safetensors", lora_factors(3))
    apply_loras(pipe, [f"{path}:0"])
    assert np.array_equal(image(pipe, face), base)
    apply_loras(pipe, [f"{path}:1"])
    assert np.abs(image(pipe, face) - base).max() > 0.02


def test_kohya_and_peft_files_with_the_same_matrices_give_the_same_image(pipe, photos, tmp_path):
    factors = lora_factors(4)
    peft = write_peft(tmp_path / "peft.safetensors", factors)
    kohya = write_kohya(tmp_path / "kohya.safetensors", factors, alpha=RANK)
    apply_loras(pipe, [peft])
    a = image(pipe, photos["astronaut"])
    apply_loras(pipe, [kohya])
    b = image(pipe, photos["astronaut"])
    assert np.abs(a - b).max() < 1e-5


# -- switching per request ------------------------------------------------------------------------------------


def test_switching_sets_loads_each_file_once_and_off_is_exact(pipe, tiny_pipe, photos, tmp_path, monkeypatch):
    face = photos["astronaut"]
    base = image(tiny_pipe, face)
    one = write_peft(tmp_path / "one.safetensors", lora_factors(5))
    two = write_kohya(tmp_path / "two.safetensors", lora_factors(6), alpha=2.0)
    loads = []
    load = pipe.load_lora_weights
    monkeypatch.setattr(pipe, "load_lora_weights", lambda *a, **k: loads.append(k["adapter_name"]) or load(*a, **k))

    apply_loras(pipe, [one])
    only_one = image(pipe, face)
    apply_loras(pipe, [one, f"{two}:0.5"])
    both = image(pipe, face)
    apply_loras(pipe, [])
    off = image(pipe, face)
    assert pipe.active_loras == []
    apply_loras(pipe, [one])
    again = image(pipe, face)

    assert loads == ["one", "two"]  # each file once, as its own adapter
    assert np.array_equal(off, base)
    assert np.array_equal(again, only_one)
    assert np.abs(both - only_one).max() > 1e-3


def test_a_replaced_file_is_loaded_again(pipe, tmp_path):
    import os

    path = write_peft(tmp_path / "style.safetensors", lora_factors(13))
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    x = torch.randn(2, 64, generator=gen(0))
    apply_loras(pipe, [path])
    with torch.no_grad():
        first = pipe.unet.get_submodule(layer)(x)
    factors = lora_factors(14)
    write_peft(path, factors)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    apply_loras(pipe, [path])
    with torch.no_grad():
        second = pipe.unet.get_submodule(layer)(x)
        base = x @ pipe.unet.get_submodule(layer).base_layer.weight.T
    a, b = factors["unet", layer]
    torch.testing.assert_close(second, base + (x @ a.T) @ b.T, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, second)
    assert pipe.get_list_adapters()["unet"] == ["style"]  # the stale copy is gone


def test_the_same_lora_twice_is_refused_and_the_previous_set_stays(pipe, photos, tmp_path):
    path = write_peft(tmp_path / "one.safetensors", lora_factors(7))
    apply_loras(pipe, [f"{path}:0.5"])
    before = image(pipe, photos["astronaut"])
    with pytest.raises(LoraError, match="given twice"):
        apply_loras(pipe, [path, f"{path}:0.2"])
    assert np.array_equal(image(pipe, photos["astronaut"]), before)


# -- files that do not fit --------------------------------------------------------------------------------------


def _peft_file(path: Path, extra: dict[str, torch.Tensor]) -> Path:
    """A good PEFT-layout LoRA plus `extra` keys."""
    from safetensors.torch import load_file

    tensors = load_file(write_peft(path, lora_factors(8)))
    save_file({**tensors, **extra}, path)
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        # A layer the model does not have: diffusers alone only logs a warning and loads the rest.
        ({"unet.down_blocks.3.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(RANK, 64),
          "unet.down_blocks.3.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, RANK)},
         r"down_blocks\.3\.attentions.*no such layer"),
        # An SDXL-sized cross-attention (2048-d text): diffusers fails half-way with a bare RuntimeError.
        ({"unet.up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(RANK, 2048),
          "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.zeros(64, RANK)},
         r"attn2\.to_k\.lora_A\.weight has shape \(4, 2048\), the layer needs \(rank, 32"),
        # SDXL's second text encoder: diffusers drops these keys without a word.
        ({"text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(RANK, 32),
          "text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, RANK)},
         r"text_encoder_2\.encoder.*no such part"),
    ],
    ids=["unknown-layer", "shape-mismatch", "sdxl-text-encoder-2"],
)
def test_keys_that_do_not_fit_are_a_clear_error_and_nothing_is_loaded(pipe, tiny_pipe, photos, tmp_path, extra,
                                                                       message):
    path = _peft_file(tmp_path / "sdxl_style.safetensors", extra)
    with pytest.raises(LoraError, match=message) as info:
        apply_loras(pipe, [path])
    assert "sdxl_style.safetensors" in str(info.value) and "Stable Diffusion 1.5" in str(info.value)
    assert not any(pipe.get_list_adapters().values())
    assert np.array_equal(image(pipe, photos["astronaut"]), image(tiny_pipe, photos["astronaut"]))


def test_a_file_that_is_not_a_lora(pipe, tmp_path):
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(LoraError, match="model.safetensors"):
        apply_loras(pipe, [tmp_path / "model.safetensors"])
    (tmp_path / "old.ckpt").write_bytes(b"not a pickle")
    with pytest.raises(LoraError, match="only .safetensors"):
        apply_loras(pipe, [str(tmp_path / "old.ckpt")])


def test_a_hub_lora_offline_says_how_to_supply_it(pipe):
    with pytest.raises(LoraError) as info:
        apply_loras(pipe, ["latent-consistency/lcm-lora-sdv1-5:0.9"])
    for audience in ("page", "cli", "api"):
        message = info.value.message_for(audience)
        assert "could not be downloaded" in message and "by hand" in message
        assert "https://huggingface.co/latent-consistency/lcm-lora-sdv1-5" in message
    assert "--lora PATH/pytorch_lora_weights.safetensors:0.9" in info.value.message_for("cli")
    assert "'PATH/pytorch_lora_weights.safetensors:0.9'" in str(info.value)
    assert "LoRA folder" in info.value.message_for("page") and "--lora" not in info.value.message_for("page")


def test_messages_are_worded_for_where_they_appear(pipe, tmp_path):
    """The page lists files from the server's folder: its wording names the file, never the path or a flag."""
    gone = tmp_path / "server-folder" / "gone.safetensors"
    with pytest.raises(LoraError) as info:
        apply_loras(pipe, [f"{gone}:0.5"])
    page, cli, api = (info.value.message_for(a) for a in ("page", "cli", "api"))
    assert "gone.safetensors" in page and str(tmp_path) not in page and "--lora" not in page
    assert "reload the page" in page
    assert cli == f"--lora {gone}: no such file; check the path"
    assert api == f"LoRA {str(gone)!r}: no such file"

    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoraError) as info:
        apply_loras(pipe, [tmp_path / "broken.safetensors"])
    page, cli = info.value.message_for("page"), info.value.message_for("cli")
    assert page == "the LoRA broken.safetensors could not be read: the file is damaged or is not a LoRA"
    assert cli.startswith("the LoRA broken.safetensors could not be read: ") and cli != page
    assert not any(pipe.get_list_adapters().values())


# -- load_pipeline, metadata and the command line -------------------------------------------------------------


def test_load_pipeline_applies_loras_after_caching_the_base_weights(tmp_path, monkeypatch):
    """The converted copy in the cache must hold the base weights only."""
    from safetensors.torch import load_file

    from fastcomposer.models.architecture import build_modules, tiny_architecture
    from fastcomposer.models.testing import released_state_dict, write_model_folders
    from fastcomposer.pipeline.loading import load_pipeline

    monkeypatch.setenv("FASTCOMPOSER_CACHE", str(tmp_path / "cache"))
    arch = tiny_architecture()
    modules = build_modules(arch, empty=False, seed=3)
    torch.save(released_state_dict(modules, mixed_dtypes=False), tmp_path / "pytorch_model.bin")
    write_model_folders(arch, tmp_path / "base", tmp_path / "clip")
    lora = write_peft(tmp_path / "style.safetensors", lora_factors(9))
    pipe = load_pipeline(tmp_path / "pytorch_model.bin", device="cpu", dtype="fp32", safety_checker=False,
                         base_model=tmp_path / "base", image_encoder=tmp_path / "clip", loras=[f"{lora}:0.5"])
    assert [x.label for x in pipe.active_loras] == ["style.safetensors:0.5"]
    assert pipe.get_list_adapters() == {"unet": ["style"], "text_encoder": ["style"]}

    (cached,) = (tmp_path / "cache" / "converted").iterdir()
    saved = load_file(cached / "unet" / "diffusion_pytorch_model.safetensors")
    assert not [k for k in saved if "lora" in k]
    expected = modules["unet"].state_dict()
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def test_generate_records_the_loras_and_old_records_still_read(pipe, photos, tmp_path):
    from fastcomposer.generation.metadata import read_record, save_png
    from fastcomposer.generation.run import GenerationRequest, generate

    path = write_kohya(tmp_path / "ink.safetensors", lora_factors(10), alpha=2.0)
    apply_loras(pipe, [f"{path}:0.75"])
    request = GenerationRequest(prompt="a woman img", images=[photos["astronaut"]], num_inference_steps=2,
                                height=256, width=256, seed=5, face_crop=False)
    result = generate(pipe, request, subjects=[photos["astronaut"]])
    save_png(result.images[0], tmp_path / "out.png", result.records[0])
    record = read_record(tmp_path / "out.png")
    assert record.loras == ["ink.safetensors:0.75"]
    assert "LoRAs: ink.safetensors:0.75" in PIL.Image.open(tmp_path / "out.png").info["parameters"]

    old = {k: v for k, v in asdict(record).items() if k != "loras"}  # as written before LoRAs existed
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text("fastcomposer", json.dumps(old))
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "old.png", pnginfo=info)
    assert read_record(tmp_path / "old.png").loras == []


CLI = ["generate", "--prompt", "a woman img", "--image", ASTRONAUT, "--weights", "tiny", "--device", "cpu",
       "--no-safety-checker", "--no-face-crop", "--height", "64", "--width", "64"]


def test_cli_few_step_sampler_with_a_lora(tmp_path, capsys):
    from fastcomposer.commands.main import main
    from fastcomposer.generation.metadata import read_record

    lora = write_kohya(tmp_path / "lcm_like.safetensors", lora_factors(11), alpha=RANK)
    code = main([*CLI, "--output", str(tmp_path / "o.png"), "--scheduler", "lcm", "--steps", "4", "--guidance", "1.5",
                 "--lora", f"{lora}:0.5", "--lora", str(write_peft(tmp_path / "b.safetensors", lora_factors(12)))])
    assert code == 0, capsys.readouterr().err
    record = read_record(tmp_path / "o.png")
    assert (record.scheduler, record.num_inference_steps, record.guidance_scale) == ("lcm", 4, 1.5)
    assert record.loras == ["lcm_like.safetensors:0.5", "b.safetensors:1"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lora", "missing.safetensors"], "missing.safetensors: no such file"),
        (["--lora", "latent-consistency/lcm-lora-sdv1-5"], "could not be downloaded"),
        (["--lora", "x.safetensors:inf"], "finite"),
        (["--scheduler", "tcd", "--steps", "60"], "at most 50 steps"),
    ],
)
def test_cli_lora_and_sampler_errors_exit_2_with_one_line(tmp_path, capsys, extra, message):
    from fastcomposer.commands.main import main

    code = main([*CLI, "--output", str(tmp_path / "o.png"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()
