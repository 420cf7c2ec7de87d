"""Plain-words feedback for the web page: the live prompt hint and the token meter.

Pure functions of their inputs, so the page can call them on every keystroke and tests can check
the wording without a browser.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MARKER
from ..inputs.prompt import count_markers, parse_prompt


@dataclass(frozen=True)
class PromptHint:
    ok: bool  # True when the prompt and the photos can run as they are
    text: str  # one or two short lines for under the prompt box


def prompt_hint(prompt: str, num_photos: int, tokenizer, max_subjects: int, max_chars: int = 1000,
                total_photos: int | None = None) -> PromptHint:
    """"2 subjects in prompt · 2 photos ✓", or what to change, plus a 77-token meter.

    `num_photos` counts subjects with photos; when some have several, `total_photos` (all of them) makes the line
    read "1 subject in prompt · photos of 1 subject (3 photos) ✓".
    """
    prompt = prompt or ""
    if len(prompt) > max_chars:  # checked before tokenising: this runs unqueued, on every keystroke
        return PromptHint(False, f"✗ the prompt is {len(prompt)} characters; the limit is {max_chars}")
    markers = count_markers(prompt)
    plural = lambda n: "s" if n != 1 else ""  # noqa: E731
    photos = f"{num_photos} photo{plural(num_photos)}"
    if total_photos is not None and total_photos != num_photos:
        photos = f"photos of {num_photos} subject{plural(num_photos)} ({total_photos} photos)"
    counts = f"{markers} subject{plural(markers)} in prompt · {photos}"
    try:
        parsed = parse_prompt(prompt, tokenizer, max_subjects=max_subjects)
    except ValueError as e:
        return PromptHint(False, f"{counts} · ✗ {e}")
    meter = f"{min(parsed.num_tokens, parsed.max_length)}/{parsed.max_length} tokens"
    if parsed.truncated:
        meter += f" · ⚠ the prompt is {parsed.num_tokens} tokens; words after token {parsed.max_length} are ignored"
    if markers == 0:
        example = f"'a woman {MARKER} reading'"
        return PromptHint(False, f"{counts} · write `{MARKER}` after each subject word, e.g. {example} · {meter}")
    if num_photos == 0:
        return PromptHint(False, f"{counts} · add a photo for each `{MARKER}` · {meter}")
    if markers > num_photos:
        return PromptHint(False, f"{counts}: add a photo or remove an `{MARKER}` · {meter}")
    if markers < num_photos:
        return PromptHint(False, f"{counts}: remove a photo or add `{MARKER}` after a subject word · {meter}")
    return PromptHint(True, f"{counts} ✓ · {meter}")
