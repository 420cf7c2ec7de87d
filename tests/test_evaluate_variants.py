"""`evaluate --variants` and `--builtin` end to end on the tiny model (stand-in CLIP and face embedder), the paired
interval against a hand-computed example, and `--identity-model facenet`'s plumbing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from fastcomposer.evaluation.cases import BUILTIN_SUBJECTS, CATEGORIES, PAIRS, builtin_cases
from fastcomposer.evaluation.errors import EvaluationError
from fastcomposer.evaluation.stats import paired_differences, paired_interval
from fastcomposer.evaluation.variants import parse_variants
from fastcomposer.generation.metadata import read_record

from .test_evaluate import TINY, clip_dir, run, stand_ins  # noqa: F401  (clip_dir: a fixture)


def test_the_paired_interval_of_a_hand_computed_example():
    # d = 0.1, 0.2, 0.3, 0.4: mean 0.25; sd = sqrt((0.15² + 0.05² + 0.05² + 0.15²) / 3) = 0.129099;
    # t(0.975, 3) = 3.182446 (tables); half width = 3.182446 * 0.129099 / 2 = 0.205428
    got = paired_interval([0.1, 0.2, 0.3, 0.4])
    assert got["pairs"] == 4 and got["mean"] == pytest.approx(0.25)
    assert got["low"] == pytest.approx(0.25 - 0.205428, abs=1e-5)
    assert got["high"] == pytest.approx(0.25 + 0.205428, abs=1e-5)
    assert paired_interval([0.3]) == {"mean": 0.3, "low": None, "high": None, "pairs": 1}
    assert paired_interval([])["mean"] is None


def test_differences_pair_the_same_prompt_and_seed():
    def entry(variant, prompt, seed, value, hidden=False):
        return dict(variant=variant, case="c", prompt_index=prompt, alpha=0.5, seed=seed, identity=value,
                    hidden=hidden)

    entries = [entry("a", 0, 1, 0.5), entry("a", 0, 1, 0.7), entry("b", 0, 1, 0.4),  # pair (0, 1): 0.4 - 0.6
               entry("a", 1, 1, 0.2), entry("b", 1, 1, 0.5),  # pair (1, 1): 0.5 - 0.2
               entry("a", 2, 1, 0.9), entry("b", 2, 1, 0.1, hidden=True)]  # hidden: no pair
    assert paired_differences(entries, "b", "a", "identity") == pytest.approx([-0.2, 0.3])


def test_variant_names_and_mistakes():
    assert [v.name for v in parse_variants("original, fast,layout,separate,photos=1")] == \
        ["original", "fast", "layout", "separate", "photos=1"]
    assert [v.name for v in parse_variants("")] == ["as given"]
    with pytest.raises(EvaluationError, match="unknown variant 'quick'; the variants are original, balanced"):
        parse_variants("original,quick")
    with pytest.raises(EvaluationError, match="named once"):
        parse_variants("fast,fast")
    with pytest.raises(EvaluationError, match="variant 'lora=': a LoRA spec needs a file"):
        parse_variants("original,lora=")


def test_the_builtin_set_covers_the_papers_categories_and_pairs():
    cases = builtin_cases()
    assert [c.name for c in cases] == [*BUILTIN_SUBJECTS, "woman_and_man", "two_women"]
    for case in cases[:3]:
        assert len(case.prompts) == sum(len(p) for p in CATEGORIES.values()) == 40 and len(case.photos) == 1
    for case in cases[3:]:
        assert len(case.prompts) == len(PAIRS) == 10 and len(case.photos) == 2
        assert all(p.count("img") == 2 for p in case.prompts)
    assert [len(c.prompts) for c in builtin_cases(max_prompts=2)] == [2] * 5


@pytest.fixture(scope="module")
def compared(tmp_path_factory, clip_dir):  # noqa: F811
    out = tmp_path_factory.mktemp("variants") / "out"
    with stand_ins():
        code, stdout, stderr = run(["evaluate", "--builtin", "--max-prompts", "1", "--output", str(out),
                                    "--variants", "original,fast,layout,separate", "--num-images", "1", "--seeds",
                                    "3,4", "--clip-model", str(clip_dir), *TINY])
    assert code == 0, stderr
    return out, json.loads((out / "report.json").read_text()), stdout


def test_every_variant_runs_the_same_prompts_and_seeds(compared):
    out, report, _ = compared
    names = ["original", "fast", "layout", "separate"]
    assert list(report["variants"]) == names
    runs = {name: sorted((e["case"], e["prompt"], e["seed"]) for e in report["images"] if e["variant"] == name)
            for name in names}
    assert all(r == runs["original"] for r in runs.values()) and len(runs["original"]) == 5 * 2
    for e in report["images"]:
        record = read_record(out / e["file"])
        assert record.seed == e["seed"]
        if e["variant"] == "fast":
            assert (record.scheduler, record.num_inference_steps, record.cache_interval) == ("dpm", 20, 3)
        if e["variant"] == "original":
            assert (record.scheduler, record.num_inference_steps) == ("pndm", 50)
        if e["variant"] == "layout":
            two = e["case"] in ("woman_and_man", "two_women")
            assert record.boxes == ([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]] if two else None)
        assert record.separate == (e["variant"] == "separate")


def test_the_report_compares_each_variant_with_the_first(compared):
    out, report, stdout = compared
    variants = report["variants"]
    assert "difference" not in variants["original"]
    for name in ("fast", "layout", "separate"):
        diff = variants[name]["difference"]["identity"]
        pairs = paired_differences(report["images"], name, "original", "identity")
        assert diff["pairs"] == len(pairs) == 10
        assert diff["mean"] == pytest.approx(np.mean(pairs))
        if diff["low"] is not None:
            assert diff["low"] <= diff["mean"] <= diff["high"]
        for key in ("subject_not_found_share", "blended_share", "seconds_per_image"):
            assert variants[name][key] is not None
    markdown = (out / "report.md").read_text()
    assert "## Variants" in markdown and "| fast |" in markdown and "Δ identity (95% CI)" in markdown
    assert stdout.startswith(markdown)
    with Image.open(out / "contact_sheet.png") as sheet:
        from fastcomposer.evaluation.report import TILE

        assert sheet.width == 4 * TILE  # the variants side by side, one row per prompt and seed


def test_builtin_with_cases_dir_or_neither_is_a_clear_error(tmp_path, clip_dir):  # noqa: F811
    code, _, err = run(["evaluate", "--output", str(tmp_path / "o"), *TINY])
    assert code == 2 and "give CASES_DIR or --builtin" in err
    code, _, err = run(["evaluate", "--builtin", "--output", str(tmp_path / "o"), "--variants", "original,turbo",
                        *TINY])
    assert code == 2 and "unknown variant 'turbo'" in err


def test_facenet_offline_says_where_to_put_the_weights(tmp_path, clip_dir, monkeypatch):  # noqa: F811
    monkeypatch.setenv("FASTCOMPOSER_CACHE", str(tmp_path / "cache"))
    with stand_ins():
        code, _, err = run(["evaluate", "--builtin", "--max-prompts", "1", "--output", str(tmp_path / "o"),
                            "--identity-model", "facenet", "--clip-model", str(clip_dir), *TINY])
    assert code == 2 and "identity scoring needs FaceNet" in err and "20180402-114759-vggface2.pt" in err


def test_facenet_scores_a_run_with_random_weights(tmp_path, clip_dir):  # noqa: F811
    """The paper's metric plumbed through: a seeded random FaceNet, so the numbers mean nothing but are computed."""
    import torch

    from fastcomposer.commands.options import CLI_LIMITS
    from fastcomposer.evaluation.runner import EvaluationSettings, evaluate
    from fastcomposer.evaluation.scoring import load_prompt_scorer
    from fastcomposer.identity.facenet import InceptionResnetV1, PaperIdentity
    from fastcomposer.pipeline.loading import load_pipeline

    torch.manual_seed(0)
    scorer = PaperIdentity(model=InceptionResnetV1().eval())
    settings = EvaluationSettings(num_images=1, seeds=(1,), num_inference_steps=2, height=64, width=64,
                                  identity_model="facenet", clip_model=str(clip_dir))
    result = evaluate(builtin_cases(max_prompts=1)[:1], tmp_path / "o", settings,
                      lambda: load_pipeline("tiny", device="cpu", dtype="fp32", safety_checker=False),
                      identity=scorer, prompt_scorer=load_prompt_scorer(str(clip_dir)), limits=CLI_LIMITS)
    assert result.report["settings"]["identity_model"] == "facenet"
    assert "0.514" in result.markdown and "compare with the paper's" in result.markdown
    entry = result.report["images"][0]
    assert entry["identity"] == 0.0 and entry["num_faces"] == 0  # 64 px noise: no face, so 0, as the paper scores
    assert math.isfinite(entry["prompt_consistency"])


def test_the_whole_builtin_set_runs_end_to_end(tmp_path, clip_dir):  # noqa: F811
    """Every built-in prompt once (1 image, 1 step, 64 px on the tiny model): about half a minute here."""
    with stand_ins():
        code, stdout, stderr = run(["evaluate", "--builtin", "--output", str(tmp_path / "o"), "--num-images", "1",
                                    "--seeds", "1", "--steps", "1", "--clip-model", str(clip_dir), *TINY])
    assert code == 0, stderr
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["overall"]["images"] + report["overall"]["hidden"] == 3 * 40 + 2 * 10
    assert set(report["cases"]) == {*BUILTIN_SUBJECTS, "woman_and_man", "two_women"}
