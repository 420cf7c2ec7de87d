"""FaceNet (identity/facenet.py) against the reference implementation (facenet-pytorch 2.6.0), whose key names,
shapes and embeddings of the bundled photos under one seeded random state dict are recorded in
tests/fixtures/facenet-reference.json; and the paper's identity score written out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastcomposer.identity import facenet
from fastcomposer.identity.facenet import InceptionResnetV1, PaperIdentity, face_crops, load_facenet
from fastcomposer.identity.matching import greedy_identity

ASSETS = Path(__file__).resolve().parents[1] / "assets"
REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "facenet-reference.json").read_text())


def seeded_state(model: torch.nn.Module) -> dict:
    """The random state dict the fixture was recorded with: drawn in key order from one seeded generator."""
    g = torch.Generator().manual_seed(1234)
    state = {}
    for k, v in model.state_dict().items():
        if not v.dtype.is_floating_point:
            state[k] = v.clone()
        elif k.endswith("running_var"):
            state[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith("running_mean"):
            state[k] = 0.1 * torch.randn(v.shape, generator=g)
        else:
            state[k] = 0.05 * torch.randn(v.shape, generator=g)
    return state


@pytest.fixture(scope="module")
def seeded() -> InceptionResnetV1:
    model = InceptionResnetV1()
    model.load_state_dict(seeded_state(model), strict=True)
    return model.eval()


def test_key_names_and_shapes_are_the_reference_state_dicts():
    ours = {k: list(v.shape) for k, v in InceptionResnetV1().state_dict().items()}
    assert list(ours.items()) == list(REFERENCE["keys"].items())  # names, shapes and order: the file loads strictly


@pytest.mark.parametrize("name", ["astronaut.png", "grace_hopper.jpg", "camera.png"])
def test_embeddings_equal_the_reference_on_the_bundled_photos(seeded, name):
    image = Image.open(ASSETS / name).convert("RGB")
    want = REFERENCE["photos"][name]
    with torch.no_grad():
        got = seeded(face_crops(image, want["boxes"])).numpy()
    assert np.allclose(got, np.array(want["embeddings"]), atol=1e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0)
    # and our MTCNN finds the reference's faces (the paper's pipeline end to end)
    scorer = PaperIdentity(model=seeded)
    boxes, emb = scorer.embeddings(image)
    assert np.allclose(np.array(boxes), np.array(want["boxes"]), atol=0.01)
    assert np.allclose(emb, np.array(want["embeddings"]), atol=1e-5)


def test_the_released_layout_loads_strictly_and_a_wrong_file_is_refused(seeded, tmp_path):
    path = tmp_path / facenet.FACENET.name
    torch.save(seeded.state_dict(), path)
    loaded = load_facenet(path)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.allclose(loaded(x), seeded(x))
    partial = {k: v for k, v in seeded.state_dict().items() if not k.startswith("block8.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(facenet.FaceNetWeightsError, match="not a FaceNet"):
        load_facenet(tmp_path / "partial.pt")
    source = Path(facenet.__file__).read_text()
    assert "weights_only=True" in source and "weights_only=False" not in source


def test_offline_it_says_where_to_put_the_file(tmp_path):
    scorer = PaperIdentity(cache_dir=tmp_path, allow_download=False)
    reason = scorer.unavailable_reason()
    assert reason and facenet.FACENET.name in reason and str(tmp_path) in reason


def test_the_paper_score_written_out(seeded):
    """Largest faces first, as many as subjects; cosine clamped at 0; greedy pairs; the worst subject; no face: 0."""
    scorer = PaperIdentity(model=seeded)
    photos = {n: Image.open(ASSETS / n).convert("RGB") for n in ("astronaut.png", "grace_hopper.jpg")}
    refs = np.stack([scorer.reference(photos["astronaut.png"]), scorer.reference(photos["grace_hopper.jpg"])])
    scene = Image.new("RGB", (1024, 600), (128, 128, 128))
    scene.paste(photos["astronaut.png"], (0, 0))
    scene.paste(photos["grace_hopper.jpg"].resize((300, 400)), (620, 100))
    result = scorer.score(scene, refs)
    boxes, emb = scorer.embeddings(scene)
    sim = np.clip(emb[:2] @ refs.T, 0, None)
    # greedy by hand: the best pair first, then the remaining one
    i, j = np.unravel_index(np.argmax(sim), sim.shape)
    rest = sim[1 - i, 1 - j]
    per_subject = {j: sim[i, j], 1 - j: rest}
    assert result["identity"] == pytest.approx(min(per_subject.values()))
    assert result["subjects"] == pytest.approx([per_subject[0], per_subject[1]])
    assert result["num_faces"] == len(boxes) >= 2
    blank = scorer.score(Image.new("RGB", (256, 256), (90, 90, 90)), refs)
    assert blank == {"identity": 0.0, "subjects": [0.0, 0.0], "num_faces": 0, "blended": False}
    one = scorer.score(photos["astronaut.png"], refs)  # one face for two subjects: the other scores 0
    assert one["identity"] == 0.0 and max(one["subjects"]) > 0


def test_greedy_identity_on_a_hand_made_matrix():
    sim = np.array([[0.9, 0.8], [0.85, 0.1]])  # greedy: (0,0)=0.9 first, then (1,1)=0.1 -> min 0.1
    assert greedy_identity(sim, 2) == (pytest.approx(0.1), pytest.approx([0.9, 0.1]))
