"""Marker parsing: the released demo's ids and mask for ordinary prompts, clear errors for the rest."""

from __future__ import annotations

import pytest

from fastcomposer.inputs.prompt import count_markers, parse_prompt, strip_markers

from .reference import original_tokenize_and_mask

ORDINARY = [
    "a man img and a woman img hiking in the mountains",
    "A painting of a man img in the style of Van Gogh",
    "a man img, a woman img and a child img at the beach.",
    "an astronaut img and a scientist img and a photographer img and a dog img",
    "a shiba-inu img sitting on a sofa",  # multi-piece word: only the last BPE piece is marked
    "photo of a man img " + "very " * 80,  # longer than 77 tokens: a plain cut, as the original
]


@pytest.mark.parametrize("prompt", ORDINARY)
def test_ids_and_mask_match_the_released_demo(prompt, tokenizer):
    parsed = parse_prompt(prompt, tokenizer)
    ids, mask = original_tokenize_and_mask(prompt, tokenizer)
    assert parsed.input_ids == ids
    assert parsed.image_token_mask == mask
    assert parsed.num_subjects == sum(mask) == count_markers(prompt)


def test_known_ids(tokenizer):
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408


def test_positions_are_in_marker_order_and_point_at_the_word_before(tokenizer):
    parsed = parse_prompt("a man img and a woman img", tokenizer)
    words = [tokenizer.convert_ids_to_tokens(parsed.input_ids[p]) for p in parsed.subject_positions]
    assert words == ["man</w>", "woman</w>"]
    assert parsed.subject_positions[0] < parsed.subject_positions[1]


def test_text_only_prompt_tokenises_like_the_clean_ids(tokenizer):
    for prompt in ORDINARY[:5]:
        parsed = parse_prompt(prompt, tokenizer)
        assert "img" not in parsed.text_only.split()
        plain = tokenizer(parsed.text_only, padding="max_length", max_length=77, truncation=True).input_ids
        assert plain == parsed.input_ids


@pytest.mark.parametrize("prompt", ["a photo on imgur of a man img", "two imgs of a man img", "img2 of a man img"])
def test_img_counts_only_as_a_whole_word(prompt, tokenizer):
    parsed = parse_prompt(prompt, tokenizer)
    assert parsed.num_subjects == 1
    assert parsed.text_only.count("img") == 1  # the one inside the other word survives
    word = tokenizer.convert_ids_to_tokens(parsed.input_ids[parsed.subject_positions[0]])
    assert word == "man</w>"


def test_uppercase_is_not_a_marker(tokenizer):
    assert parse_prompt("a man IMG hiking and a woman img", tokenizer).num_subjects == 1


@pytest.mark.parametrize(
    ("prompt", "words"),
    [
        ("a man img img hiking", ["img img", "no word between"]),
        ("img a man hiking", ["no word before"]),
        ("a img b img c img d img e img", ["5", "at most 4"]),
        ("a man img and a woman img", None),
    ],
)
def test_bad_markers_are_clear_errors(prompt, words, tokenizer):
    if words is None:
        parse_prompt(prompt, tokenizer)
        return
    with pytest.raises(ValueError) as err:
        parse_prompt(prompt, tokenizer)
    for word in words:
        assert word in str(err.value)


def test_a_subject_cut_off_after_77_tokens_is_an_error(tokenizer):
    prompt = "very " * 80 + "a man img"
    with pytest.raises(ValueError, match="beyond the text encoder's limit of 77 tokens"):
        parse_prompt(prompt, tokenizer)


def test_long_prompt_is_reported_as_truncated(tokenizer):
    parsed = parse_prompt("a man img " + "very " * 80, tokenizer)
    assert parsed.truncated and parsed.num_tokens > 77
    assert not parse_prompt("a man img", tokenizer).truncated


def test_strip_markers():
    assert strip_markers("a man img and a woman img, hiking") == "a man and a woman, hiking"
    assert strip_markers("imgur man img") == "imgur man"
