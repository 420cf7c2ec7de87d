"""A real browser: Debian's Chromium, driven by Playwright, uploads a photo and generates.

Never downloads a browser. Without Chromium the test is skipped with the reason, except under CI
(CI=true), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import app as app_module
from fastcomposer.faces import FaceCropper

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI=true but Chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("Chromium is not installed (apt-get install chromium); the browser test needs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def url(tiny_pipe):
    demo = app_module.create_demo(lambda: tiny_pipe, cropper=FaceCropper(allow_download=False))
    demo.queue(max_size=4, default_concurrency_limit=1, api_open=False)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(ROOT / "assets")])
    yield demo.local_url
    demo.close()


def test_upload_prompt_generate_in_chromium(browser, url, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(url, wait_until="networkidle")

    # Upload the astronaut photo into slot 1: the crop preview appears with a status.
    page.locator("#photo-1 input[type=file]").set_input_files(str(ROOT / "assets" / "astronaut.png"))
    page.locator("#preview-1 img").wait_for(state="visible", timeout=60_000)
    page.get_by_text("photo 1: face found ✓").wait_for(timeout=30_000)

    # The live hint agrees once the prompt has one marker.
    page.locator("#prompt textarea").fill("a woman img in a garden")
    page.get_by_text("1 subject in prompt · 1 photo ✓").wait_for(timeout=30_000)

    # Few steps and a small size keep the tiny model quick; the settings live in the folded accordion.
    page.get_by_text("Advanced settings").click()
    for elem, value in (("steps", "3"), ("width", "256"), ("height", "256")):
        box = page.locator(f"#{elem} input[type=number]")
        box.fill(value)
        box.press("Enter")

    page.locator("#generate").click()
    page.locator("#gallery img").first.wait_for(state="visible", timeout=120_000)
    page.get_by_text("image(s) · seed").wait_for(timeout=30_000)
    shot = tmp_path / "browser.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    artifacts = os.environ.get("FASTCOMPOSER_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / "browser.png")
    page.close()
