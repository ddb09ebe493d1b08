"""Bridges: the projector's image tokens land at the placeholder; Flamingo with zero gates is the LLM,
its blocks sit where OpenFlamingo puts them and its media mask is OpenFlamingo's.

OpenFlamingo references (mlfoundations/open_flamingo): ``open_flamingo/src/helpers.py``
``MaskedCrossAttention`` / ``GatedCrossAttentionBlock``, ``open_flamingo/src/flamingo_lm.py``
``FlamingoLMMixin.init_flamingo``.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tiny_vlm import perturb_trainable, random_images, vlm_config
from vlm.model.bridges.flamingo import (FlamingoBridge, GatedCrossAttentionBlock, GatedDecoderLayer, PerceiverResampler,
                                        immediate_media_mask, xattn_layer_indices)
from vlm.model.bridges.projector import merge_image_features
from vlm.model.bridges import BRIDGES, build_bridge
from vlm.config import BRIDGE_NAMES, BridgeConfig, ConfigError
from vlm.model.llm import base_model, decoder_layers
from vlm.model.vision_language_model import VisionLanguageModel, position_ids_from_mask


@pytest.fixture(scope="module")
def projector(tiny_tower_dir, tiny_llm_dir):
    return VisionLanguageModel.build(vlm_config(tiny_tower_dir, tiny_llm_dir, "projector"))


@pytest.fixture(scope="module")
def flamingo(tiny_tower_dir, tiny_llm_dir):
    torch.manual_seed(0)
    return VisionLanguageModel.build(vlm_config(tiny_tower_dir, tiny_llm_dir, "flamingo"))


def test_merge_image_features_matches_loop():
    g = torch.Generator().manual_seed(0)
    B, T, N, d, img = 3, 12, 4, 5, 99
    ids = torch.randint(0, 50, (B, T), generator=g)
    starts = [0, 3, 8]  # left, middle, right of the sequence
    for b, s in enumerate(starts):
        ids[b, s:s + N] = img
    text = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    feats = torch.randn(B, N, d, generator=g, dtype=torch.float64)
    out = merge_image_features(text, ids, feats, img)
    ref = text.clone()
    for b in range(B):
        n = 0
        for t in range(T):
            if ids[b, t] == img:
                ref[b, t] = feats[b, n]
                n += 1
    assert torch.equal(out, ref)
    # No image ids at all (a cached decoding step): unchanged.
    plain = torch.randint(0, 50, (B, 1), generator=g)
    assert merge_image_features(text[:, :1], plain, feats, img) is text[:, :1] or torch.equal(
        merge_image_features(text[:, :1], plain, feats, img), text[:, :1])
    bad = ids.clone()
    bad[0, starts[0]] = 1
    with pytest.raises(ValueError, match="exactly 4"):
        merge_image_features(text, bad, feats, img)
    with pytest.raises(ValueError, match="images for a batch"):
        merge_image_features(text, ids, feats[:2], img)
    # A text-only row (no image ids) beside rows with an image: its embeddings are untouched.
    text_only = ids.clone()
    text_only[1][text_only[1] == img] = 1
    mixed = merge_image_features(text, text_only, feats, img)
    assert torch.equal(mixed[1], text[1]) and torch.equal(mixed[0], out[0])


@pytest.mark.parametrize("padding", ["left", "right"])
def test_projector_tokens_land_at_placeholder(projector, padding):
    model = projector
    images = random_images(2, seed=3)
    prompts = ["Is there a red circle?", "How many objects are in the image? Count them."]
    if padding == "left":
        batch = model.processor(images, prompts)
    else:
        batch = model.processor(images, prompts, ["Yes", "2"])
    captured = {}
    layer0 = decoder_layers(model.llm)[0]

    def grab(module, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]

    handle = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model.logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
            expected = model.bridge(model.tower(batch["pixel_values"]))
            is_img = batch["input_ids"] == model.image_token_id
            text = base_model(model.llm).get_input_embeddings()(batch["input_ids"].masked_fill(is_img, 0))
    finally:
        handle.remove()
    h = captured["h"]
    P = model.tower.num_patches
    for b in range(2):
        pos = is_img[b].nonzero().squeeze(1)
        assert len(pos) == P and bool((pos[1:] - pos[:-1] == 1).all())  # one contiguous block of P
        assert torch.equal(h[b, pos], expected[b])
        assert torch.equal(h[b, ~is_img[b]], text[b, ~is_img[b]])


def test_flamingo_zero_gates_reproduce_llm_exactly(flamingo, tiny_llm_dir):
    """OpenFlamingo ``helpers.GatedCrossAttentionBlock``: both tanh gates start at 0, so the VLM's
    logits are the bare LLM's on the same ids (which keep one ``<image>`` id, the media location)."""
    model = flamingo
    assert all(float(b.attn_gate.detach()) == 0.0 == float(b.ff_gate.detach()) for b in model.bridge.blocks)
    bare = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir)).eval()
    with torch.no_grad():  # the resampler is random; only the gates (and LoRA B) are still zero
        for p in model.bridge.resampler.parameters():
            p.add_(0.3)
    images = random_images(2, seed=4)
    for batch in (model.processor(images, ["Is there a red circle?", "Describe the image briefly please."]),
                  model.processor(images, ["q", "How many objects?"], ["Yes", "There are 2 objects."])):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ((ids == model.image_token_id).sum(1) == 1).all()
        with torch.no_grad():
            got = model.logits(batch["pixel_values"], ids, mask)
            want = bare(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        assert torch.equal(got, want)
    # Live path: opening the gates changes the logits.
    with torch.no_grad():
        model.bridge.blocks[0].attn_gate.fill_(0.5)
        opened = model.logits(batch["pixel_values"], ids, mask)
        model.bridge.blocks[0].attn_gate.zero_()
    assert not torch.allclose(opened, want)


def test_flamingo_wraps_and_unwraps_decoder_layers(flamingo):
    """OpenFlamingo ``flamingo_lm.FlamingoLayer``: the gated block runs before the wrapped decoder
    layer (k=1 here: every layer); detaching restores the LLM's own layers."""
    layers = decoder_layers(flamingo.llm)
    wrapped = [i for i, l in enumerate(layers) if isinstance(l, GatedDecoderLayer)]
    assert wrapped == flamingo.bridge.layer_indices == list(range(len(layers)))
    inner = [l.layer for l in layers]
    assert layers[0].self_attn is inner[0].self_attn  # attribute reads reach the wrapped layer
    with flamingo.bridge.detached(flamingo.llm):
        assert [l for l in decoder_layers(flamingo.llm)] == inner
    assert all(isinstance(l, GatedDecoderLayer) for l in decoder_layers(flamingo.llm))
    with pytest.raises(RuntimeError, match="already attached"):
        flamingo.bridge.attach(flamingo.llm, -1)
    # Bridge parameters are registered once, under the bridge.
    names = [n for n, _ in flamingo.named_parameters() if "attn_gate" in n]
    assert names and all(n.startswith("bridge.blocks.") for n in names)


def test_gated_block_formula_and_resampler_shapes():
    """OpenFlamingo ``helpers.GatedCrossAttentionBlock.forward``: x + tanh(attn_gate) attn(x), then
    + tanh(ff_gate) ff(x); no mask: every token attends. ``flamingo_lm.FlamingoLMMixin.init_flamingo``:
    blocks where (layer_idx + 1) % k == 0."""
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(16, 2)
    with torch.no_grad():
        block.attn_gate.fill_(0.7)
        block.ff_gate.fill_(-0.4)
    x, lat = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    h = x + torch.tanh(torch.tensor(0.7)) * block.attn(block.norm(x), lat)
    ref = h + torch.tanh(torch.tensor(-0.4)) * block.ffn(h)
    assert torch.allclose(block(x, lat), ref, atol=1e-6)
    # The attention itself against a float64 loop over heads, queries and keys.
    attn = block.attn.double()
    xd, ld = x.double(), lat.double()
    q, k, v = attn.q(xd), attn.k(ld), attn.v(ld)
    ref_attn = torch.zeros_like(xd)
    dh = 16 // 2
    for b in range(2):
        for head in range(2):
            sl = slice(head * dh, (head + 1) * dh)
            for t in range(5):
                w = torch.softmax(torch.stack([q[b, t, sl] @ k[b, s, sl] for s in range(3)]) / dh ** 0.5, 0)
                ref_attn[b, t, sl] = sum(w[s] * v[b, s, sl] for s in range(3))
    assert torch.allclose(attn(xd, ld), attn.o(ref_attn), atol=1e-10)
    res = PerceiverResampler(vision_width=12, width=16, num_latents=3, num_layers=2, num_heads=2)
    assert res(torch.randn(4, 9, 12)).shape == (4, 3, 16)
    # Blocks before layers i with (i+1) % k == 0 (OpenFlamingo), no longer 0, k, 2k (was [0, 2, 4]).
    cfg = BridgeConfig(name="flamingo", num_latents=3, xattn_every=2, num_heads=2)
    assert FlamingoBridge(cfg, 12, 16, num_llm_layers=5).layer_indices == [1, 3]


def test_flamingo_without_resampler_attends_to_every_patch_token(tiny_tower_dir, tiny_llm_dir):
    """``resampler_layers: 0`` (Llama 3.2 Vision's cross-attention): the media are LN(proj(patch
    tokens)) [B,P,d], one per patch, no learned latents; zero gates still give the bare LLM's logits,
    and with a gate open a sequence's logits follow its own image (and only its own)."""
    res = PerceiverResampler(vision_width=12, width=16, num_latents=3, num_layers=0, num_heads=2)
    x = torch.randn(2, 9, 12)
    assert res.latents is None and not any("latents" in n for n, _ in res.named_parameters())
    assert torch.allclose(res(x), res.norm(res.proj(x)), atol=0) and res(x).shape == (2, 9, 16)
    with pytest.raises(ValueError, match="token count"):
        FlamingoBridge(BridgeConfig(name="flamingo", resampler_layers=0, num_heads=2), 12, 16, 2)
    torch.manual_seed(0)
    cfg = vlm_config(tiny_tower_dir, tiny_llm_dir, "flamingo")
    cfg.bridge.resampler_layers = 0
    model = VisionLanguageModel.build(cfg).eval()
    P = model.tower.num_tokens
    assert model.bridge.num_latents == P
    images = random_images(2, seed=5)
    batch = model.processor(images, ["Is there a red circle?", "How many objects?"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    bare = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir)).eval()
    with torch.no_grad():
        assert model.image_features(batch["pixel_values"]).shape[1] == P
        want = bare(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        assert torch.equal(model.logits(batch["pixel_values"], ids, mask), want)
        model.bridge.blocks[0].attn_gate.fill_(0.5)
        pixels = batch["pixel_values"].clone()
        before = model.logits(pixels, ids, mask)
        pixels[1] = torch.flip(pixels[1], dims=[-1])  # image 1 only: image 0's rows stay as they were
        after = model.logits(pixels, ids, mask)
    assert torch.equal(before[0], after[0]) and not torch.allclose(before[1], after[1])


def test_registry_keys_and_errors():
    assert tuple(BRIDGES) == BRIDGE_NAMES
    with pytest.raises(ConfigError, match="bridge.name"):
        BridgeConfig(name="qformer")
    cfg = BridgeConfig()
    cfg.name = "qformer"  # bypassing the config check still fails with the valid keys
    with pytest.raises(KeyError, match="flamingo"):
        build_bridge(cfg, 8, 8, 2)
    with pytest.raises(ValueError, match="num_heads"):
        build_bridge(BridgeConfig(name="flamingo", num_heads=3), 8, 8, 2)
    with pytest.raises(ConfigError, match="bridge.position_embedding"):
        BridgeConfig(name="flamingo", position_embedding=True)
    with pytest.raises(ValueError, match="number of tokens"):
        build_bridge(BridgeConfig(position_embedding=True), 8, 8, 2)  # num_tokens unknown


def test_perturbed_projector_still_places_tokens(tiny_tower_dir, tiny_llm_dir):
    model = VisionLanguageModel.build(vlm_config(tiny_tower_dir, tiny_llm_dir, "projector"))
    perturb_trainable(model)
    batch = model.processor(random_images(1), ["Is there a red circle?"])
    with torch.no_grad():
        a = model.logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        b = model.logits(batch["pixel_values"] + 1.0, batch["input_ids"], batch["attention_mask"])
    assert not torch.allclose(a, b)  # the image reaches the logits
    with pytest.raises(RuntimeError, match="no image features"):
        model.llm(input_ids=batch["input_ids"])


def test_xattn_layer_indices_follow_openflamingo():
    """OpenFlamingo ``flamingo_lm.FlamingoLMMixin.init_flamingo``: a gated block for decoder layer
    ``layer_idx`` iff ``(layer_idx + 1) % cross_attn_every_n_layers == 0``."""
    assert xattn_layer_indices(5, 1) == [0, 1, 2, 3, 4]
    assert xattn_layer_indices(5, 2) == [1, 3]
    assert xattn_layer_indices(5, 3) == [2]
    assert xattn_layer_indices(5, 6) == []
    for k, want in ((1, 5), (2, 2), (3, 1)):
        bridge = FlamingoBridge(BridgeConfig(name="flamingo", num_latents=2, xattn_every=k, num_heads=2), 8, 8, 5)
        assert len(bridge.blocks) == want == len(bridge.layer_indices)


def test_immediate_media_mask_cases():
    """OpenFlamingo ``helpers.MaskedCrossAttention.forward`` (``only_attend_immediate_media``):
    ``text_time = media_locations.cumsum(-1)``; text_time == 0 attends nothing; with cached media
    (``use_cached_media``) every new token attends."""
    img = 7
    ids = torch.tensor([[7, 1, 2, 3], [1, 2, 3, 7], [1, 7, 2, 3], [0, 0, 7, 1]])
    want = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 1], [0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(immediate_media_mask(ids, img, image_in_cache=False), want)
    step = torch.tensor([[4], [5], [6], [1]])  # a cached decoding step: after the image
    assert bool(immediate_media_mask(step, img, image_in_cache=True).all())
    with pytest.raises(ValueError, match="no <image> id"):
        immediate_media_mask(step, img, image_in_cache=False)
    with pytest.raises(ValueError, match="one <image> id per image"):
        immediate_media_mask(torch.tensor([[7, 7, 1], [1, 7, 2]]), img, image_in_cache=False)
    # A text-only row beside one with an image attends nothing.
    mixed = immediate_media_mask(torch.tensor([[7, 1, 1], [1, 2, 2]]), img, image_in_cache=False)
    assert torch.equal(mixed, torch.tensor([[1, 1, 1], [0, 0, 0]], dtype=torch.bool))


def _masked_block_loop(block: GatedCrossAttentionBlock, x: torch.Tensor, lat: torch.Tensor, text_time: torch.Tensor,
                       heads: int) -> torch.Tensor:
    """float64 loop over batch, tokens, heads and latents: OpenFlamingo's masked cross-attention
    (a token with text_time 0 gets no attention term) then the gated feed-forward on every token."""
    B, T, d = x.shape
    dh = d // heads
    q, k, v = block.attn.q(block.norm(x)), block.attn.k(lat), block.attn.v(lat)
    out = x.clone()
    for b in range(B):
        for t in range(T):
            if text_time[b, t] == 0:
                continue
            mixed = torch.zeros(d, dtype=x.dtype)
            for h in range(heads):
                sl = slice(h * dh, (h + 1) * dh)
                w = torch.softmax(torch.stack([q[b, t, sl] @ k[b, s, sl] for s in range(lat.shape[1])]) / dh ** 0.5, 0)
                mixed[sl] = sum(w[s] * v[b, s, sl] for s in range(lat.shape[1]))
            out[b, t] = x[b, t] + torch.tanh(block.attn_gate) * block.attn.o(mixed)
    return out + torch.tanh(block.ff_gate) * block.ffn(out)


def test_masked_cross_attention_matches_float64_loop():
    """OpenFlamingo ``helpers.MaskedCrossAttention`` (only_attend_immediate_media) inside
    ``helpers.GatedCrossAttentionBlock``: image first, in the middle, last, and after left padding."""
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(16, 2).double()
    with torch.no_grad():
        block.attn_gate.fill_(0.7)
        block.ff_gate.fill_(-0.4)
    img, B, T = 99, 4, 6
    ids = torch.randint(0, 50, (B, T))
    for b, pos in enumerate([0, 3, T - 1, 2]):
        ids[b, pos] = img
    ids[3, :2] = 0  # left padding before the image
    x, lat = torch.randn(B, T, 16, dtype=torch.float64), torch.randn(B, 3, 16, dtype=torch.float64)
    mask = immediate_media_mask(ids, img, image_in_cache=False)
    with torch.no_grad():
        got = block(x, lat, mask)
        want = _masked_block_loop(block, x, lat, (ids == img).cumsum(-1), heads=2)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        block.ff_gate.zero_()  # feed-forward shut: tokens before the image are exactly unchanged
        shut = block(x, lat, mask)
    assert torch.equal(shut[~mask], x[~mask]) and not torch.allclose(shut[mask], x[mask])


def test_flamingo_tokens_before_the_image_see_no_image(flamingo, tiny_llm_dir):
    """OpenFlamingo ``helpers.MaskedCrossAttention``: text before any ``<image>`` gets no
    cross-attention. With the attention gates open and the feed-forward gates shut, logits before
    the image are the bare LLM's exactly; from the ``<image>`` token on they move with the image."""
    model = flamingo
    bare = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir)).eval()
    batch = model.processor(random_images(2, seed=5), ["Describe the image briefly.\n<image>", "q\n<image>"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos = (ids == model.image_token_id).int().argmax(1)
    try:
        with torch.no_grad():
            for b in model.bridge.blocks:
                b.attn_gate.fill_(0.8)
            got = model.logits(batch["pixel_values"], ids, mask)
            other = model.logits(batch["pixel_values"].flip(0), ids, mask)
            want = bare(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    finally:
        with torch.no_grad():
            for b in model.bridge.blocks:
                b.attn_gate.zero_()
    for b in range(2):
        real = mask[b].bool()
        before = real & (torch.arange(ids.shape[1]) < pos[b])
        assert before.any()
        assert torch.equal(got[b, before], want[b, before])
        assert not torch.allclose(got[b, pos[b]:], want[b, pos[b]:])
        assert not torch.allclose(got[b, pos[b]:], other[b, pos[b]:])  # it is this image that matters
    with pytest.raises(ValueError, match="no <image> id"):
        with model.bridge.conditioned(model.image_features(batch["pixel_values"])):
            model.llm(input_ids=ids.masked_fill(ids == model.image_token_id, 1))
