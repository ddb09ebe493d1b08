"""The text-context probe on hand-built cases: a reader that answers from the caption scores 1,
one that always says "No" scores the share of "No" questions; prompts are stage two's minus the image."""
import re

import pytest
import torch

from eval.text_probe import ProbeItem, load_items, probe_metrics, run_text_probe, score_choices, text_processor
from vlm.config import WorldConfig
from vlm.data.prompts import NO, TRUE, YES, pope_prompt
from vlm.data.tokenizer import train_bpe_tokenizer
from vlm.world.export import export_world
from vlm.world.generator import generate_sample
from vlm.world.mix import context_statements

CAPTIONS = ["A red star and a blue circle.", "Two green hearts."]
SHAPES_ASKED = ["star", "heart", "circle", "ring"]


@pytest.fixture(scope="module")
def tokenizer():
    texts = CAPTIONS + [pope_prompt(f"Is there a {s} in the image?") for s in SHAPES_ASKED] + [YES, NO, TRUE, "False"]
    return train_bpe_tokenizer(texts * 3, vocab_size=600, extra_special_tokens=("<image>",), add_bos=True, add_eos=True)


class CaptionReader(torch.nn.Module):
    """A fake causal LM: after a prompt it puts all its mass on "Yes" when the asked shape is in the
    caption line (the text before the first newline) and on "No" otherwise; ``always_no`` ignores it."""

    def __init__(self, tokenizer, always_no: bool = False):
        super().__init__()
        self.tok, self.always_no = tokenizer, always_no
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.yes, self.no = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (YES, NO))
        self.prompts = []

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, len(self.tok))
        for b in range(input_ids.shape[0]):
            ids = input_ids[b][attention_mask[b].bool()].tolist()
            for t in range(len(ids)):
                text = self.tok.decode(ids[: t + 1])
                if text.endswith("phrase.\n"):
                    self.prompts.append(text)
                    caption, question = text.split("\n", 1)
                    shape = re.search(r"Is there an? (\w+)", question)[1]
                    yes = shape in caption and not self.always_no
                    logits[b, t, self.yes if yes else self.no] = 10.0
        return type("Out", (), {"logits": logits})


def items():
    out = []
    for caption, present in zip(CAPTIONS, [{"star", "circle"}, {"heart"}]):
        for shape in SHAPES_ASKED:
            out.append(ProbeItem(f"{caption}\n{pope_prompt(f'Is there a {shape} in the image?')}", shape in present,
                                 "random", "", "x.jpg"))
    return {"random": out}


def test_a_caption_reader_scores_one_and_a_no_sayer_the_share_of_no(tokenizer, tmp_path):
    reader = CaptionReader(tokenizer)
    summary = run_text_probe(reader, tokenizer, items(), out_dir=tmp_path)
    assert summary["text_probe_pope_acc"] == 1.0 and summary["text_probe_pope_yes_ratio"] == 3 / 8
    assert (tmp_path / "text_probe" / "predictions.jsonl").is_file()
    # the prompt the LM saw: stage two's text format with the caption where the image goes
    assert reader.prompts[0] == f"<s>{CAPTIONS[0]}\n{pope_prompt('Is there a star in the image?')}\n"
    no_sayer = run_text_probe(CaptionReader(tokenizer, always_no=True), tokenizer, items())
    assert no_sayer["text_probe_pope_acc"] == 5 / 8 and no_sayer["text_probe_pope_yes_ratio"] == 0.0


def test_score_choices_sums_the_choice_log_probs(tokenizer):
    logp = score_choices(CaptionReader(tokenizer), text_processor(tokenizer), [items()["random"][0].prompt], [YES, NO])
    assert logp.shape == (1, 2) and logp[0, 0] > -0.05 and logp[0, 1] < -9


def test_vsr_metrics_in_the_summary():
    recs = {"vsr": [{"answer": True, "gold": True, "relation": "above", "margin": 1.0, "correct": True, "decided": False},
                    {"answer": True, "gold": False, "relation": "below", "margin": 0.5, "correct": False, "decided": True},
                    {"answer": False, "gold": False, "relation": "below", "margin": -0.5, "correct": True, "decided": True}]}
    summary = probe_metrics(recs, "score")
    assert summary["text_probe_vsr_acc"] == 2 / 3 and "text_probe_pope_acc" not in summary
    assert summary["text_probe_vsr_decided_acc"] == 0.5 and summary["text_probe_vsr_decided_n"] == 2


def test_load_items_puts_each_eval_images_caption_before_its_question(tmp_path):
    cfg = WorldConfig(n_train=6, n_eval=5, seed=7)
    export_world(tmp_path, cfg, progress=False)
    got = load_items(tmp_path)
    assert set(got) == {"random", "popular", "adversarial", "vsr"} and got["vsr"]
    for split, its in got.items():
        for it in its:
            index = int(it.image.split(".")[0])
            assert index >= cfg.n_train  # eval split only
            sample = generate_sample(index, cfg.seed, cfg)
            context, question = it.prompt.split("\n", 1)
            assert context == (sample.long_caption if split == "vsr" else sample.captions["short"])
            assert question.startswith("The " if split == "vsr" else "Is there")
            if split == "vsr":  # decided: the long caption states the relation, its converse or its opposite
                stated = {st.text for st in context_statements(sample, cfg.image_size)}
                assert it.decided == (question.split(" Is this")[0] in stated)
    assert sum(it.gold for it in got["random"]) * 2 == len(got["random"])
    assert 0 < sum(it.decided for it in got["vsr"]) < len(got["vsr"])
