"""The web app in-process on 127.0.0.1 with the tiny model, driven by gradio_client and HTTP."""

from __future__ import annotations

import re

import httpx
import numpy as np
import PIL.Image
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError, ValidationError

import app as app_module
from fastcomposer.generation.metadata import read_record
from fastcomposer.inputs.faces import FaceCropper

from .app_helpers import ASTRONAUT, HOPPER, ROOT, Args, image_path, photos, request


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
        **request(prompt="a woman img and a woman img having tea", photo_2=photos(HOPPER), num_images=1),
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
        client.predict(**request(photo_1=photos(blank)), api_name="/generate")
    gallery, _, _ = client.predict(**request(photo_1=photos(blank), whole_1=[1]), api_name="/generate")
    assert len(gallery) == 1


def test_a_bad_upload_is_named_by_its_slot_never_by_its_path(client, tmp_path):
    fake = tmp_path / "secret-name.png"
    fake.write_bytes(b"not an image")
    with pytest.raises(AppError) as err:
        client.predict(**request(prompt="a woman img and a woman img", photo_2=photos(fake)),
                       api_name="/generate")
    message = str(err.value)
    assert "photo 2 is not a supported image" in message and "upload it again" in message
    assert "secret-name" not in message and "/tmp" not in message and "--image" not in message


def test_hint_endpoint(client):
    text = client.predict("a woman img", photos(ASTRONAUT), None, None, None, api_name="/hint")
    assert "1 subject in prompt · 1 photo ✓" in text
    text = client.predict("a man img and a woman img", photos(ASTRONAUT), None, None, None, api_name="/hint")
    assert "add a photo or remove an `img`" in text


def test_restore_settings_from_a_generated_png(client):
    gallery, seed, _ = client.predict(**request(seed=77, alpha=0.6, crop_margin=1.8), api_name="/generate")
    path = image_path(gallery[0])
    restored = client.predict(handle_file(path), api_name="/restore_settings")
    assert restored[0] == "a woman img reading" and restored[2] == 0.6 and restored[6] == 77
    assert restored[15] == 1.8  # the Crop slider
    assert restored[16:18] == ("", False)  # no layout boxes, not kept apart
    assert restored[18] is False  # no face pass (its strength slider is left as it is)


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


# -- several photos per subject, and what the model did ----------------------------------------------------


def pixels(item) -> np.ndarray:
    return np.asarray(PIL.Image.open(image_path(item)).convert("RGB"))


def test_two_photos_for_one_subject_and_one_for_another(client):
    text = client.predict("a woman img and a woman img", photos(ASTRONAUT, HOPPER), photos(HOPPER), None, None,
                          api_name="/hint")
    assert "2 subjects in prompt · photos of 2 subjects (3 photos) ✓" in text  # subjects are counted, not photos
    gallery, seed, status = client.predict(
        **request(prompt="a woman img and a woman img having tea", photo_1=photos(ASTRONAUT, HOPPER),
                  photo_2=photos(HOPPER), seed=3),
        api_name="/generate")
    assert len(gallery) == 1 and seed == 3 and status.startswith("1 image(s)")
    assert read_record(image_path(gallery[0])).photos_per_subject == [2, 1]


def test_a_subject_with_too_many_photos_is_refused_before_the_queue(client):
    with pytest.raises(ValidationError, match="subject 1 has 5 photos; give 1 to 4 photos per subject"):
        client.predict(**request(photo_1=photos(*[ASTRONAUT] * 5)), api_name="/generate")


def test_whole_photo_is_chosen_per_photo(client, tmp_path):
    blank = tmp_path / "wall.png"
    PIL.Image.new("RGB", (300, 300), (200, 190, 180)).save(blank)
    with pytest.raises(AppError, match="photo 2 of subject 1.*Use whole photo"):
        client.predict(**request(photo_1=photos(ASTRONAUT, blank)), api_name="/generate")
    gallery, _, _ = client.predict(**request(photo_1=photos(ASTRONAUT, blank), whole_1=[2]), api_name="/generate")
    assert read_record(image_path(gallery[0])).photos_per_subject == [2]


def test_attention_maps_come_beside_each_image_and_change_no_pixel(client):
    plain, _, _ = client.predict(**request(seed=21, num_images=2), api_name="/generate")
    gallery, _, _ = client.predict(**request(seed=21, num_images=2, attention_maps=True), api_name="/generate")
    assert [item["caption"] for item in gallery] == [None, "map of image 1", None, "map of image 2"]
    for k in range(2):
        image, overlay = pixels(gallery[2 * k]), pixels(gallery[2 * k + 1])
        np.testing.assert_array_equal(image, pixels(plain[k]))  # capturing attention does not touch the image
        assert overlay.shape[1] == image.shape[1] and overlay.shape[0] > image.shape[0]  # the legend strip below
        assert not np.array_equal(overlay[: image.shape[0]], image)  # tinted


def test_identity_offline_says_unavailable_once_and_the_images_still_come(client, monkeypatch):
    from fastcomposer.identity import checker as identity

    from .identity_helpers import offline_checker

    monkeypatch.setattr(identity, "_default_checker", offline_checker())  # no weights, no download
    gallery, _, status = client.predict(**request(num_images=2, identity_check=True), api_name="/generate")
    assert len(gallery) == 2 and all(item["caption"] == "identity unavailable" for item in gallery)
    assert status.count("identity check unavailable") == 1 and "/" not in status.split("identity check")[1]


def test_identity_scores_are_the_captions_and_a_missing_face_says_not_found(client, monkeypatch):
    from fastcomposer.identity import checker as identity

    from .identity_helpers import offline_checker, stand_in_embedder

    monkeypatch.setattr(identity, "_default_checker", offline_checker(stand_in_embedder()))
    gallery, _, status = client.predict(**request(seed=8, identity_check=True), api_name="/generate")
    caption = gallery[0]["caption"]
    assert re.fullmatch(r"woman (-?\d\.\d\d|not found|no reference face)", caption), caption
    stored = identity.IdentityReport.from_dict(read_record(image_path(gallery[0])).identity)
    assert stored.summary() == caption and "unavailable" not in status


def test_alpha_sweep_gives_a_grid_then_one_image_per_alpha_each_a_single_run(client):
    gallery, seed, status = client.predict(**request(seed=5, alpha_sweep="0.5, 0.9"), api_name="/generate")
    assert seed == 5 and status.startswith("alpha sweep: 2 alphas x 1 image(s) · seed 5")
    assert [item["caption"] for item in gallery] == ["alpha sweep · seed 5", "α 0.50", "α 0.90"]
    grid = PIL.Image.open(image_path(gallery[0]))
    assert grid.width > 2 * 256 * 0.9  # two 256 px columns side by side
    for item, alpha in zip(gallery[1:], (0.5, 0.9)):
        assert read_record(image_path(item)).alpha == alpha and read_record(image_path(item)).seed == 5
        single, _, _ = client.predict(**request(seed=5, alpha=alpha), api_name="/generate")
        np.testing.assert_array_equal(pixels(item), pixels(single[0]))


def test_a_sweep_over_the_compute_budget_is_refused_with_the_numbers(client):
    with pytest.raises((ValidationError, AppError)) as err:
        client.predict(**request(alpha_sweep="0.2, 0.4, 0.6, 0.8", num_images=4, steps=20, width=512, height=512),
                       api_name="/generate")
    message = str(err.value)
    assert "alpha sweep is too large: 4 alphas x 4 image(s) x 20 steps at 512x512 make 320 image-steps" in message
    assert "may take 200" in message  # each alpha alone (80) would pass: every run counts
    with pytest.raises((ValidationError, AppError), match="not a list of numbers"):
        client.predict(**request(alpha_sweep="low, high"), api_name="/generate")
    gallery, _, _ = client.predict(**request(), api_name="/generate")  # the next request works
    assert len(gallery) == 1


def test_a_fractional_seed_is_refused_in_words_and_the_next_request_runs(client, tiny_pipe):
    """Gradio's Number would round 2.5 to 2 on its own (with `precision=0`): the seed box keeps the value, and the
    request's check says what is wrong."""
    with pytest.raises(AppError, match=r"seed must be a whole number from -1 \(random\) to 2147483647, got 2.5"):
        client.predict(**request(seed=2.5), api_name="/generate")
    gallery, seed, _ = client.predict(**request(seed=3.0), api_name="/generate")  # a whole number as a float is fine
    assert seed == 3 and read_record(image_path(gallery[0])).seed == 3
    from fastcomposer.generation import GenerationError, GenerationRequest, validate

    with pytest.raises(GenerationError, match="`seed` must be a whole number"):
        validate(GenerationRequest("a woman img", [PIL.Image.new("RGB", (64, 64))], seed=2.5), tiny_pipe.tokenizer)
