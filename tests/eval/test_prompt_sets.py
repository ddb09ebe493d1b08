"""Prompt sets by name: the published wordings, and every task's summary naming its set and mode."""
import json

import pytest
from eval_fakes import FakeVLM, write_image

from eval import pope, refcoco, vsr
from eval.harness import combined_markdown
from eval.io import RunOptions
from eval.prompt_sets import PROMPT_SETS, prompt_set
from vlm.data.formats import PopeQuestion, RefExpr, VsrItem


def test_lmms_eval_wordings():
    lmms = prompt_set("lmms-eval")
    assert lmms.pope("Is there a dog in the image?") == \
        "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    assert lmms.refcoco("the left dog") == (
        "Bounding box coordinates are specified in the format (top-left x, top-left y, bottom-right x, bottom-right y). "
        "All values are floating point numbers bounded between 0 and 1. Please provide the bounding box coordinate of "
        "the region this sentence describes: the left dog")
    assert lmms.vsr("The cat is on the mat.") == \
        'Based on the image, is this statement "True" or "False"? The cat is on the mat.\nRespond with "True" or "False" directly.'
    assert lmms.caption == "Provide a one-sentence caption for the provided image."
    assert prompt_set("world").pope("Is there a dog in the image?") == \
        "Is there a dog in the image? Answer the question using a single word or phrase."
    with pytest.raises(ValueError, match="world, lmms-eval"):
        prompt_set("llava")
    with pytest.raises(ValueError, match="unknown prompt set"):
        RunOptions(prompt_set="lmms")


@pytest.mark.parametrize("name", list(PROMPT_SETS))
@pytest.mark.parametrize("mode", ["score", "generate"])
def test_tasks_ask_with_the_set_and_say_so(tmp_path, name, mode):
    """POPE, VSR and RefCOCO ask the set's wording (the fake answers only to it) and their summaries
    and tables name the mode and the prompt set."""
    write_image(tmp_path / "1.png", 1)
    ask = PROMPT_SETS[name]
    q = PopeQuestion(1, "1.png", "Is there a dog in the image?", "yes")
    st = VsrItem("1.png", "The dog is left of the cat.", 0, "left of")
    ref = RefExpr(1, 1, 1, "1.png", ["the dog"], (0.0, 0.0, 4.0, 4.0), "val", 8, 8)
    model = FakeVLM(texts={(1, ask.pope(q.text)): "Yes", (1, ask.vsr(st.caption)): "False",
                           (1, ask.refcoco("the dog")): "[0.0, 0.0, 0.5, 0.5]"},
                    scores={(1, ask.pope(q.text)): [0.0, -1.0], (1, ask.vsr(st.caption)): [-1.0, 0.0]})
    options = RunOptions(progress=False, answer_mode=mode, prompt_set=name)
    p = pope.run(model, pope.PopeData({"random": [q]}, tmp_path), tmp_path / "o", options=options)
    v = vsr.run(model, vsr.VsrData([st], tmp_path), tmp_path / "o", options=options)
    r = refcoco.run(model, refcoco.RefcocoData([ref], tmp_path), tmp_path / "o", options=options)
    assert p["random"]["accuracy"] == v["accuracy"] == r["acc"] == 1.0
    assert (p["mode"], p["prompt_set"], v["mode"], v["prompt_set"], r["prompt_set"]) == (mode, name, mode, name, name)
    assert f"({mode}, prompt set {name})" in (tmp_path / "o" / "pope" / "summary.md").read_text()
    record = json.loads((tmp_path / "o" / "vsr" / "predictions.jsonl").read_text())
    assert record["prompt"] == ask.vsr(st.caption)
    table = combined_markdown({"pope": p, "vsr": v, "data": "x", "checkpoint": "c", "wall_s": {"pope": 0, "vsr": 0}},
                              ["pope", "vsr"])
    assert f"| {mode}, {name} |" in table.replace("  ", " ")
