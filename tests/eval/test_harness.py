"""run_vlm_eval end to end on a tiny exported world with an oracle model, and input validation."""
import hashlib
import json
import shutil

import pytest
import torch
from eval_fakes import FakeVLM, write_image

from eval.grounding_attention import patch_mask
from eval.harness import load_task_data, resolve_sources, run_vlm_eval
from eval.io import load_image
from eval.parsing import parse_box
from eval.tasks import VLM_TASKS
from vlm.config import WorldConfig
from vlm.data.formats import (FormatError, PopeQuestion, read_coco_captions, read_pope, read_refcoco, read_vsr,
                              write_coco_captions, write_coco_instances, write_pope)
from vlm.data.prompts import CAPTION_PROMPT, FALSE, NO, TRUE, YES, format_box, grounding_prompt, pope_prompt, vsr_prompt


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vlm.world.export import export_world

    out = tmp_path_factory.mktemp("world")
    export_world(out, WorldConfig(n_train=16, n_eval=8), progress=False)
    return out


def _key(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().numpy().tobytes()).hexdigest()


class OracleVLM(FakeVLM):
    """Answers from the world's own annotations: the first reference caption, the true box, the gold
    yes/no and true/false (images recognised by the hash of their pixels)."""

    def __init__(self, world):
        super().__init__()
        images = world / "images"
        file_of = {}
        caps = read_coco_captions(world / "coco" / "captions_val.json")
        self.caption = {}
        for i, f in caps.images.items():
            file_of[f] = _key(self.image_transform(load_image(images / f)))
            self.caption[file_of[f]] = caps.captions[i][0]
        self.answers = {}
        for split in ("random", "popular", "adversarial"):
            for q in read_pope(world / "pope" / f"{split}.jsonl"):
                self.answers[(file_of[q.image], pope_prompt(q.text))] = q.label == "yes"
        for it in read_vsr(world / "vsr" / "test.jsonl"):
            self.answers[(file_of[it.image], vsr_prompt(it.caption))] = bool(it.label)
        self.boxes = {}
        for r in read_refcoco(world / "refcoco" / "refs.json", world / "refcoco" / "instances.json"):
            x, y, w, h = r.bbox_xywh
            for s in r.sentences:
                self.boxes[(file_of[r.file_name], grounding_prompt(s))] = format_box(
                    (x / r.width, y / r.height, (x + w) / r.width, (y + h) / r.height))

    def generate(self, pixel_values, prompts, max_new_tokens=32, **kwargs):
        self.calls.append(("generate", len(prompts)))
        out = []
        for px, p in zip(pixel_values, prompts):
            k = _key(px)
            out.append(self.caption[k] if p == CAPTION_PROMPT else self.boxes[(k, p)])
        return out

    def image_attention(self, pixel_values, prompts, answer_prefix=""):
        """One layer over an 8 x 8 grid, all of it on the patches of the box it would answer."""
        out = []
        for px, p in zip(pixel_values, prompts):
            on_box = torch.from_numpy(patch_mask(parse_box(self.boxes[(_key(px), p)]), 8)).float()
            out.append((on_box / on_box.sum().clamp(min=1))[None])
        return torch.stack(out)

    def score(self, pixel_values, prompts, choices):
        self.calls.append(("score", len(prompts)))
        assert list(choices) in ([YES, NO], [TRUE, FALSE])
        return torch.tensor([[0.0, -1.0] if self.answers[(_key(px), p)] else [-1.0, 0.0]
                             for px, p in zip(pixel_values, prompts)])


def test_end_to_end_oracle(world, tmp_path):
    model = OracleVLM(world)
    out = tmp_path / "eval"
    s = run_vlm_eval(model, list(VLM_TASKS), out, world_dir=world, progress=False)
    assert s["caption"]["BLEU_4"] == pytest.approx(1.0, abs=1e-6) and s["caption"]["CIDEr"] > 1.0
    assert s["chair"]["chair_i"] == 0.0 and s["chair"]["chair_s"] == 0.0 and s["chair"]["recall"] > 0.5
    assert s["pope"]["f1_avg"] == 1.0 and s["pope"]["random"]["auc"] == 1.0
    assert s["refcoco"]["acc"] == 1.0 and s["refcoco"]["unparseable"] == 0
    assert s["refcoco"]["acc_any_object"] == 1.0 and set(s["refcoco"]["by_objects"]) <= {"1", "2", "3", "4"}
    assert s["grounding_attention"]["pointing"] == 1.0 and s["grounding_attention"]["target_enrichment"] > 1.0
    assert s["vsr"]["accuracy"] == 1.0 and set(s["vsr"]["relations"]) <= {"left of", "right of", "above", "below", "next to"}
    assert set(s["wall_s"]) == set(VLM_TASKS) and s["data"] == "world"
    for t in VLM_TASKS:
        for f in ("predictions.jsonl", "summary.json", "summary.md"):
            assert (out / t / f).is_file(), (t, f)
    assert json.loads((out / "summary.json").read_text())["pope"]["f1_avg"] == 1.0
    md = (out / "summary.md").read_text()
    assert "| pope | f1_avg | 1.0000 |" in md and "Wall time" in md
    # CHAIR reused the captioning task's captions: one generate pass over the images only.
    n_images = len(read_coco_captions(world / "coco" / "captions_val.json").images)
    n_refs = sum(len(r.sentences) for r in read_refcoco(world / "refcoco" / "refs.json", world / "refcoco" / "instances.json"))
    assert sum(n for kind, n in model.calls if kind == "generate") == n_images + n_refs


def test_limit_and_yes_model(world, tmp_path):
    yes = FakeVLM(default_text="Yes")  # score: zeros -> P(Yes) == P(No) -> "no"; generate: a box-less text
    s = run_vlm_eval(yes, ["pope", "refcoco", "chair"], tmp_path / "o", world_dir=world, limit=3, progress=False)
    assert all(s["pope"][sp]["n"] == 3 for sp in ("random", "popular", "adversarial"))
    assert s["pope"]["random"]["yes_ratio"] == 0.0
    assert s["refcoco"]["n"] == 3 and s["refcoco"]["unparseable"] == 3 and s["refcoco"]["acc"] == 0.0
    assert s["chair"]["n_captions"] == 3 and s["chair"]["chair_i"] == 0.0 and s["chair"]["recall"] == 0.0


def test_malformed_file_rejected_before_model_work(world, tmp_path):
    bad = tmp_path / "world"
    shutil.copytree(world, bad)
    lines = (bad / "pope" / "popular.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"question_id": 3, "image": "x.jpg", "text": "Is there?", "label": "maybe"})
    (bad / "pope" / "popular.jsonl").write_text("\n".join(lines) + "\n")
    model = FakeVLM()
    with pytest.raises(FormatError) as e:
        run_vlm_eval(model, ["vsr", "pope"], tmp_path / "out", world_dir=bad, progress=False)
    assert e.value.line == 3 and e.value.path.endswith("popular.jsonl")
    assert model.calls == [] and not (tmp_path / "out" / "vsr").exists()


def test_missing_image_rejected(world, tmp_path):
    bad = tmp_path / "world"
    shutil.copytree(world, bad)
    first = read_vsr(bad / "vsr" / "test.jsonl")[0].image
    (bad / "images" / first).unlink()
    model = FakeVLM()
    with pytest.raises(FileNotFoundError, match="image"):
        run_vlm_eval(model, ["vsr"], tmp_path / "out", world_dir=bad, progress=False)
    assert model.calls == []
    with pytest.raises(ValueError, match="unknown"):
        run_vlm_eval(model, ["vqa"], tmp_path / "out", world_dir=bad)


def test_real_layout_with_paths_yaml(tmp_path):
    """--data DIR with the documented layout and a paths.yaml override; COCO CHAIR ground truth."""
    data = tmp_path / "real"
    for k in range(2):
        write_image(data / "val" / f"COCO_{k}.png", k)
    write_coco_captions(data / "coco" / "captions_val2014.json", {0: "COCO_0.png", 1: "COCO_1.png"},
                        {0: ["A man walking a dog."], 1: ["Two hot dogs on a plate."]})
    write_coco_instances(data / "coco" / "instances_val2014.json",
                         {0: {"file_name": "COCO_0.png", "width": 8, "height": 8},
                          1: {"file_name": "COCO_1.png", "width": 8, "height": 8}},
                         {1: "person", 18: "dog", 58: "hot dog"},
                         {1: {"image_id": 0, "category_id": 1, "bbox": [0, 0, 4, 4]},
                          2: {"image_id": 1, "category_id": 58, "bbox": [0, 0, 4, 4]}})
    for split in ("random", "popular", "adversarial"):
        write_pope(data / "pope" / f"{split}.jsonl", [PopeQuestion(1, "COCO_0.png", "Is there a dog in the image?", "yes")])
    (data / "paths.yaml").write_text("images: val\npope_images: val\n")
    src = resolve_sources(data, "unused")
    assert src.kind == "real" and src.paths["images"] == data / "val"
    chair_data = load_task_data("chair", src)
    assert chair_data.present == {0: {"person", "dog"}, 1: {"hot dog"}}
    texts = {(0, CAPTION_PROMPT): "A woman with a dog and a cat.", (1, CAPTION_PROMPT): "a hot dog"}
    s = run_vlm_eval(FakeVLM(texts=texts, scores={(0, pope_prompt("Is there a dog in the image?")): [0.0, -1.0]}),
                     ["chair", "pope"], tmp_path / "out", data=data, progress=False)
    assert s["chair"]["chair_i"] == pytest.approx(1 / 4) and s["chair"]["chair_s"] == pytest.approx(1 / 2)
    assert s["pope"]["random"]["accuracy"] == 1.0 and s["data"] == str(data)
    (data / "paths.yaml").write_text("imagez: val\n")
    with pytest.raises(ValueError, match="unknown key"):
        resolve_sources(data, "unused")


def test_tasks_with_one_loader_read_their_files_once(world, tmp_path, monkeypatch):
    """refcoco and grounding_attention read the same RefCOCO files: the harness loads them once and
    hands both tasks the same data."""
    from eval import grounding_attention, refcoco
    assert grounding_attention.load is refcoco.load
    calls, seen = [], {}
    original = refcoco.load

    def counting(src, limit=None):
        calls.append(limit)
        return original(src, limit)

    def run_task(task):
        def run(model, data, out_dir, limit=None, batch_size=16, options=None):
            seen[task] = data
            return {"n": len(data.refs)}
        return run

    for module in (refcoco, grounding_attention):
        monkeypatch.setattr(module, "load", counting)
        monkeypatch.setattr(module, "run", run_task(module.TASK))
    s = run_vlm_eval(FakeVLM(), ["refcoco", "grounding_attention"], tmp_path / "o", world_dir=world, limit=3,
                     progress=False)
    assert calls == [3] and seen["refcoco"] is seen["grounding_attention"]
    assert s["refcoco"]["n"] == s["grounding_attention"]["n"] > 0
