"""A real browser: Debian's Chromium, driven by Playwright, uploads photos (two for one subject), sees their
thumbnails and crop boxes, generates with attention maps, watches the progress and presses Stop. Screenshots
(1400 and 390 px wide) go to tmp_path and to $FASTCOMPOSER_ARTIFACTS when set.

Never downloads a browser. Without Chromium the test is skipped with the reason, except under CI
(CI=true), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest

import app as app_module
from fastcomposer.generation.metadata import read_record
from fastcomposer.inputs.faces import FaceCropper

from .app_helpers import Args

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.browser


# Progress bars drawn on the page now, and how many of them on the gallery
VISIBLE_BARS = """() => {
    const bars = [...document.querySelectorAll('.progress-bar')]
        .filter(e => e.checkVisibility({opacityProperty: true}));
    return {all: bars.length, gallery: bars.filter(e => e.closest('#gallery')).length};
}"""


class LocalArgs(Args):
    public = False  # listen on 127.0.0.1 only


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
    app_module.launch(demo, LocalArgs, prevent_thread_lock=True, quiet=True)  # the app's own settings and CSS
    yield demo.local_url
    demo.close()


def test_upload_prompt_generate_in_chromium(browser, url, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    prepare(page, url, steps=3)
    page.locator("#generate").click()
    page.locator("#gallery img").first.wait_for(state="visible", timeout=120_000)
    page.get_by_text("image(s) · seed").wait_for(timeout=30_000)
    assert screenshot(page, tmp_path, "browser").stat().st_size > 10_000
    page.close()


def test_progress_shows_once_and_stop_says_what_happened(browser, url, tmp_path, tiny_pipe, monkeypatch):
    forward = tiny_pipe.unet.forward
    monkeypatch.setattr(tiny_pipe.unet, "forward", lambda *a, **k: time.sleep(0.15) or forward(*a, **k))
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    prepare(page, url, steps=2)
    page.locator("#generate").click()
    page.get_by_text("image(s) · seed").wait_for(timeout=60_000)  # an earlier result, which must stay

    # Speed sets the three settings; a step count of one's own makes it Custom
    page.locator("#speed").get_by_text("Balanced").click()
    page.wait_for_function("document.querySelector('#steps input[type=number]').value === '25'")
    set_number(page, "steps", "60")
    page.wait_for_function("document.querySelector('#speed input[value=custom]').checked")

    page.locator("#generate").click()
    page.locator("#gallery .progress-level", has_text="step ").wait_for(timeout=60_000)
    counts = []
    for _ in range(5):  # the bar is redrawn after each preview: sample it a few times
        counts.append(page.evaluate(VISIBLE_BARS))
        time.sleep(0.1)
    # one progress bar, on the gallery (not also on the seed box and the status line)
    assert max(c["all"] for c in counts) == 1 and all(c["all"] == c["gallery"] for c in counts), counts
    text = page.locator("#gallery .progress-level").first.inner_text()
    assert text.startswith("step ") and "left" in text and len(text) < 40, text
    screenshot(page, tmp_path, "progress")
    page.set_viewport_size({"width": 390, "height": 844})
    bar = page.locator("#gallery .progress-level").first
    bar.wait_for(state="visible", timeout=10_000)  # each preview update drops the bar until it is drawn again
    box = bar.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390  # fits a phone
    screenshot(page, tmp_path, "progress-390", full_page=False, element="#gallery")
    page.set_viewport_size({"width": 1400, "height": 1100})

    # Another visitor's run waits in the queue behind this one: their Stop takes it out before it starts
    other = browser.new_page(viewport={"width": 1400, "height": 1100})
    prepare(other, url, steps=2)
    other.locator("#generate").click()
    other.locator("#gallery").get_by_text("queue").wait_for(timeout=30_000)
    other.locator("#stop").click()
    other.locator("#status").get_by_text("Stopped before it started; nothing was generated.").wait_for(timeout=10_000)

    page.locator("#stop").click()
    page.locator("#status").get_by_text("Stopped at step").wait_for(timeout=30_000)
    status = page.locator("#status").inner_text()
    assert status.startswith("Stopped at step ") and status.endswith("of 60; nothing was generated."), status
    page.locator("#gallery").get_by_text("unfinished · ").wait_for(timeout=10_000)  # DPM: 60 steps
    assert page.locator("#gallery img").count() == 2  # the unfinished preview and the earlier image
    screenshot(page, tmp_path, "stopped")
    page.set_viewport_size({"width": 390, "height": 844})
    page.locator("#gallery").scroll_into_view_if_needed()
    screenshot(page, tmp_path, "stopped-390", full_page=False)
    page.close()
    time.sleep(2.0)  # the queue is free now: a run that was not cancelled would start and finish
    assert other.locator("#gallery img").count() == 0 and "Stopped before" in other.locator("#status").inner_text()
    other.close()


def test_several_photos_with_thumbnails_crop_boxes_and_attention_at_two_widths(browser, url, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(url, wait_until="load")
    page.locator("#generate").wait_for(timeout=30_000)
    upload(page, 1, "astronaut.png", "grace_hopper.jpg")
    upload(page, 2, "camera.png")
    # Thumbnails of the photos themselves (not file names), then each photo with its crop drawn on it
    page.wait_for_function("document.querySelectorAll('#photo-1 img').length === 2"
                           " && document.querySelectorAll('#photo-2 img').length === 1", timeout=60_000)
    page.wait_for_function("document.querySelectorAll('#preview-1 img').length === 2", timeout=60_000)
    page.locator("#status-1").get_by_text("2 photos ✓ (averaged into one subject)").wait_for(timeout=30_000)
    # numbered within its subject: the slot of subject 2 with one photo says "photo 1", not "photo 2"
    page.locator("#status-2").get_by_text("photo 1: face found ✓").wait_for(timeout=30_000)
    assert "photo 2" not in page.locator("#status-2").inner_text()
    assert page.locator("#preview-1").get_by_text("2 · face ✓").count() >= 1
    page.locator("#prompt textarea").fill("a woman img and a man img in a garden")
    page.get_by_text("2 subjects in prompt · photos of 2 subjects (3 photos) ✓").wait_for(timeout=30_000)
    page.locator("#subject-2").get_by_text("man").wait_for(timeout=10_000)  # the slot names its subject word
    for elem in ("restore", "photo-1"):  # drop zones show their whole text, not the top half of it
        clipped = page.evaluate(CLIPPED_TEXT, f"#{elem}")
        assert not clipped, (elem, clipped)

    page.locator("#attention input[type=checkbox]").check()
    page.get_by_text("Advanced settings").click()
    for elem, value in (("steps", "2"), ("width", "256"), ("height", "256")):
        set_number(page, elem, value)
    page.locator("#generate").click()
    page.get_by_text("image(s) · seed").wait_for(timeout=120_000)
    page.locator("#gallery").get_by_text("map of image 1").wait_for(timeout=10_000)
    assert page.locator("#gallery img").count() == 2  # the image and its attention map
    page.locator("#gallery").scroll_into_view_if_needed()  # its images load lazily, once in view
    page.wait_for_function(IMAGES_LOADED, timeout=30_000)
    screenshot(page, tmp_path, "photos-1400")
    page.set_viewport_size({"width": 390, "height": 844})
    time.sleep(0.5)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing sticks out sideways on a phone
    box = page.locator("#slot-1").bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390
    page.locator("#gallery").scroll_into_view_if_needed()
    page.wait_for_function(IMAGES_LOADED, timeout=30_000)
    screenshot(page, tmp_path, "photos-390")
    page.close()


def test_layout_preset_drag_and_generate_at_two_widths(browser, url, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(url, wait_until="load")
    page.locator("#generate").wait_for(timeout=30_000)
    upload(page, 1, "astronaut.png")
    upload(page, 2, "grace_hopper.jpg")
    page.locator("#prompt textarea").fill("a woman img and a man img in a park")
    page.get_by_text("2 subjects in prompt · 2 photos ✓").wait_for(timeout=60_000)

    page.get_by_text("Layout: where each person goes").click()
    page.locator("#layout-preset").get_by_text("Side by side").click()
    boxes = page.locator("#layout-boxes textarea")
    page.wait_for_function("document.querySelector('#layout-boxes textarea').value === '0,0,0.5,1 | 0.5,0,1,1'",
                           timeout=10_000)
    page.wait_for_function("document.querySelectorAll('#layout-canvas .fc-box').length === 2", timeout=10_000)
    assert page.locator("#layout-canvas .fc-name").first.inner_text() == "1: woman"

    # Drag the man's box by its corner: up and to the left, so it ends at about 3/4 of the width and height
    page.locator("#layout-canvas").scroll_into_view_if_needed()  # mouse coordinates are the viewport's
    handle = page.locator("#layout-canvas .fc-box[data-k='1'] .fc-handle").bounding_box()
    stage = page.locator("#layout-canvas .fc-stage").bounding_box()
    page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
    page.mouse.down()
    page.mouse.move(stage["x"] + 0.75 * stage["width"], stage["y"] + 0.75 * stage["height"], steps=8)
    page.mouse.up()
    page.wait_for_function(
        "document.querySelector('#layout-boxes textarea').value.startsWith('0,0,0.5,1 | 0.5,0,0.7')", timeout=10_000)
    page.wait_for_function("document.querySelector('#layout-preset input[value=custom]').checked", timeout=10_000)
    # Typing redraws the canvas
    boxes.fill("0,0,0.4,1 | 0.6,0,1,1")
    boxes.press("Enter")
    page.wait_for_function("document.querySelector('#layout-canvas .fc-box[data-k=\"0\"]').style.width === '40%'",
                           timeout=10_000)
    page.locator("#keep-apart input[type=checkbox]").check()
    page.locator("#attention input[type=checkbox]").check()
    page.locator("#refine input[type=checkbox]").check()  # the face pass (off by default on a CPU)
    page.get_by_text("Advanced settings").click()
    for elem, value in (("steps", "2"), ("width", "256"), ("height", "256")):
        set_number(page, elem, value)
    page.locator("#generate").click()
    page.get_by_text("image(s) · seed").wait_for(timeout=120_000)
    page.locator("#gallery").get_by_text("map of image 1").wait_for(timeout=10_000)
    page.locator("#gallery").get_by_text("refine").first.wait_for(timeout=10_000)  # the pass's word in the caption
    page.locator("#layout").scroll_into_view_if_needed()
    screenshot(page, tmp_path, "layout-1400")
    page.set_viewport_size({"width": 390, "height": 844})
    time.sleep(0.5)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    stage = page.locator("#layout-canvas .fc-stage").bounding_box()
    assert stage["x"] >= 0 and stage["x"] + stage["width"] <= 390
    page.locator("#layout").scroll_into_view_if_needed()
    screenshot(page, tmp_path, "layout-390", full_page=False)
    page.close()


def test_examples_table_download_all_and_accessibility_at_two_widths(browser, url, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
    page.goto(url, wait_until="load")
    page.locator("#generate").wait_for(timeout=30_000)

    # The table: each subject's photo under its own header, nothing under subject 2 for one-subject examples
    table = page.locator("#examples table")
    assert [t.strip() for t in table.locator("thead th").all_inner_texts()] == ["Prompt", "Subject 1", "Subject 2"]
    cells = [[cell.locator("img") for cell in row.locator("td").all()] for row in table.locator("tbody tr").all()]
    photos = [[c.get_attribute("src").rsplit("/", 1)[-1] if c.count() else None for c in row[1:]] for row in cells]
    assert photos == [[first, second] for _, first, second in app_module.EXAMPLES]
    table.scroll_into_view_if_needed()
    screenshot(page, tmp_path, "examples-1400", element="#examples")

    # A click fills each slot with its subject's photo, numbered within that subject
    table.locator("tbody tr").nth(1).click()
    page.wait_for_function("document.querySelectorAll('#photo-1 img').length === 1"
                           " && document.querySelectorAll('#photo-2 img').length === 1", timeout=30_000)
    assert "grace_hopper" in page.locator("#photo-2 img").get_attribute("src")
    for k in (1, 2):
        page.locator(f"#status-{k}").get_by_text("photo 1: face found ✓").wait_for(timeout=60_000)
        assert "photo 2" not in page.locator(f"#status-{k}").inner_text()
    page.get_by_text("2 subjects in prompt · 2 photos ✓").wait_for(timeout=30_000)
    # A one-subject example then empties subject 2's slot
    table.locator("tbody tr").nth(0).click()
    page.wait_for_function("document.querySelectorAll('#photo-2 img').length === 0", timeout=30_000)
    page.get_by_text("1 subject in prompt · 1 photo ✓").wait_for(timeout=30_000)

    # Generate, then Download all: a zip of the images, each PNG with its settings
    page.get_by_text("Advanced settings").click()
    for elem, value in (("steps", "2"), ("width", "256"), ("height", "256")):
        set_number(page, elem, value)
    page.locator("#generate").click()
    page.get_by_text("image(s) · seed").wait_for(timeout=120_000)
    page.locator("#download-all").wait_for(state="visible", timeout=30_000)
    with page.expect_download(timeout=30_000) as download:
        page.locator("#download-all").click()
    saved = tmp_path / "all.zip"
    download.value.save_as(saved)
    with zipfile.ZipFile(saved) as archive:
        names = archive.namelist()
        assert len(names) == 1 and names[0].endswith(".png")
        record = read_record(archive.read(names[0]))
    assert record is not None and record.prompt == EXAMPLES_ONE_SUBJECT and record.num_inference_steps == 2

    # The accessibility scan, with the folded sections open: nothing but Gradio's own known findings
    page.get_by_text("Layout: where each person goes").click()
    assert accessibility_problems(page) == []
    page.set_viewport_size({"width": 390, "height": 844})
    time.sleep(0.5)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    box = page.locator("#examples table").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390  # the whole table in view on a phone
    assert accessibility_problems(page) == []
    table.scroll_into_view_if_needed()
    screenshot(page, tmp_path, "examples-390", element="#examples")
    page.close()


EXAMPLES_ONE_SUBJECT = app_module.EXAMPLES[0][0]

# What the scan reports inside Gradio 6.31's own markup, not fixable from a page: (rule, a piece of the element)
GRADIO_FINDINGS = {
    ("nested-interactive", 'aria-label="Click to Upload"'),  # a gallery's upload button wraps its file input
    # Gradio gives a gallery image its caption as alt text beside the caption itself, and the footer's icons the
    # words of their links ("Runs", "Settings"): said twice to a screen reader, a minor finding
    ("image-redundant-alt", "<img "),
}


def accessibility_problems(page) -> list[str]:
    """axe-core's violations on the page, less the known ones in Gradio's markup: 'rule: element' lines."""
    from axe_playwright_python.sync_playwright import Axe

    problems = []
    for violation in Axe().run(page).response["violations"]:
        for node in violation["nodes"]:
            if not any(rule == violation["id"] and piece in node["html"] for rule, piece in GRADIO_FINDINGS):
                problems.append(f"{violation['id']}: {' '.join(map(str, node['target']))} {node['html'][-160:]}")
    return problems


IMAGES_LOADED = "[...document.querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth > 0)"

# Text inside a component that its own box cuts off (the restore drop zone used to lose its lower half)
CLIPPED_TEXT = """(selector) => {
    const root = document.querySelector(selector);
    const out = [];
    for (const el of root.querySelectorAll('*')) {
        if (!el.childNodes.length || ![...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim())) continue;
        const r = el.getBoundingClientRect();
        if (!r.height || !el.checkVisibility()) continue;
        for (let p = el.parentElement; p && p !== root.parentElement; p = p.parentElement) {
            const s = getComputedStyle(p);
            if (s.overflow === 'visible' && s.overflowY === 'visible') continue;
            const b = p.getBoundingClientRect();
            if (r.bottom > b.bottom + 1 || r.top < b.top - 1) { out.push(el.textContent.trim()); break; }
        }
    }
    return out;
}"""


def prepare(page, url: str, steps: int) -> None:
    """Open the page, upload the astronaut, write a one-subject prompt, set a small size and `steps`."""
    page.goto(url, wait_until="load")  # not "networkidle": the page keeps a heartbeat connection open
    page.locator("#generate").wait_for(timeout=30_000)

    # Upload the astronaut photo into slot 1: the crop preview appears with a status.
    upload(page, 1, "astronaut.png")
    page.locator("#preview-1 img").first.wait_for(state="visible", timeout=60_000)
    page.get_by_text("photo 1: face found ✓").wait_for(timeout=30_000)

    # The live hint agrees once the prompt has one marker.
    page.locator("#prompt textarea").fill("a woman img in a garden")
    page.get_by_text("1 subject in prompt · 1 photo ✓").wait_for(timeout=30_000)

    # Few steps and a small size keep the tiny model quick; the settings live in the folded accordion.
    page.get_by_text("Advanced settings").click()
    for elem, value in (("steps", str(steps)), ("width", "256"), ("height", "256")):
        set_number(page, elem, value)


def upload(page, slot: int, *names: str) -> None:
    """Put bundled photos into a slot's gallery, as a file chooser would."""
    page.locator(f"#photo-{slot} input[type=file]").first.set_input_files([str(ROOT / "assets" / n) for n in names])


def set_number(page, elem: str, value: str) -> None:
    """Type a number and commit it. A folded section's numbers can be reset to their first value while the section
    is first drawn (now and then, just after it opens), so the value is checked a moment later and typed again."""
    box = page.locator(f"#{elem} input[type=number]")
    for _ in range(3):
        box.fill(value)
        box.press("Enter")
        page.wait_for_timeout(300)
        if box.input_value() == value:
            return
    raise AssertionError(f"#{elem} keeps {box.input_value()!r}, not {value!r}")


def screenshot(page, tmp_path: Path, name: str, full_page: bool = True, element: str | None = None) -> Path:
    """Save a screenshot in tmp_path and, when $FASTCOMPOSER_ARTIFACTS is set, there too."""
    shot = tmp_path / f"{name}.png"
    if element:
        page.locator(element).screenshot(path=str(shot))
    else:
        page.screenshot(path=str(shot), full_page=full_page)
    artifacts = os.environ.get("FASTCOMPOSER_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / shot.name)
    return shot
