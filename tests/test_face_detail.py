"""The face pass (generation/face_detail.py): only faces change, each redraw sees its subject alone, unmatched faces
and Stop leave pixels as they were, and the setting goes through every entry point.

The generated images of the tiny model hold no face, so the pass is driven here on a scene made of the bundled
portraits, as a stand-in for a generated image with two people in it.
"""

from __future__ import annotations

import threading

import numpy as np
import PIL.Image
import pytest
import torch

from fastcomposer.generation import GenerationError, GenerationRequest, generate
from fastcomposer.generation.face_detail import (
    DETAIL,
    FACE_PROMPT,
    by_attention,
    detail_images,
    detail_seed,
    feather_mask,
)
from fastcomposer.inputs.faces import FaceCropper
from fastcomposer.inputs.prompt import parse_prompt

PROMPT = "a woman img and a man img in a park"
BOXES = [(0.0, 0.0, 0.6, 1.0), (0.6, 0.0, 1.0, 1.0)]


@pytest.fixture(scope="module")
def cropper():
    return FaceCropper(allow_download=False, detector="mtcnn")


@pytest.fixture(scope="module")
def scene(photos) -> PIL.Image.Image:
    """Two faces: the astronaut on the left, Grace Hopper on the right (a stand-in for a generated image)."""
    image = PIL.Image.new("RGB", (768, 512), (128, 128, 128))
    image.paste(photos["astronaut"], (0, 0))
    image.paste(photos["hopper"].resize((256, 300)), (512, 100))
    return image


def request(**overrides) -> GenerationRequest:
    base = dict(prompt=PROMPT, images=[], boxes=BOXES, num_inference_steps=10, scheduler="dpm", detail_faces=True,
                height=512, width=768, seed=5)
    return GenerationRequest(**{**base, **overrides})


def run(pipe, scene, photos, cropper, **kw):
    pipe.use_scheduler("dpm")
    subjects = [[photos["astronaut"]], [photos["hopper"]]]
    return detail_images(pipe, kw.pop("req", request()), [scene], [False], subjects, 5, kw.pop("attention", None),
                         cropper=cropper, **kw)


def outside(crops, size) -> np.ndarray:
    mask = np.ones((size[1], size[0]), dtype=bool)
    for x0, y0, x1, y1 in crops:
        mask[y0:y1, x0:x1] = False
    return mask


def test_only_the_faces_change_and_each_redraw_reports_its_steps(tiny_pipe, scene, photos, cropper):
    stages = []
    result = run(tiny_pipe, scene, photos, cropper, on_stage=lambda *a: stages.append(a))
    matches = result.matches[0]
    assert [(m.subject, m.how) for m in sorted(matches, key=lambda m: m.face[0])] == [(0, "box"), (1, "box")]
    before, after = np.asarray(scene), np.asarray(result.images[0])
    keep = outside([m.crop for m in matches], scene.size)
    assert np.array_equal(before[keep], after[keep])  # every pixel outside the crops, exactly
    for m in matches:
        x0, y0, x1, y1 = m.crop
        assert not np.array_equal(before[y0:y1, x0:x1], after[y0:y1, x0:x1])
    steps = min(int(10 * DETAIL.strength), 10)
    assert [s for s, _, _ in stages] == ["image 1 · face 1/2"] * steps + ["image 1 · face 2/2"] * steps
    assert [d for _, d, _ in stages[:steps]] == list(range(1, steps + 1))
    assert result.notes == ["2 faces refined"] and not result.stopped


def test_each_redraw_is_conditioned_on_its_subject_alone(tiny_pipe, scene, photos, cropper, monkeypatch):
    calls = []
    forward = tiny_pipe.unet.forward

    def spy(sample, t, encoder_hidden_states=None, **kw):
        calls.append(encoder_hidden_states.detach().clone())
        return forward(sample, t, encoder_hidden_states=encoder_hidden_states, **kw)

    monkeypatch.setattr(tiny_pipe.unet, "forward", spy)
    result = run(tiny_pipe, scene, photos, cropper)
    order = [m.subject for m in result.matches[0] if m.subject is not None]
    steps = min(int(10 * DETAIL.strength), 10)
    assert len(calls) == steps * len(order)
    negative = tiny_pipe.encode_text(request().negative_prompt or __import__(
        "fastcomposer.config", fromlist=["SETTINGS"]).SETTINGS.defaults.negative_prompt, "cpu")
    words, own = ["woman", "man"], [photos["astronaut"], photos["hopper"]]
    for f, subject in enumerate(order):
        # written out: the one-subject prompt, that subject's photo through the encoder, fused into its word
        parsed = parse_prompt(FACE_PROMPT.format(word=words[subject]), tiny_pipe.tokenizer)
        fused = tiny_pipe.encode_augmented_prompt(parsed, tiny_pipe.encode_subject_images([[own[subject]]], "cpu"),
                                                  "cpu")
        other = tiny_pipe.encode_augmented_prompt(parsed, tiny_pipe.encode_subject_images([[own[1 - subject]]],
                                                                                          "cpu"), "cpu")
        for embeds in calls[f * steps:(f + 1) * steps]:  # every iteration of this face, from the first
            assert torch.allclose(embeds[1], fused[0], atol=1e-6)  # the positive half: this subject only
            assert not torch.allclose(embeds[1], other[0], atol=1e-3)
            assert torch.allclose(embeds[0], negative[0], atol=1e-6)  # the negative half never sees a subject


def test_an_unmatched_face_is_left_alone(tiny_pipe, scene, photos, cropper):
    result = run(tiny_pipe, scene, photos, cropper, req=request(boxes=[BOXES[0], None]))
    matches = sorted(result.matches[0], key=lambda m: m.face[0])
    assert [m.subject for m in matches] == [0, None]  # no box, no attention, no identity model: whose is unknown
    x0, y0, x1, y1 = matches[1].crop
    assert np.array_equal(np.asarray(scene)[y0:y1, x0:x1], np.asarray(result.images[0])[y0:y1, x0:x1])
    assert result.notes == ["1 face refined"]


def test_the_identity_reports_assignment_matches_a_face_no_box_or_attention_claims(tiny_pipe, scene, photos,
                                                                                    cropper):
    from fastcomposer.generation.face_detail import assignment_of
    from fastcomposer.identity.report import IdentityReport, SubjectIdentity

    faces = sorted(cropper.detect(scene), key=lambda f: f.box[0])  # the astronaut left, Grace Hopper right
    # The check's report on this image, as `check_images` makes it: the right face went to subject 1 (the man)
    report = IdentityReport(True, subjects=[SubjectIdentity("woman"), SubjectIdentity("man", 0.6, 1)],
                            num_faces=2, faces=[tuple(f.box) for f in faces])  # the woman: not found
    whose = assignment_of([report])
    assert whose(0, tuple(int(v) for v in faces[1].box)) == 1 and whose(0, tuple(int(v) for v in faces[0].box)) is None
    assert assignment_of([]) is None  # the check off
    result = run(tiny_pipe, scene, photos, cropper, req=request(boxes=None), identity=whose)
    matches = sorted(result.matches[0], key=lambda m: m.face[0])
    assert [(m.subject, m.how) for m in matches] == [(None, ""), (1, "identity")]
    x0, y0, x1, y1 = matches[0].crop  # the face nobody claimed is left as it was
    assert np.array_equal(np.asarray(scene)[y0:y1, x0:x1], np.asarray(result.images[0])[y0:y1, x0:x1])


def test_stop_during_the_pass_keeps_the_image_without_the_unfinished_face(tiny_pipe, scene, photos, cropper):
    stop = threading.Event()

    def on_stage(stage, done, total):
        if done == 2:
            stop.set()

    result = run(tiny_pipe, scene, photos, cropper, on_stage=on_stage, stop=stop)
    assert result.stopped and np.array_equal(np.asarray(result.images[0]), np.asarray(scene))
    assert "stopped" in result.notes[0]


def test_the_same_seed_redraws_the_same_faces(tiny_pipe, scene, photos, cropper):
    a = run(tiny_pipe, scene, photos, cropper).images[0]
    b = run(tiny_pipe, scene, photos, cropper).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert detail_seed(5, 0, 1) == (5 * 1_000_003 + 7_919 * 1 + 104_729 * 2) % (2**31 - 1)
    assert len({detail_seed(5, k, f) for k in range(3) for f in range(3)}) == 9


def test_matching_by_attention_needs_a_clear_lead():
    maps = torch.zeros(2, 8, 8)
    maps[0, :, :4] = 1.0  # subject 0 attends to the left half
    maps[1, :, 4:] = 1.0
    assert by_attention((0, 0, 100, 100), (400, 400), maps) == 0
    assert by_attention((300, 0, 400, 100), (400, 400), maps) == 1
    assert by_attention((150, 0, 250, 100), (400, 400), maps) is None  # half and half: nobody's
    assert by_attention((0, 0, 100, 100), (400, 400), torch.zeros(2, 8, 8)) is None


def test_the_feathered_mask_fades_to_the_edges():
    mask = np.asarray(feather_mask(100, 0.2)).astype(int)
    assert mask[50, 50] == 255 and mask[0, 0] == 0 and mask[50, 0] < 10
    assert all(a <= b for a, b in zip(mask[50, :20], mask[50, 1:21]))  # rising over the ramp
    assert np.array_equal(mask, mask.T) and np.array_equal(mask, mask[::-1, ::-1])


def test_off_is_off_and_the_main_image_is_the_same_with_the_pass_on(tiny_pipe, photos, monkeypatch):
    """Off: the pass never runs. On: the capture it needs changes no pixel of the main image, outside the faces."""
    base = dict(prompt="a woman img", images=[photos["astronaut"]], num_inference_steps=3, height=256, width=256,
                face_crop=False, seed=9)
    called = []
    monkeypatch.setattr(tiny_pipe, "redraw", lambda *a, **k: called.append(1))
    plain = generate(tiny_pipe, GenerationRequest(**base))
    off = generate(tiny_pipe, GenerationRequest(**base, detail_faces=False))
    assert not called and np.array_equal(np.asarray(plain.images[0]), np.asarray(off.images[0]))
    assert plain.records[0].detail_faces is False and "Refine faces" not in plain.records[0].summary()
    monkeypatch.undo()
    on = generate(tiny_pipe, GenerationRequest(**base, detail_faces=True, detail_strength=0.5))
    record = on.records[0]
    assert record.detail_faces is True and record.detail_strength == 0.5 and "Refine faces: 0.5" in record.summary()
    assert len(on.notes) == 1 and on.notes[0]  # the caption says what the pass did (on noise: most likely no face)
    if on.notes[0] == "refine faces: no face found":
        assert np.array_equal(np.asarray(plain.images[0]), np.asarray(on.images[0]))


@pytest.mark.parametrize(("strength", "page", "cli", "api"), [
    (0.0, "the face strength must be from 0.05 to 1, got 0.0", "--detail-faces STRENGTH must be from 0.05",
     "`detail_strength` must be from 0.05 to 1"),
    (1.5, "the face strength must be from 0.05 to 1, got 1.5", "--detail-faces STRENGTH must be from 0.05",
     "`detail_strength` must be from 0.05 to 1"),
])
def test_a_strength_out_of_range_is_refused_in_words(tiny_pipe, photos, strength, page, cli, api):
    bad = GenerationRequest("a woman img", [photos["astronaut"]], detail_faces=True, detail_strength=strength)
    with pytest.raises(GenerationError) as error:
        generate(tiny_pipe, bad)
    assert error.value.message_for("page").startswith(page)
    assert error.value.message_for("cli").startswith(cli) and str(error.value).startswith(api)


def test_the_command_line_and_the_page_carry_the_setting(tmp_path, capsys):
    from fastcomposer.commands.main import main
    from fastcomposer.generation.metadata import read_record

    from .app_helpers import ASTRONAUT

    tiny = ["--weights", "tiny", "--device", "cpu", "--no-safety-checker", "--steps", "2", "--height", "64",
            "--width", "64", "--no-face-crop"]
    assert main(["generate", "--prompt", "a woman img", "--image", ASTRONAUT, "--detail-faces", "0.6", "--output",
                 str(tmp_path / "a.png"), *tiny]) == 0
    record = read_record(tmp_path / "a.png")
    assert record.detail_faces is True and record.detail_strength == 0.6
    assert main(["generate", "--prompt", "a woman img", "--image", ASTRONAUT, "--detail-faces", "--output",
                 str(tmp_path / "b.png"), *tiny]) == 0
    assert read_record(tmp_path / "b.png").detail_strength == DETAIL.strength
    assert main(["generate", "--prompt", "a woman img", "--image", ASTRONAUT, "--detail-faces", "2", "--output",
                 str(tmp_path / "c.png"), *tiny]) == 2
    assert "--detail-faces STRENGTH must be from 0.05 to 1, got 2.0" in capsys.readouterr().err
