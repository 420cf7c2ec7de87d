"""Several photos per subject: the mean of projected CLIP embeddings, bit-identity for one photo, caching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastcomposer.models.postfuse import encode_subjects

SMALL = dict(height=64, width=64, num_inference_steps=3, output_type="np")
CPU = torch.device("cpu")


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def test_several_photos_are_the_mean_of_their_projected_embeddings(tiny_pipe, photos):
    """Against an independent computation: each photo encoded on its own, averaged by hand."""
    a, b, c = photos["astronaut"], photos["hopper"], photos["camera"]
    ours = tiny_pipe.encode_subject_images([[a, b], c], CPU)
    with torch.no_grad():
        single = [encode_subjects(tiny_pipe.image_encoder, tiny_pipe.subject_processor([im]))[0, 0, 0]
                  for im in (a, b, c)]
    assert ours.shape == (1, 2, 1, single[0].shape[-1])
    torch.testing.assert_close(ours[0, 0, 0], (single[0] + single[1]) / 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[0, 1, 0], single[2], rtol=1e-5, atol=1e-5)


def test_one_photo_in_a_list_is_bit_identical_to_a_plain_photo(tiny_pipe, photos):
    a = photos["astronaut"]
    plain = tiny_pipe("a woman img reading", [a], generator=gen(3), **SMALL).images
    listed = tiny_pipe("a woman img reading", [[a]], generator=gen(3), **SMALL).images
    assert np.array_equal(plain, listed)


def test_the_same_photo_twice_equals_it_once_and_another_photo_differs(tiny_pipe, photos):
    a, b = photos["astronaut"], photos["hopper"]
    run = lambda subject: tiny_pipe("a woman img reading", [subject], generator=gen(4), **SMALL).images  # noqa: E731
    once, twice, mixed, other = run(a), run([a, a.copy()]), run([a, b]), run(b)
    assert np.array_equal(once, twice)
    assert not np.array_equal(mixed, once) and not np.array_equal(mixed, other)


def test_two_subjects_with_several_photos_each(tiny_pipe, photos):
    a, b, c = photos["astronaut"], photos["hopper"], photos["camera"]
    out = tiny_pipe("a woman img and a man img", [[a, b], [c, a, b]], generator=gen(5), **SMALL)
    assert out.images.shape == (1, 64, 64, 3)


def test_the_embedding_cache_keys_on_the_whole_set(tiny_pipe, photos, monkeypatch):
    calls = []
    forward = tiny_pipe.image_encoder.forward

    def counting(*args, **kwargs):
        calls.append(kwargs["pixel_values"].shape[0])
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_pipe.image_encoder, "forward", counting)
    tiny_pipe._subject_cache.clear()
    a, b = photos["astronaut"], photos["hopper"]
    first = tiny_pipe.encode_subject_images([[a, b]], CPU)
    again = tiny_pipe.encode_subject_images([[a.copy(), b.copy()]], CPU)  # same pixels: a hit
    swapped = tiny_pipe.encode_subject_images([[b, a]], CPU)  # another set (order of photos within a subject)
    only_a = tiny_pipe.encode_subject_images([a], CPU)
    assert calls == [2, 2, 1]
    assert torch.equal(first, again)
    torch.testing.assert_close(first, swapped)  # a mean does not depend on order...
    assert not torch.equal(first, only_a)  # ...but depends on which photos


@pytest.mark.parametrize(("groups", "message"), [
    (lambda a: [[]], "subject 1 has 0 photos"),
    (lambda a: [[a] * 5], "subject 1 has 5 photos"),
    (lambda a: [[a, "x"]], "PIL images"),
])
def test_bad_photo_lists_are_clear_errors(tiny_pipe, photos, groups, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipe("a woman img", groups(photos["astronaut"]), **SMALL)


def test_generate_records_photo_counts_only(tiny_pipe, photos):
    from fastcomposer.generation.run import GenerationRequest, generate

    a, b, c = photos["astronaut"], photos["hopper"], photos["camera"]
    request = GenerationRequest(prompt="a woman img and a man img", images=[[a, b], c], num_inference_steps=2,
                                height=256, width=256, seed=1, face_crop=False)
    result = generate(tiny_pipe, request)
    record = result.records[0]
    assert record.photos_per_subject == [2, 1]
    assert [len(group) for group in result.subjects] == [2, 1]
    assert "Photos per subject: [2, 1]" in record.summary()
