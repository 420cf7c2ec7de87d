"""The web app in-process on 127.0.0.1 with the tiny model, driven by gradio_client and HTTP."""

from __future__ import annotations

import httpx
import PIL.Image
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError, ValidationError

import app as app_module
from fastcomposer.faces import FaceCropper
from fastcomposer.metadata import read_record

from .app_helpers import ASTRONAUT, HOPPER, ROOT, Args, image_path, request


@pytest.fixture(scope="module")
def server(tiny_pipe):
    demo = app_module.create_demo(lambda: tiny_pipe, banner="test banner",
                                  cropper=FaceCropper(allow_download=False))
    app_module.launch(demo, Args(), prevent_thread_lock=True, quiet=True)
    yield demo, demo.local_url
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server[1], verbose=False)


def test_one_subject_two_images_with_seed_in_png_metadata(client):
    gallery, seed, status = client.predict(**request(num_images=2, seed=1234), api_name="/generate")
    assert len(gallery) == 2 and seed == 1234 and "seed 1234" in status
    for k, item in enumerate(gallery):
        path = image_path(item)
        assert path.endswith(".png")
        image = PIL.Image.open(path)
        assert image.size == (256, 256)
        record = read_record(path)
        assert record is not None and record.seed == 1234 and record.image_index == k
        assert record.prompt == "a woman img reading" and record.num_inference_steps == 2


def test_two_subjects(client):
    gallery, seed, _ = client.predict(
        **request(prompt="a woman img and a woman img having tea", photo_2=handle_file(HOPPER), num_images=1),
        api_name="/generate",
    )
    assert len(gallery) == 1 and 0 <= seed < 2**31


def test_random_seed_is_reported_and_reusable(client):
    _, seed_a, _ = client.predict(**request(seed=-1), api_name="/generate")
    gallery_b, seed_b, _ = client.predict(**request(seed=seed_a), api_name="/generate")
    gallery_c, _, _ = client.predict(**request(seed=seed_a), api_name="/generate")
    assert seed_b == seed_a
    a, c = PIL.Image.open(image_path(gallery_b[0])), PIL.Image.open(image_path(gallery_c[0]))
    assert list(a.getdata()) == list(c.getdata())


def test_mismatched_counts_are_refused_before_the_queue_with_both_counts(client):
    """gradio's validator runs before the job is queued; the handler checks again for direct calls."""
    with pytest.raises(ValidationError) as err:
        client.predict(**request(prompt="a man img and a woman img"), api_name="/generate")
    message = str(err.value)
    assert "2 subjects in prompt" in message and "1 photo" in message and "add a photo or remove an `img`" in message


def test_no_face_found_names_the_photo_and_offers_the_whole_photo(client, tmp_path):
    blank = tmp_path / "wall.png"
    PIL.Image.new("RGB", (300, 300), (200, 190, 180)).save(blank)
    with pytest.raises(AppError, match="photo 1.*Use whole photo"):
        client.predict(**request(photo_1=handle_file(str(blank))), api_name="/generate")
    gallery, _, _ = client.predict(**request(photo_1=handle_file(str(blank)), whole_1=True), api_name="/generate")
    assert len(gallery) == 1


def test_a_bad_upload_is_named_by_its_slot_never_by_its_path(client, tmp_path):
    fake = tmp_path / "secret-name.png"
    fake.write_bytes(b"not an image")
    with pytest.raises(AppError) as err:
        client.predict(**request(prompt="a woman img and a woman img", photo_2=handle_file(str(fake))),
                       api_name="/generate")
    message = str(err.value)
    assert "photo 2 is not a supported image" in message and "upload it again" in message
    assert "secret-name" not in message and "/tmp" not in message and "--image" not in message


def test_hint_endpoint(client):
    text = client.predict("a woman img", handle_file(ASTRONAUT), None, None, None, api_name="/hint")
    assert "1 subject in prompt · 1 photo ✓" in text
    text = client.predict("a man img and a woman img", handle_file(ASTRONAUT), None, None, None, api_name="/hint")
    assert "add a photo or remove an `img`" in text


def test_restore_settings_from_a_generated_png(client):
    gallery, seed, _ = client.predict(**request(seed=77, alpha=0.6), api_name="/generate")
    path = image_path(gallery[0])
    restored = client.predict(handle_file(path), api_name="/restore_settings")
    assert restored[0] == "a woman img reading" and restored[2] == 0.6 and restored[6] == 77


def test_banner_and_consent_are_on_the_page(server):
    html = httpx.get(server[1]).text
    config = httpx.get(server[1] + "config").json()
    texts = " ".join(str(c.get("props", {}).get("value", "")) for c in config["components"])
    assert "test banner" in texts and "agreed" in texts
    assert html  # the page itself is served


def test_server_settings(server):
    demo, url = server
    assert demo.delete_cache == (3600, 3600)
    # api_open=False: the REST route that would skip the queue (and its limits) is closed
    response = httpx.post(url + "gradio_api/api/generate", json={"data": []})
    assert response.status_code == 404 and "join the queue" in response.text
    assert httpx.get(url + f"gradio_api/file={ROOT / 'app.py'}").status_code == 403
    assert httpx.get(url + "gradio_api/file=/etc/passwd").status_code == 403
    assert httpx.get(url + f"gradio_api/file={ASTRONAUT}").status_code == 200  # assets/ is served
