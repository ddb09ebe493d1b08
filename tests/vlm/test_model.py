"""VisionLanguageModel: what trains, save/load/merge round trips, generation with/without cache, score."""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from tiny_vlm import perturb_trainable, random_images, save_tiny_llm, vlm_config
from encoders.towers import unused_feature_parameters
from vlm.config import config_from_yaml_text, VLMConfig
from vlm.model.llm import base_model, check_4bit_available
from vlm.model.vision_language_model import VisionLanguageModel

BRIDGES = ["projector", "flamingo"]
PROMPTS = ["Is there a red circle?", "How many objects are in the image?"]
HAS_CUDA_BNB = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def build(tower, llm, bridge, seed=0, **kw):
    torch.manual_seed(seed)
    return VisionLanguageModel.build(vlm_config(tower, llm, bridge, **kw))


@pytest.fixture(scope="module", params=BRIDGES)
def trained(request, tiny_tower_dir, tiny_llm_dir):
    """A VLM whose bridge and LoRA weights are random (as after training), in eval mode."""
    model = build(tiny_tower_dir, tiny_llm_dir, request.param)
    perturb_trainable(model, seed=1)
    return model.eval()


def _logits(model, images, prompts=PROMPTS):
    batch = model.processor(images, prompts)
    with torch.no_grad():
        return model.logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("bridge", BRIDGES)
@pytest.mark.parametrize("freeze_vision", [True, False])
def test_only_bridge_and_lora_receive_gradients(tiny_tower_dir, tiny_llm_dir, bridge, freeze_vision):
    """An unfrozen tower trains only what its features use: with ``vision_feature_layer=-2`` (as
    transformers ``modeling_llava.LlavaModel.get_image_features``) its last block and final norm
    stay frozen (they would get no gradient)."""
    model = build(tiny_tower_dir, tiny_llm_dir, bridge, freeze_vision=freeze_vision)
    perturb_trainable(model)  # nonzero LoRA B and gates, so every trainable tensor gets signal
    batch = model.processor(random_images(2), PROMPTS, ["Yes", "2"])
    out = model(batch)
    assert out["num_tokens"] == batch["attention_mask"].sum()
    out["loss"].backward()
    skipped = {id(p) for p in unused_feature_parameters(model.tower.tower, model.cfg.vision_feature_layer)}
    assert skipped and any(n.startswith("tower.tower.encoder.layers.1.") for n, p in model.named_parameters()
                           if id(p) in skipped)
    for name, p in model.named_parameters():
        tower_trains = name.startswith("tower.") and not freeze_vision and id(p) not in skipped
        trainable = name.startswith("bridge.") or "lora_" in name or tower_trains
        assert p.requires_grad == trainable, name
        if trainable:
            assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        else:
            assert p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("bridge."))
    if not freeze_vision:
        assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("tower."))


def test_loss_is_mean_cross_entropy_on_answer_tokens(tiny_tower_dir, tiny_llm_dir):
    model = build(tiny_tower_dir, tiny_llm_dir, "projector")
    perturb_trainable(model)
    batch = model.processor(random_images(2), PROMPTS, ["Yes", "There are 2 objects."])
    with torch.no_grad():
        loss = model(batch)["loss"]
        logits = model.logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]).double()
    total, count = 0.0, 0
    for b in range(2):
        for t in range(1, batch["input_ids"].shape[1]):
            target = int(batch["labels"][b, t])
            if target != -100:
                total -= float(torch.log_softmax(logits[b, t - 1], -1)[target])
                count += 1
    assert count == int((batch["labels"] != -100).sum())
    assert abs(float(loss) - total / count) < 1e-5


def test_save_load_and_merge_give_identical_logits(trained, tmp_path, monkeypatch):
    images = random_images(2, seed=5)
    want = _logits(trained, images)
    trained.save_pretrained(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert files == {"vlm.yaml", "bridge.safetensors", "adapter"}  # no LLM or tower weights
    cfg = config_from_yaml_text(VLMConfig, (tmp_path / "ckpt" / "vlm.yaml").read_text())
    assert cfg.llm.startswith("/") and cfg.vision_tower.startswith("/")
    monkeypatch.chdir(tmp_path)  # absolute paths: loads from any working directory
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.allclose(_logits(loaded, images), want, atol=1e-5)
    trained.merge_and_save(tmp_path / "merged")
    assert (tmp_path / "merged" / "llm" / "config.json").is_file()
    (tmp_path / "moved").mkdir()
    (tmp_path / "merged").rename(tmp_path / "moved" / "merged")  # merged checkpoints are self-contained
    merged = VisionLanguageModel.from_pretrained(tmp_path / "moved" / "merged")
    assert not hasattr(merged.llm, "peft_config")  # a plain transformers model: no peft at inference
    assert torch.allclose(_logits(merged, images), want, atol=1e-5)
    # The trained model itself is untouched by saving and merging.
    assert torch.equal(_logits(trained, images), want)


def test_unfrozen_tower_is_saved(tiny_tower_dir, tiny_llm_dir, tmp_path):
    model = build(tiny_tower_dir, tiny_llm_dir, "projector", freeze_vision=False)
    perturb_trainable(model, seed=2, scale=0.05)
    model.eval()
    images = random_images(2, seed=6)
    want = _logits(model, images)
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "vision" / "config.json").is_file()
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    assert torch.allclose(_logits(loaded, images), want, atol=1e-5)


def test_generation_with_and_without_cache_is_identical(trained):
    """transformers ``generate`` with and without its KV cache; for flamingo the cached steps attend
    to the image as OpenFlamingo's ``use_cached_media`` (``helpers.MaskedCrossAttention``)."""
    images = random_images(2, seed=7)
    with_cache = trained.generate_ids(images, PROMPTS, max_new_tokens=8, min_new_tokens=8, use_cache=True)
    without = trained.generate_ids(images, PROMPTS, max_new_tokens=8, min_new_tokens=8, use_cache=False)
    assert with_cache.shape == (2, 8)
    assert torch.equal(with_cache, without)
    texts = trained.generate(images, PROMPTS, max_new_tokens=4)
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_with_text_before_the_image(trained, use_cache):
    """OpenFlamingo ``helpers.MaskedCrossAttention`` (``use_cached_media`` while decoding): with the
    image after some prompt text, cached and uncached decoding give the tokens of step-by-step argmax."""
    images = random_images(2, seed=12)
    prompts = ["Describe the image briefly.\n<image>", "How many objects? <image>"]
    got = trained.generate_ids(images, prompts, max_new_tokens=5, min_new_tokens=5, use_cache=use_cache)
    pixels = trained.processor.pixel_values(images)
    banned = [t for t in [trained.image_token_id, trained.tokenizer.eos_token_id] if t is not None and t >= 0]
    for b, prompt in enumerate(prompts):
        seq = trained.processor.encode_prompt(prompt)
        assert seq.index(trained.image_token_id) > 1  # prompt text precedes the image
        for _ in range(5):
            ids = torch.tensor([seq])
            with torch.no_grad():
                last = trained.logits(pixels[b:b + 1], ids, torch.ones_like(ids))[0, -1]
            last[banned] = float("-inf")
            seq.append(int(last.argmax()))
        assert got[b].tolist() == seq[-5:], b


MIXED = ["Is there a red circle?", "q", "How many objects are in the image? Describe the image briefly please."]


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_generation_equals_each_prompt_alone(trained, use_cache):
    images = random_images(3, seed=10)
    lengths = [len(trained.processor.encode_prompt(p)) for p in MIXED]
    assert len(set(lengths)) == 3  # every row but the longest is left-padded in the batch
    batched = trained.generate_ids(images, MIXED, max_new_tokens=8, min_new_tokens=8, use_cache=use_cache)
    for b in range(3):
        alone = trained.generate_ids(images[b:b + 1], MIXED[b:b + 1], max_new_tokens=8, min_new_tokens=8,
                                     use_cache=use_cache)
        assert torch.equal(alone[0], batched[b]), b


def test_greedy_is_argmax_whatever_the_llm_generation_config(trained):
    """Greedy = argmax of the VLM's logits step by step, even when the LLM ships sampling defaults."""
    images = random_images(2, seed=11)
    base = base_model(trained.llm)
    saved = copy.deepcopy(base.generation_config)
    base.generation_config.do_sample, base.generation_config.top_k = True, 3  # as hub chat models ship
    base.generation_config.repetition_penalty, base.generation_config.no_repeat_ngram_size = 5.0, 1
    try:
        got = trained.generate_ids(images, PROMPTS, max_new_tokens=6, min_new_tokens=6)
    finally:
        base.generation_config = saved
    banned = [t for t in [trained.image_token_id, trained.tokenizer.eos_token_id] if t is not None and t >= 0]
    pixels = trained.processor.pixel_values(images)
    for b, prompt in enumerate(PROMPTS):
        seq = trained.processor.encode_prompt(prompt)
        for _ in range(6):
            ids = torch.tensor([seq])
            with torch.no_grad():
                last = trained.logits(pixels[b:b + 1], ids, torch.ones_like(ids))[0, -1]
            last[banned] = float("-inf")  # generate suppresses <image>, and eos under min_new_tokens
            seq.append(int(last.argmax()))
        assert got[b].tolist() == seq[-6:], b


def test_sampling_is_seeded(trained):
    images = random_images(2, seed=8)
    torch.manual_seed(0)
    a = trained.generate_ids(images, PROMPTS, max_new_tokens=6, min_new_tokens=6, do_sample=True, temperature=1.5)
    torch.manual_seed(0)
    b = trained.generate_ids(images, PROMPTS, max_new_tokens=6, min_new_tokens=6, do_sample=True, temperature=1.5,
                             top_p=0.9)
    torch.manual_seed(0)
    c = trained.generate_ids(images, PROMPTS, max_new_tokens=6, min_new_tokens=6, do_sample=True, temperature=1.5)
    assert torch.equal(a, c) and a.shape == b.shape == (2, 6)
    torch.manual_seed(1)
    d = trained.generate_ids(images, PROMPTS, max_new_tokens=6, min_new_tokens=6, do_sample=True, temperature=1.5)
    greedy = trained.generate_ids(images, PROMPTS, max_new_tokens=6, min_new_tokens=6)
    assert not torch.equal(a, d) and not torch.equal(a, greedy)  # it really samples


def test_score_matches_manual_log_probs(trained):
    images = random_images(2, seed=9)
    choices = ["Yes", "No", "a red circle"]
    scores = trained.score(images, PROMPTS, choices)
    assert scores.shape == (2, 3)
    pixels = trained.processor.pixel_values(images)
    for b, prompt in enumerate(PROMPTS):
        p = trained.processor.encode_prompt(prompt)
        for c, choice in enumerate(choices):
            ids = trained.processor.encode_answer(choice)
            seq = torch.tensor([p + ids])
            with torch.no_grad():
                logp = torch.log_softmax(trained.logits(pixels[b:b + 1], seq, torch.ones_like(seq))[0].double(), -1)
            manual = sum(float(logp[len(p) + k - 1, t]) for k, t in enumerate(ids))
            assert abs(float(scores[b, c]) - manual) < 1e-4
    with pytest.raises(ValueError, match="at least one choice"):
        trained.score(images, PROMPTS, [])


def test_image_attention_batched_equals_each_prompt_alone(trained):
    """[B,L,P] head-averaged attention of the last position (after the "[" prefix) over the image tokens:
    left-padded in a batch it equals each prompt run alone; weights in [0, 1]; SDPA restored after."""
    images = random_images(2, seed=4)
    if trained.cfg.bridge.name != "projector":
        with pytest.raises(ValueError, match="cross-attention"):
            trained.image_attention(images, PROMPTS, "[")
        return
    before = base_model(trained.llm).config._attn_implementation
    batched = trained.image_attention(images, PROMPTS, "[")
    n_layers = base_model(trained.llm).config.num_hidden_layers
    assert batched.shape == (2, n_layers, trained.processor.num_image_tokens)
    assert (batched >= 0).all() and (batched.sum(-1) <= 1 + 1e-5).all() and (batched.sum(-1) > 0).all()
    for b in range(2):
        alone = trained.image_attention(images[b:b + 1], PROMPTS[b:b + 1], "[")
        assert torch.allclose(alone[0], batched[b], atol=1e-5)
    assert not torch.allclose(trained.image_attention(images, PROMPTS), batched)  # the "[" position differs
    assert base_model(trained.llm).config._attn_implementation == before
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        trained.image_attention(images, PROMPTS[:1])


def test_llm_without_image_token_and_with_chat_template(tiny_tower_dir, tmp_path):
    """An LLM without ``<image>`` gets it as a special token (OpenFlamingo ``factory.create_model_and_transforms``
    adds "<image>" too, for flamingo's media location)."""
    template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    llm = save_tiny_llm(tmp_path / "llm", chat_template=template, image_token=False)
    model = build(tiny_tower_dir, llm, "projector")
    assert model.image_token_id == len(model.tokenizer) - 1  # added as a special token
    assert model.llm.get_input_embeddings().weight.shape[0] > model.image_token_id
    batch = model.processor(random_images(2), PROMPTS, ["Yes", "2"])
    assert (batch["input_ids"] == model.image_token_id).sum() == 2 * model.tower.num_patches
    assert torch.isfinite(model(batch)["loss"])
    # Flamingo keeps one <image> id as its media location (OpenFlamingo adds "<image>" to the
    # tokenizer too); the new embedding row is the mean of the others, the same on every load.
    flamingo = build(tiny_tower_dir, llm, "flamingo")
    assert flamingo.image_token_id == model.image_token_id and len(flamingo.tokenizer) == len(model.tokenizer)
    for m in (model, flamingo):
        weight = base_model(m.llm).get_input_embeddings().weight
        assert torch.equal(weight[m.image_token_id], weight[:m.image_token_id].mean(0))
    batch = flamingo.processor(random_images(2), PROMPTS, ["Yes", "2"])
    assert ((batch["input_ids"] == flamingo.image_token_id).sum(1) == 1).all()


def test_clear_errors_for_missing_gpu_features(tiny_tower_dir, tiny_llm_dir, monkeypatch, tmp_path):
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ImportError, match=r"sparc-vlm\[flash\]"):
            build(tiny_tower_dir, tiny_llm_dir, "projector", attn_implementation="flash_attention_2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        build(tiny_tower_dir, tiny_llm_dir, "projector", load_in_4bit=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="bitsandbytes"):
        check_4bit_available()
    with pytest.raises(FileNotFoundError, match="model.llm"):
        build(tiny_tower_dir, tmp_path / "nowhere", "projector")


@pytest.mark.skipif(not HAS_CUDA_BNB, reason="QLoRA needs CUDA and bitsandbytes")
def test_qlora_trains_only_adapters_and_bridge(tiny_tower_dir, tiny_llm_dir):
    model = build(tiny_tower_dir, tiny_llm_dir, "projector", load_in_4bit=True)
    batch = {k: v.cuda() for k, v in model.processor(random_images(2), PROMPTS, ["Yes", "2"]).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(batch)
    out["loss"].backward()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("bridge.") or "lora_" in n for n in names)
    with pytest.raises(ValueError, match="load_in_4bit"):
        model.merge_and_save("/tmp/never")


def test_labelled_token_loss_against_a_float64_loop():
    from vlm.model.llm import labelled_token_loss
    g = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(3, 7, 5, generator=g, dtype=torch.float64), torch.nn.Linear(5, 11).double()
    labels = torch.full((3, 7), -100)
    labels[0, 2:5], labels[2, 1:7] = torch.randint(0, 11, (3,), generator=g), torch.randint(0, 11, (6,), generator=g)
    with torch.no_grad():
        logits = head(hidden)
    total, count = 0.0, 0
    for b in range(3):
        for t in range(1, 7):  # position t-1 predicts label t
            if int(labels[b, t]) != -100:
                total -= float(torch.log_softmax(logits[b, t - 1], -1)[int(labels[b, t])])
                count += 1
    assert count == 9
    assert abs(float(labelled_token_loss(hidden, labels, head)) - total / count) < 1e-6  # logits taken in float32
    empty = labelled_token_loss(hidden.requires_grad_(), torch.full((3, 7), -100), head)
    assert float(empty) == 0.0 and empty.requires_grad  # nothing labelled: a zero in the graph, not nan


def test_image_attention_rows_against_a_loop():
    """The last position's head-mean weights over the image positions, per layer; uneven image counts refused."""
    from vlm.model.llm import image_attention_rows
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[5, 9, 9, 7, 1], [9, 3, 9, 2, 4]])  # image token 9 at different places
    attentions = [torch.rand(2, 3, 5, 5, generator=g) for _ in range(2)]
    rows = image_attention_rows(attentions, ids, 9)
    assert rows.shape == (2, 2, 2)
    for b in range(2):
        for layer in range(2):
            want = [sum(float(attentions[layer][b, h, -1, t]) for h in range(3)) / 3 for t in range(5) if ids[b, t] == 9]
            assert rows[b, layer].tolist() == pytest.approx(want)
    with pytest.raises(ValueError, match=r"image tokens per prompt \[2, 1\]"):
        image_attention_rows(attentions, torch.tensor([[9, 9, 0, 0, 0], [9, 0, 0, 0, 0]]), 9)
