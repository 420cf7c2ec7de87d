"""Messages per audience (messages.py): the mechanism, and the request, face and weights messages built on it."""

from __future__ import annotations

import PIL.Image
import pytest

from fastcomposer.generation.run import GenerationError, GenerationRequest, generate, prepare_subjects, validate
from fastcomposer.inputs.faces import NoFaceFoundError
from fastcomposer.messages import AUDIENCES, PhotoRef, UserFacingError, Wording, message_for
from fastcomposer.models.checkpoint import CheckpointError, read_state_dict
from fastcomposer.pipeline.loading import SetupError, pick_dtype

PHOTO = PIL.Image.new("RGB", (64, 64))


def test_templates_fill_photo_settings_and_facts_per_audience():
    wording = Wording(page="{photo}: {num_inference_steps} {value}", cli="{photo}: {num_inference_steps} {value}",
                      api="{photo}: {num_inference_steps} {value} ({how})")
    error = UserFacingError(wording, PhotoRef("photo 3", "a/b.png"), value="{odd}", how=Wording("x", "y", "z"))
    assert error.message_for("page") == "photo 3: steps {odd}"
    assert error.message_for("cli") == "--image a/b.png: --steps {odd}"
    assert str(error) == error.message_for("api") == "photo 3: `num_inference_steps` {odd} (z)"
    assert error.path == "a/b.png"
    with pytest.raises(ValueError, match="audience"):
        error.message_for("email")


def test_plain_strings_are_shown_as_they_are():
    error = UserFacingError("a {brace} from user input")
    assert all(error.message_for(a) == "a {brace} from user input" for a in AUDIENCES)
    assert message_for(ValueError("plain"), "page") == "plain" and message_for(KeyError(), "cli") == "KeyError"
    assert PhotoRef.of("photo 1", path="x.png") == PhotoRef("photo 1", "x.png")
    assert PhotoRef.of(PhotoRef("photo 1", "y.png"), path="x.png").path == "y.png"


@pytest.mark.parametrize(
    ("overrides", "page", "cli", "api"),
    [
        (dict(num_inference_steps=2.5), "steps must be", "--steps must be", "`num_inference_steps` must be"),
        (dict(guidance_scale=0.5), "guidance scale must be", "--guidance must be", "`guidance_scale` must be"),
        (dict(width=300), "width must be a multiple of 8", "--width must be", "`width` must be"),
        (dict(scheduler="ma{gic}"), "unknown sampler 'ma{gic}'", "unknown --scheduler", "unknown `scheduler`"),
        (dict(prompt="a man img and a woman img"), "add a photo or remove", "add an --image or remove",
         "photo(s) in `images`: add a photo to `images`"),
        (dict(images=[]), "add at least one subject photo", "with --image", "`images` is empty"),
    ],
)
def test_request_messages_name_settings_as_each_audience_does(tokenizer, overrides, page, cli, api):
    request = GenerationRequest(**{"prompt": "a man img", "images": [PHOTO], **overrides})
    error = pytest.raises(GenerationError, validate, request, tokenizer).value
    assert page in error.message_for("page") and cli in error.message_for("cli") and api in str(error)
    assert "upload" not in error.message_for("cli") + str(error)


def test_no_face_keeps_its_wording_through_generate_and_names_files_on_the_command_line():
    def no_face(image, name):
        raise NoFaceFoundError(name)

    class Pipe:
        tokenizer = None

    with pytest.raises(NoFaceFoundError) as err:
        prepare_subjects([PHOTO], True, no_face, names=[PhotoRef("photo 1", "me.jpg")])
    assert err.value.message_for("cli").startswith("No face found in --image me.jpg.")
    assert "--no-face-crop" in err.value.message_for("cli")
    assert "tick 'Use whole photo' under photo 1" in err.value.message_for("page")
    assert "`face_crop=False`" in str(err.value) and err.value.name == "photo 1"

    from fastcomposer.inputs.prompt import load_tokenizer

    Pipe.tokenizer = load_tokenizer()
    request = GenerationRequest(prompt="a man img", images=[PHOTO])
    wrapped = pytest.raises(GenerationError, generate, Pipe(), request, crop_fn=no_face).value
    page = wrapped.message_for("page")
    assert page.startswith("No face found in photo 1.") and "Use whole photo" in page
    assert "--no-face-crop" in wrapped.message_for("cli")


def test_checkpoint_errors_show_only_the_file_name_on_the_page(tmp_path):
    error = pytest.raises(CheckpointError, read_state_dict, tmp_path / "deep" / "model.bin").value
    assert str(tmp_path) in str(error) and str(tmp_path) in error.message_for("cli")
    assert error.message_for("page") == "checkpoint model.bin does not exist or is not a file"


def test_setup_errors_use_flags_or_arguments():
    import torch

    error = pytest.raises(SetupError, pick_dtype, "fp8", torch.device("cpu")).value
    assert error.message_for("cli") == "unknown --dtype 'fp8'; choose auto, fp32, fp16 or bf16"
    assert str(error) == "unknown `dtype` 'fp8'; choose auto, fp32, fp16 or bf16"
    assert isinstance(error, ValueError)


def test_weights_errors_never_put_a_path_on_the_page(tmp_path):
    from fastcomposer.models.weights import WeightsUnavailableError, resolve_weights

    for target in (tmp_path / "nope.bin", tmp_path):
        error = pytest.raises(WeightsUnavailableError, resolve_weights, target).value
        assert str(tmp_path) not in error.message_for("page")
        assert f"--weights {target}" in error.message_for("cli") and f"`weights` ({target})" in str(error)
