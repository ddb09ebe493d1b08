"""``model.coordinate_tokens``: "0.00" ... "1.00" as one token each, their rows trained with the adapter.

The box text the world trains on (``format_box``) round-trips through the tokenizer and the REC parser;
only the coordinate rows (and LoRA, bridge) learn; save / load / merge keep the trained rows.
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

from tiny_vlm import our_logits, perturb_trainable, random_images, save_tiny_llm, stock_logits, vlm_config
from eval.parsing import parse_box
from vlm.config import ConfigError, LoraConfig
from vlm.data.prompts import format_box
from vlm.data.tokenizer import load_tokenizer
from vlm.files import VlmError
from vlm.model.export import export_llava
from vlm.model.llm import COORDINATE_TOKENS, ensure_coordinate_tokens
from vlm.model.vision_language_model import VisionLanguageModel

BOX = (0.05, 0.3, 0.555, 1.0)


def _build(tower, llm, seed=0, bridge="projector", **kw):
    torch.manual_seed(seed)
    return VisionLanguageModel.build(vlm_config(tower, llm, bridge, coordinate_tokens=True, **kw))


def test_a_box_is_twelve_ids_one_per_coordinate_and_round_trips(tiny_llm_dir):
    tokenizer = load_tokenizer(tiny_llm_dir)
    llm = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir))
    before = len(tokenizer(format_box(BOX), add_special_tokens=False)["input_ids"])
    ids = ensure_coordinate_tokens(tokenizer, llm)
    assert len(ids) == 101 == len(set(ids)) and tokenizer.convert_ids_to_tokens(ids) == list(COORDINATE_TOKENS)
    text = format_box(BOX)  # "[0.05, 0.30, 0.56, 1.00]" (0.555 rounds half to even in float: 0.56 or 0.55)
    box_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [i for i in box_ids if i in ids] == [ids[round(float(v) * 100)] for v in text.strip("[]").split(", ")]
    assert len(box_ids) == 12 < before
    assert tokenizer.decode(box_ids) == text
    assert parse_box(tokenizer.decode(box_ids)) == tuple(float(v) for v in text.strip("[]").split(", "))
    assert llm.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert ensure_coordinate_tokens(tokenizer, llm) == ids  # idempotent: nothing added twice


def test_new_rows_are_distinct_and_the_same_on_every_load(tiny_llm_dir):
    rows = []
    for _ in range(2):
        tokenizer, llm = load_tokenizer(tiny_llm_dir), AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir))
        old = llm.get_input_embeddings().weight.detach().clone()
        ids = ensure_coordinate_tokens(tokenizer, llm)
        weight = llm.get_input_embeddings().weight
        assert torch.equal(weight[: old.shape[0]], old)  # the LLM's own rows untouched
        assert weight.data_ptr() == llm.get_output_embeddings().weight.data_ptr()  # still tied
        assert not any(p.requires_grad for p in llm.parameters())
        rows.append(weight[ids].detach().clone())
    assert torch.equal(rows[0], rows[1])
    assert torch.cdist(rows[0], rows[0]).add(torch.eye(101) * 1e9).min() > 1e-3


def test_only_coordinate_rows_lora_and_bridge_train(tiny_tower_dir, tiny_llm_dir):
    model = _build(tiny_tower_dir, tiny_llm_dir)
    ids = [int(model.tokenizer.convert_tokens_to_ids(t)) for t in COORDINATE_TOKENS]
    assert sorted(model.llm.peft_config["default"].trainable_token_indices) == sorted(ids)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("bridge.") or "lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    deltas = [p for n, p in trainable.items() if "trainable_tokens_delta" in n]
    assert deltas and all(d.shape == (101, model.llm.config.hidden_size) for d in deltas)
    frozen = {n: p.detach().clone() for n, p in model.llm.named_parameters() if not p.requires_grad}
    batch = model.processor(random_images(2), ["Where is the red circle?"] * 2,
                            [format_box(BOX), format_box((0, 0, 0.5, 0.5))])
    model(batch)["loss"].backward()
    assert any(d.grad is not None and d.grad.abs().sum() > 0 for d in deltas)
    before = [d.detach().clone() for d in deltas]
    torch.optim.SGD(trainable.values(), lr=1.0).step()
    assert any(not torch.equal(d, b) for d, b in zip(deltas, before))
    assert all(torch.equal(p, frozen[n]) for n, p in model.llm.named_parameters() if n in frozen)  # the LLM's rows


@pytest.mark.parametrize("bridge", ["projector", "flamingo"])
def test_save_load_and_merge_keep_the_trained_rows(tiny_tower_dir, tiny_llm_dir, tmp_path, bridge):
    model = _build(tiny_tower_dir, tiny_llm_dir, bridge=bridge)
    perturb_trainable(model, seed=3)
    model.eval()
    images = random_images(2, seed=4)
    batch = model.processor(images, ["Give the box: the red circle"] * 2)

    def logits(m):
        with torch.no_grad():
            return m.logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])

    want = logits(model)
    ids = [int(model.tokenizer.convert_tokens_to_ids(t)) for t in COORDINATE_TOKENS]
    assert want[..., ids].std() > 0
    model.save_pretrained(tmp_path / "ckpt")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.cfg.coordinate_tokens
    assert loaded.tokenizer.convert_tokens_to_ids("0.37") == model.tokenizer.convert_tokens_to_ids("0.37")
    assert torch.allclose(logits(loaded), want, atol=1e-5)
    model.merge_and_save(tmp_path / "merged")
    merged = VisionLanguageModel.from_pretrained(tmp_path / "merged")
    assert not hasattr(merged.llm, "peft_config")
    assert torch.allclose(logits(merged), want, atol=1e-5)


def test_coordinate_tokens_need_an_adapter_to_train(tiny_tower_dir, tiny_llm_dir):
    with pytest.raises(ConfigError, match="coordinate_tokens"):
        _build(tiny_tower_dir, tiny_llm_dir, lora=LoraConfig(enabled=False))


def test_llava_export_keeps_the_coordinate_tokens(tiny_tower_dir, tiny_llm_dir, tmp_path):
    """The exported LLaVA directory's tokenizer writes a box as the same ids, and its logits on a
    prompt ending in a box equal ours (the trained rows merged into its embedding)."""
    model = _build(tiny_tower_dir, tiny_llm_dir)
    perturb_trainable(model, seed=3)
    model.eval()
    out = export_llava(model, tmp_path / "llava")
    prompt = "Where is it? " + format_box((0.1, 0.2, 0.3, 0.4))
    image = Image.fromarray(random_images(1, seed=5, size=32)[0])
    theirs, their_ids = stock_logits(out, image, prompt)
    ours, our_ids = our_logits(model, image, prompt)
    assert their_ids.tolist() == our_ids.tolist()
    assert (theirs - ours).abs().max().item() < 1e-4
    tokenizer = AutoProcessor.from_pretrained(str(out)).tokenizer
    assert tokenizer.convert_tokens_to_ids("0.30") == model.tokenizer.convert_tokens_to_ids("0.30")


def test_a_checkpoint_whose_config_lost_the_flag_names_the_adapter_config(tiny_tower_dir, tiny_llm_dir, tmp_path):
    model = _build(tiny_tower_dir, tiny_llm_dir)
    model.save_pretrained(tmp_path / "ckpt")
    cfg = tmp_path / "ckpt" / "vlm.yaml"
    cfg.write_text(cfg.read_text().replace("coordinate_tokens: true", "coordinate_tokens: false"))
    with pytest.raises(VlmError, match=r"adapter_config.json: trainable_token_indices .*coordinate_tokens"):
        VisionLanguageModel.from_pretrained(tmp_path / "ckpt")


def test_with_a_chat_template_and_no_image_token_the_box_answer_is_the_target(tiny_tower_dir, tmp_path):
    """An LLM as real ones come (a chat template, no ``<image>``): ``<image>`` and the coordinates are
    added after its own ids, and a box answer's labels are exactly the template's answer ids with one id
    per coordinate."""
    template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    llm = save_tiny_llm(tmp_path / "llm", chat_template=template, image_token=False)
    model = _build(tiny_tower_dir, llm)
    ids = [int(model.tokenizer.convert_tokens_to_ids(t)) for t in COORDINATE_TOKENS]
    assert min(ids) > model.image_token_id and max(ids) == len(model.tokenizer) - 1
    text = format_box((0.1, 0.2, 0.3, 0.4))
    batch = model.processor(random_images(1), ["Where is the red circle?"], [text])
    labels = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert [i for i in labels if i in ids] == [ids[10], ids[20], ids[30], ids[40]]
    assert model.tokenizer.decode(labels, skip_special_tokens=True).strip() == text
    assert torch.isfinite(model(batch)["loss"])
