"""Caption metrics equal pycocoevalcap's own numbers; hand-checkable identical-caption case.

The Java tokenizer and METEOR take seconds, so everything is computed once per module.
"""
import contextlib
import io

import pytest

from eval.captioning import METRICS, meteor_scorer, score_captions, spice_status

REFS = {
    1: ["a small red circle above a blue square", "a red circle and a blue square"],
    2: ["two green triangles next to each other", "a pair of green triangles"],
    3: ["a large yellow star on a grey background"],
    4: ["the purple heart is left of the orange cross", "a purple heart and an orange cross"],
}
PREDS = {
    1: "a red circle above a square",
    2: "two green triangles.",
    3: "a large yellow star on a grey background",  # identical to its only reference
    4: "",  # an empty caption
}


@pytest.fixture(scope="module")
def ours():
    return score_captions(REFS, PREDS)


@pytest.fixture(scope="module")
def direct():
    """pycocoevalcap used directly, the way COCOEvalCap does, on the same inputs."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    # The reference tokenizer cannot take an empty caption as the last line: tokenize the others.
    res = tok.tokenize({k: [{"caption": v}] for k, v in PREDS.items() if v})
    res[4] = [""]
    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        b, _ = Bleu(4).compute_score(gts, res)
    out.update({f"BLEU_{i + 1}": b[i] for i in range(4)})
    # pycocoevalcap's own Meteor; the process ours started is reused (its JVM start costs 10+ s).
    out["METEOR"], _ = meteor_scorer().compute_score(gts, res)
    out["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    out["CIDEr"], _ = Cider().compute_score(gts, res)
    return out


def test_equals_pycocoevalcap(ours, direct):
    summary, _ = ours
    for m in METRICS:
        assert summary[m] == pytest.approx(direct[m], rel=1e-9, abs=1e-12), m
    assert summary["n_images"] == 4


def test_identical_caption_is_perfect(ours):
    _, per_image = ours
    assert per_image[3]["BLEU_1"] == pytest.approx(1.0, abs=1e-6)
    assert per_image[3]["BLEU_4"] == pytest.approx(1.0, abs=1e-6)
    assert per_image[3]["ROUGE_L"] == pytest.approx(1.0)
    assert per_image[3]["METEOR"] > 0.9


def test_empty_caption_scores_zero(ours):
    _, per_image = ours
    for m in ("BLEU_1", "METEOR", "ROUGE_L", "CIDEr"):
        assert per_image[4][m] == pytest.approx(0.0, abs=1e-9)


def test_spice_reported_honestly(ours):
    summary, _ = ours
    available, reason = spice_status()
    if available:
        assert isinstance(summary["SPICE"], float)
    else:
        assert summary["SPICE"] == "unavailable" and summary["SPICE_reason"] == reason


def test_spice_failure_reported_unavailable(monkeypatch):
    """SPICE that is present but cannot run (e.g. on this JVM) is reported, never faked or fatal."""
    import eval.captioning as cap

    def broken(gts, res):
        raise RuntimeError("lmdbjni: no native library")

    monkeypatch.setattr(cap, "spice_status", lambda: (True, "ok"))
    monkeypatch.setattr(cap, "_run_spice", broken)
    summary, per_image = cap.score_captions({1: ["a red circle"]}, {1: "a red circle"})
    assert summary["SPICE"] == "unavailable" and "no native library" in summary["SPICE_reason"]
    assert "SPICE" not in per_image[1] and summary["BLEU_1"] == pytest.approx(1.0, abs=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="same image ids"):
        score_captions({1: ["a"]}, {2: "a"})
    with pytest.raises(ValueError, match="no reference"):
        score_captions({1: []}, {1: "a"})
