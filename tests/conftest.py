"""Shared fixtures. Everything runs offline on the CPU with the tiny model and the real tokenizer."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub: never reach for the network, never touch ~/.cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
_CACHE = tempfile.mkdtemp(prefix="fastcomposer-test-cache-")
os.environ["FASTCOMPOSER_CACHE"] = _CACHE
# Gradio's upload folder, per test session: another Gradio process on the machine must not clean ours.
# (Not inside _CACHE: the app blocks its own cache folder from being served.)
_GRADIO_TMP = tempfile.mkdtemp(prefix="fastcomposer-test-gradio-")
os.environ["GRADIO_TEMP_DIR"] = _GRADIO_TMP

import PIL.Image  # noqa: E402
import pytest  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow or gpu")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_CACHE, ignore_errors=True)
    shutil.rmtree(_GRADIO_TMP, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    run_slow = config.getoption("--run-slow")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        elif ("slow" in item.keywords or "gpu" in item.keywords) and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --run-slow"))


@pytest.fixture(scope="session")
def tokenizer():
    from fastcomposer.inputs.prompt import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_pipe():
    """The tiny random model on the CPU, without a safety checker. Tests must not leave state on it."""
    from fastcomposer.pipeline.loading import load_pipeline

    return load_pipeline("tiny", device="cpu", dtype="fp32", safety_checker=False)


@pytest.fixture(scope="session")
def photos() -> dict[str, PIL.Image.Image]:
    """The bundled public-domain photos (see assets/LICENSES.md)."""
    return {
        "astronaut": PIL.Image.open(ASSETS / "astronaut.png").convert("RGB"),
        "hopper": PIL.Image.open(ASSETS / "grace_hopper.jpg").convert("RGB"),
        "camera": PIL.Image.open(ASSETS / "camera.png").convert("RGB"),
    }
