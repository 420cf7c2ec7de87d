"""Shared by the app tests: launch arguments and a full /generate request for gradio_client."""

from __future__ import annotations

from pathlib import Path

from gradio_client import handle_file

ROOT = Path(__file__).resolve().parents[1]
ASTRONAUT = str(ROOT / "assets" / "astronaut.png")
HOPPER = str(ROOT / "assets" / "grace_hopper.jpg")


class Args:
    """What `python app.py --weights tiny --public` would parse, for `app.launch`."""

    weights = "tiny"
    host = "127.0.0.1"
    port = None
    share = False
    public = True  # public-server settings: internal errors hidden


def photos(*paths: str) -> list[dict]:
    """One subject's photos, as gradio_client sends a gallery (the /generate API's photo_1 ... photo_4)."""
    return [{"image": handle_file(str(path)), "caption": None} for path in paths]


def request(**overrides) -> dict:
    """Keyword arguments for `client.predict(..., api_name="/generate")`: one photo, 2 steps, 256 px."""
    args = dict(prompt="a woman img reading", negative="", alpha=0.75, guidance=5.0, steps=2, sampler="pndm",
                seed=-1, num_images=1, width=256, height=256, face_crop=True, photo_1=photos(ASTRONAUT),
                photo_2=None, photo_3=None, photo_4=None, whole_1=[], whole_2=[], whole_3=[], whole_4=[])
    args.update(overrides)
    return args


def image_path(item) -> str:
    """The local file of one gallery item returned by gradio_client."""
    image = item["image"]
    return image if isinstance(image, str) else image["path"]
