"""User-facing messages, worded for where they appear: the web page, the command line or Python code.

One problem reads differently in each place. The page says "upload it again" and never shows a file path
(paths must not reach web users); the command line names the file and the flag to use; Python code gets
neutral wording with argument names. So errors carry the facts (what went wrong, which photo, the path when
known) and a `Wording` with one template per audience, and render them on demand:

    >>> err = UserFacingError(Wording(page="{photo} could not be found; upload it again",
    ...                               cli="{photo} could not be found; check the path",
    ...                               api="{photo} could not be found; check the path"),
    ...                       photo=PhotoRef("photo 2", path="holiday/missing.png"))
    >>> err.message_for("page")
    'photo 2 could not be found; upload it again'
    >>> err.message_for("cli")
    '--image holiday/missing.png could not be found; check the path'
    >>> str(err)  # the Python wording
    'photo 2 could not be found; check the path'

Templates are `str.format` strings. `{photo}` is the photo's label for the audience, `{prompt}`,
`{num_inference_steps}`, ... are request settings as that audience knows them (`SETTING_NAMES`), and any
other field is a fact given when raising; a fact may itself be a `Wording`. Facts are substituted, never
parsed, so a value with braces in it is safe.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Audience = Literal["page", "cli", "api"]
AUDIENCES: tuple[Audience, ...] = ("page", "cli", "api")


def escape(text: str) -> str:
    """`text` as a template that renders to itself."""
    return text.replace("{", "{{").replace("}", "}}")


@dataclass(frozen=True)
class Wording:
    """One message in the three places it can appear."""

    page: str  # the web app: upload language, page controls ("tick 'Use whole photo'"), never a path
    cli: str  # the command line: flags (`--no-face-crop`), the path, "check it"; never "upload"
    api: str  # Python code: neutral, argument names (`face_crop=False`); what `str(error)` gives

    @classmethod
    def same(cls, template: str) -> Wording:
        """One template for every audience (it may still hold per-audience fields such as `{photo}`)."""
        return cls(template, template, template)

    @classmethod
    def plain(cls, text: str) -> Wording:
        """Text shown as it is everywhere, e.g. another exception's message (its braces are not fields)."""
        return cls.same(escape(text))

    def render(self, audience: Audience, fields: Mapping[str, object]) -> str:
        if audience not in AUDIENCES:
            raise ValueError(f"audience must be one of {', '.join(AUDIENCES)}, got {audience!r}")
        return getattr(self, audience).format_map(_Fields(audience, fields))


@dataclass(frozen=True)
class PhotoRef:
    """Which photo a message is about."""

    name: str = "the photo"  # how the page and Python code call it, e.g. "photo 2"; never a path
    path: str | None = None  # the file it was read from, when there is one; only the command line shows it

    def label(self, audience: Audience) -> str:
        return f"--image {self.path}" if audience == "cli" and self.path is not None else self.name

    @classmethod
    def of(cls, photo: str | PhotoRef, path: str | None = None) -> PhotoRef:
        """`photo` as a PhotoRef (a plain string is its name), with `path` filled in when it had none."""
        ref = photo if isinstance(photo, PhotoRef) else cls(str(photo))
        return ref if ref.path is not None or path is None else cls(ref.name, path)


# What each request setting is called where a message appears: the page's control, the command line's flag,
# the Python argument (of `GenerationRequest` and `load_pipeline`).
SETTING_NAMES: dict[str, Wording] = {
    "prompt": Wording("the prompt", "--prompt", "`prompt`"),
    "negative_prompt": Wording("the negative prompt", "--negative-prompt", "`negative_prompt`"),
    "num_inference_steps": Wording("steps", "--steps", "`num_inference_steps`"),
    "num_images": Wording("images per run", "--num-images", "`num_images`"),
    "alpha": Wording("identity strength (alpha)", "--alpha", "`alpha`"),
    "guidance_scale": Wording("guidance scale", "--guidance", "`guidance_scale`"),
    "seed": Wording("seed", "--seed", "`seed`"),
    "scheduler": Wording("sampler", "--scheduler", "`scheduler`"),
    "cache_interval": Wording("feature cache interval", "--cache-interval", "`cache_interval`"),
    "height": Wording("height", "--height", "`height`"),
    "width": Wording("width", "--width", "`width`"),
    "images": Wording("photos", "--image", "`images`"),
    "device": Wording("--device", "--device", "`device`"),  # on the page: the app's start-up flag
    "dtype": Wording("--dtype", "--dtype", "`dtype`"),
    "crop_margin": Wording("Crop", "--crop-margin", "`crop_margin`"),  # the slider is labelled "Crop: tight face …"
    "boxes": Wording("layout boxes", "--box", "`boxes`"),
    "separate": Wording("'Keep people apart'", "--separate", "`separate`"),
    "detail_faces": Wording("'Refine faces'", "--detail-faces", "`detail_faces`"),
    "detail_strength": Wording("the face strength", "--detail-faces STRENGTH", "`detail_strength`"),
    # How to give the encoder whole photos instead of face crops.
    "no_face_crop": Wording("untick 'Crop to the face'", "pass --no-face-crop",
                            "turn off face crop (`face_crop=False`)"),
}


class _Fields(dict):
    """The values of a template's fields for one audience: facts first, then the photo, then setting names."""

    def __init__(self, audience: Audience, facts: Mapping[str, object]):
        super().__init__()
        self.audience, self.facts = audience, facts

    def __missing__(self, key: str) -> object:
        value = self.facts[key] if key in self.facts else SETTING_NAMES.get(key)
        if value is None:
            raise KeyError(key)
        if isinstance(value, Wording):
            return value.render(self.audience, self.facts)
        if isinstance(value, PhotoRef):
            return value.label(self.audience)
        return value


class UserFacingError(Exception):
    """A problem the user can fix, with its message for each audience. `str(error)` is the Python wording.

    Args:
        wording: the templates; a plain string is shown as it is everywhere (it is not a template, so an
            f-string holding user input is safe).
        photo: the photo it concerns, the `{photo}` field.
        **facts: the other fields, e.g. `limit=1000`.
    """

    def __init__(self, wording: Wording | str, photo: str | PhotoRef | None = None, **facts: object):
        self.wording = Wording.plain(wording) if isinstance(wording, str) else wording
        self.photo = None if photo is None else PhotoRef.of(photo)
        self.facts = facts
        super().__init__(self.message_for("api"))

    def message_for(self, audience: Audience) -> str:
        """The message as `audience` ("page", "cli" or "api") should read it."""
        fields = self.facts if self.photo is None else {**self.facts, "photo": self.photo}
        return self.wording.render(audience, fields)

    @property
    def path(self) -> str | None:
        """The file the problem is about, when known (never part of the page wording)."""
        return self.photo.path if self.photo is not None else None


def message_for(error: BaseException, audience: Audience) -> str:
    """`error`'s message for `audience`: its own wording for a `UserFacingError`, else `str(error)`."""
    if isinstance(error, UserFacingError):
        return error.message_for(audience)
    return str(error) or type(error).__name__
