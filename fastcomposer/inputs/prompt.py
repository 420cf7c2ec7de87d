"""Subject markers in prompts: "a man img and a woman img hiking".

Each subject word is followed by the marker `img`. The marker itself never reaches the text
encoder: it is cut out, and the clean token just before it (the last BPE piece of the subject word)
is the position whose embedding is later fused with that subject's image embedding. The k-th marker
takes the k-th reference image.

For ordinary prompts this reproduces the released demo token for token (spec section 2.2): the demo
added `img` to a second tokenizer as a special token, encoded the prompt, dropped the marker ids and
marked the id before each one. Since the tokenizer splits the text at each marker and encodes the
pieces separately, encoding the pieces ourselves gives the same ids. Two deliberate differences:
`img` counts only as a whole word (the demo also cut it out of "imgur"), and prompts the demo
silently mishandled (a doubled `img img`, a marker with no word before it, a subject word cut off
after token 77) are refused with a message that says how to fix them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

from ..config import MARKER, SETTINGS

logger = logging.getLogger(__name__)

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "configs" / "tokenizer"

# A whole-word marker: not part of a longer word ("imgur", "imgs", "img2"), case-sensitive like the
# original (CLIP lower-cases later, so "IMG" stays an ordinary word).
MARKER_PATTERN = re.compile(rf"(?<![A-Za-z0-9_]){MARKER}(?![A-Za-z0-9_])")
# The same marker with the whitespace before it, for the text-only prompt ("a man img and" -> "a man and").
_MARKER_WITH_SPACE = re.compile(rf"\s*{MARKER_PATTERN.pattern}")


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt split into what the text encoder sees and where the subjects go."""

    prompt: str  # the prompt as written, markers included
    text_only: str  # the prompt with the markers removed: what the first denoising steps see
    input_ids: list[int]  # clean token ids, padded with the pad token (or cut) to the tokenizer's length
    subject_positions: list[int]  # index into input_ids of each subject's token, in marker order
    num_tokens: int  # untruncated length of the clean ids including start and end tokens
    max_length: int  # the text encoder's context length (77 for CLIP)

    @property
    def num_subjects(self) -> int:
        return len(self.subject_positions)

    @property
    def truncated(self) -> bool:
        """True when the text is longer than the encoder's context and its end is cut off."""
        return self.num_tokens > self.max_length

    @property
    def image_token_mask(self) -> list[bool]:
        """The boolean mask of subject positions, as the released model's post-fuse step takes it."""
        positions = set(self.subject_positions)
        return [i in positions for i in range(self.max_length)]


@lru_cache(maxsize=4)
def load_tokenizer(path: str | Path | None = None) -> CLIPTokenizer:
    """Load the CLIP ViT-L/14 tokenizer that ships inside the package (or one from `path`).

    Cached per path: building the 49,408-entry BPE takes about a second.
    """
    return CLIPTokenizer.from_pretrained(str(path or TOKENIZER_DIR))


def count_markers(prompt: str) -> int:
    """Number of whole-word `img` markers in `prompt` (cheap; no tokenizer needed)."""
    return len(MARKER_PATTERN.findall(prompt))


_LAST_WORD = re.compile(r"([^\W_][\w'-]*)[^\w]*$")  # the last word of a text, with trailing punctuation


def subject_words(prompt: str) -> list[str]:
    """The word written before each marker, in marker order ("a man img and a woman img" -> man, woman).

    For labels (legends, captions); a marker with no word before it is labelled "subject k".
    """
    words = []
    for k, match in enumerate(MARKER_PATTERN.finditer(prompt)):
        last = _LAST_WORD.search(prompt[: match.start()])
        words.append(last.group(1) if last else f"subject {k + 1}")
    return words


def strip_markers(prompt: str) -> str:
    """The prompt with whole-word markers removed and the space before each one collapsed."""
    return _MARKER_WITH_SPACE.sub("", prompt).strip()


def parse_prompt(prompt: str, tokenizer: CLIPTokenizer, max_subjects: int | None = None) -> ParsedPrompt:
    """Find the subjects in a prompt and build the clean token ids.

    Args:
        prompt (`str`): text with `img` written after each subject word.
        tokenizer (`CLIPTokenizer`): the text encoder's tokenizer (see `load_tokenizer`).
        max_subjects (`int`, *optional*): the most markers allowed; defaults to `Limits.max_subjects`.

    Returns:
        `ParsedPrompt`

    Raises:
        `ValueError` (with a message that says how to fix the prompt) when a marker has no word before
        it, two markers follow each other, there are too many markers, or a subject word falls beyond
        the text encoder's context length.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    max_subjects = SETTINGS.limits.max_subjects if max_subjects is None else max_subjects
    max_length = tokenizer.model_max_length
    pieces = MARKER_PATTERN.split(prompt)  # n markers -> n + 1 pieces of ordinary text
    num_markers = len(pieces) - 1
    if num_markers > max_subjects:
        raise ValueError(
            f"the prompt has {num_markers} `{MARKER}` markers but at most {max_subjects} subjects are "
            f"supported; remove {num_markers - max_subjects} of them"
        )

    ids = [tokenizer.bos_token_id]
    positions: list[int] = []
    for k, piece in enumerate(pieces):
        piece_ids = tokenizer(piece, add_special_tokens=False).input_ids if piece.strip() else []
        if k > 0 and not piece_ids and k < len(pieces) - 1:
            raise ValueError(
                f"`{MARKER} {MARKER}`: subject {k + 1}'s marker follows subject {k}'s with no word "
                f"between them; write one subject word before each `{MARKER}`, e.g. 'a man {MARKER} "
                f"and a woman {MARKER}'"
            )
        ids += piece_ids
        if k < num_markers:
            if not piece_ids:
                raise ValueError(
                    f"marker {k + 1} has no word before it; write the subject word first, "
                    f"e.g. 'a photo of a man {MARKER}'"
                )
            positions.append(len(ids) - 1)
    ids.append(tokenizer.eos_token_id)

    num_tokens = len(ids)
    for k, pos in enumerate(positions):
        if pos >= max_length:
            raise ValueError(
                f"subject {k + 1}'s word is token {pos + 1} of {num_tokens}, beyond the text encoder's "
                f"limit of {max_length} tokens; shorten the prompt or move the subjects earlier"
            )
    # A plain cut, as the released model was given it: an over-long prompt loses its end token.
    input_ids = ids[:max_length] + [tokenizer.pad_token_id] * (max_length - len(ids))
    return ParsedPrompt(
        prompt=prompt,
        text_only=strip_markers(prompt),
        input_ids=input_ids,
        subject_positions=positions,
        num_tokens=num_tokens,
        max_length=max_length,
    )
