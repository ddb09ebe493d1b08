"""``optim.accum_freq``: open_clip's cached-feature accumulation gives the whole batch's loss and gradient.

A tiny float64 ``Stage1Model`` per objective. References: ``model(batch)`` on the whole batch in one
process. Checked: one process with the batch split into 2 or 4 micro-batches; two gloo processes
under DDP (each rank half the batch), without accumulation and with each half split in 2. DDP
averages the ranks' gradients, which for CLIP, SigLIP and SPARC is the single-process gradient of
the concatenated batch. FLAIR's text-conditioned term is by construction not the single-process
loss of the concatenated batch (per-rank chunks, see tests/encoders/test_distributed_loss.py), so
its two-rank runs with accumulation are compared with its two-rank runs without.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from encoders.dual_encoder import DualEncoder
from encoders.registry import objective_config_class
from encoders.stage1_model import Stage1Model, split_batch
from training import stage1
from training.data import ShardBatches
from training.loop import cached_forward_backward, forward_backward, train
from vlm.config import ConfigError, EncoderConfig, OptimConfig, RunConfig, TextTowerConfig, VisionTowerConfig
from vlm.data.tokenizer import train_bpe_tokenizer

WORLD, B, K, L = 2, 4, 2, 6  # B images per rank; FLAIR: K sub-captions per image
NAMES = ("clip", "siglip", "sparc", "flair")
CORPUS = ["a small red circle left of a large blue square.", "two green triangles.",
          "a yellow star above a purple circle."] * 10


def make_tokenizer():
    return train_bpe_tokenizer(CORPUS, vocab_size=120, add_eos=True)


def build(name: str, tokenizer) -> Stage1Model:
    """The objective's paper encoder (pool, global MLP), tiny, in float64, seeded identically."""
    cfg = objective_config_class(name)(**({"num_subcaptions": K, "num_heads": 2} if name == "flair" else {}))
    enc = EncoderConfig(vision=VisionTowerConfig(image_size=16, patch_size=8, hidden_size=16, num_layers=1,
                                                 num_heads=2, mlp_ratio=2),
                        text=TextTowerConfig(hidden_size=16, num_layers=1, num_heads=2, max_len=8),
                        embed_dim=8, **cfg.encoder_defaults)
    torch.manual_seed(0)
    return Stage1Model.build(DualEncoder(enc, tokenizer), cfg).double()


def make_batch(name: str, tokenizer, images: int, seed: int = 0) -> dict:
    """A stage-one batch as ``stage1_collate`` makes it (FLAIR: K sub-captions per image, image-major),
    with word ids and captions of 1..L-1 real tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = images * (K if name == "flair" else 1)
    special = max(tokenizer.all_special_ids) + 1
    ids = torch.randint(special, len(tokenizer), (rows, L), generator=g)
    lengths = torch.randint(1, L, (rows,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    return {"pixel_values": torch.randn(images, 3, 16, 16, generator=g, dtype=torch.float64),
            "input_ids": ids * mask, "attention_mask": mask}


def rank_batch(batch: dict, rank: int, name: str) -> dict:
    """Rank ``rank``'s B images of a WORLD * B batch, with FLAIR's negatives of a B-image rank batch."""
    part = split_batch(batch, WORLD)[rank]
    if name == "flair":
        part["flair_neg_index"] = torch.randint(0, K, (B, B - 1), generator=torch.Generator().manual_seed(rank))
    return part


def grads_after(model: torch.nn.Module, step) -> dict:
    """Run ``step()`` (forward and backward) from zero gradients -> {"loss", every parameter's gradient}."""
    inner = model.module if isinstance(model, DDP) else model
    inner.zero_grad(set_to_none=True)
    out = step()
    res = {"loss": out["loss"].detach().clone()}
    for pname, p in inner.named_parameters():
        res[pname] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
    return res


def assert_same(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-8, atol=1e-11, msg=f"{what}: {key}")


# ------------------------------------------------------------------------------------------------
# One process
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.mark.parametrize("name", NAMES)
def test_one_process_accumulation_equals_the_whole_batch(tokenizer, name):
    model = build(name, tokenizer)
    batch = make_batch(name, tokenizer, WORLD * B)  # FLAIR draws its negatives: once per batch
    torch.manual_seed(1)
    want = grads_after(model, lambda: forward_backward(model, batch, sync=True))
    assert float(want["loss"]) > 0
    for accum in (2, 4):
        torch.manual_seed(1)
        got = grads_after(model, lambda: cached_forward_backward(model, batch, accum, sync=True))
        assert_same(got, want, f"{name} accum_freq={accum}")
    # not vacuous: the towers and the objective's own parameters get gradient
    assert want["objective.logit_scale.log_scale"].abs() > 0
    assert all(want[k].abs().sum() > 0 for k in want if "patch_embedding" in k or "token_embedding" in k)


def test_objective_parameters_counted_once(tokenizer, monkeypatch):
    """Letting every pass give the logit scale its gradient (open_clip does) counts it accum_freq times."""
    model = build("clip", tokenizer)
    batch = make_batch("clip", tokenizer, WORLD * B)
    want = grads_after(model, lambda: forward_backward(model, batch, sync=True))
    original = Stage1Model.loss
    monkeypatch.setattr(Stage1Model, "loss", lambda self, enc, b, objective_grad=True: original(self, enc, b))
    got = grads_after(model, lambda: cached_forward_backward(model, batch, 4, sync=True))
    key = "objective.logit_scale.log_scale"
    torch.testing.assert_close(got[key], 4 * want[key])
    torch.testing.assert_close(got["encoder.heads.image_global.0.weight"], want["encoder.heads.image_global.0.weight"])


def test_naive_micro_batches_shrink_the_negatives(tokenizer):
    """What accum_freq replaces: the mean loss of separate micro-batches is not the whole batch's."""
    model = build("clip", tokenizer)
    batch = make_batch("clip", tokenizer, WORLD * B)
    with torch.no_grad():
        whole = model(batch)["loss"]
        parts = torch.stack([model(m)["loss"] for m in split_batch(batch, 4)]).mean()
    assert abs(float(whole - parts)) > 1e-3


def test_split_batch_and_config_checks(tokenizer):
    batch = {**make_batch("flair", tokenizer, 4), "flair_neg_index": torch.zeros(4, 3, dtype=torch.long)}
    parts = split_batch(batch, 2)
    assert parts[1]["pixel_values"].shape[0] == 2 and parts[1]["input_ids"].shape[0] == 2 * K
    torch.testing.assert_close(parts[1]["input_ids"], batch["input_ids"][2 * K:])  # image-major rows
    assert "flair_neg_index" not in parts[0]  # the objective reads the whole batch's
    with pytest.raises(ValueError, match="accum_freq=3"):
        split_batch(batch, 3)
    with pytest.raises(ConfigError, match="optim.accum_freq"):
        OptimConfig(batch_size=6, accum_freq=4)
    with pytest.raises(ConfigError, match="optim.accum_freq"):
        OptimConfig(accum_freq=0)


def test_loop_refuses_accum_freq_without_cached_accumulation(tmp_path):
    model = torch.nn.Linear(2, 1)
    run = RunConfig(out_dir=str(tmp_path / "run"), device="cpu", progress=False, tensorboard=False)
    with pytest.raises(ValueError, match="accum_freq=2 needs a model with cached accumulation"):
        train(model, lambda start: iter(()), OptimConfig(batch_size=4, accum_freq=2), run)


# ------------------------------------------------------------------------------------------------
# Two gloo processes under DDP
# ------------------------------------------------------------------------------------------------


def worker(rank: int, init_file: str, out_dir: str, tokenizer) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name in NAMES:
            model = build(name, tokenizer)
            wrapped = DDP(model, find_unused_parameters=model.ddp_find_unused_parameters)
            batch = rank_batch(make_batch(name, tokenizer, WORLD * B), rank, name)
            res = grads_after(wrapped, lambda: forward_backward(wrapped, batch, sync=True))
            results.update({f"{name}/1/{k}": v for k, v in res.items()})
            res = grads_after(wrapped, lambda: cached_forward_backward(wrapped, batch, 2, sync=True))
            results.update({f"{name}/2/{k}": v for k, v in res.items()})
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_and_without_accumulation_equal_the_whole_batch(tmp_path, tokenizer):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path), tokenizer), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for name in NAMES:
        model = build(name, tokenizer)
        if name == "flair":  # its two-rank loss is not the one-process one: accumulation must not change it
            want = {k[len("flair/1/"):]: v for k, v in ranks[0].items() if k.startswith("flair/1/")}
            want["loss"] = torch.stack([res["flair/1/loss"] for res in ranks]).mean()
        else:
            want = grads_after(model, lambda: forward_backward(model, make_batch(name, tokenizer, WORLD * B), True))
        for accum in (1, 2):
            for r, res in enumerate(ranks):  # DDP leaves the averaged gradient on every rank
                got = {k.split("/", 2)[2]: v for k, v in res.items() if k.startswith(f"{name}/{accum}/")}
                got["loss"] = torch.stack([x[f"{name}/{accum}/loss"] for x in ranks]).mean()
                assert_same(got, want, f"{name} rank {r} accum_freq={accum}")
        assert want["encoder.heads.text_global.weight"].abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# The stage-one recipe: accum_freq in the saved config, exact resume
# ------------------------------------------------------------------------------------------------


def test_stage1_run_with_accum_freq_resumes_exactly(tmp_path, monkeypatch):
    from test_stage1 import tiny_cfg, write_shards  # here: the two-rank test's processes need not import it

    shards = write_shards(tmp_path / "shards", n_shards=1, per_shard=32)
    ref_final = stage1.run(tiny_cfg(shards, tmp_path / "ref", "flair", steps=4, accum_freq=2))
    assert "accum_freq: 2" in (tmp_path / "ref" / "config.yaml").read_text()
    rows = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)
    original = ShardBatches.__call__

    class Interrupt(Exception):
        pass

    def failing(self, start=0):
        for i, batch in enumerate(original(self, start)):
            if start + i == 3:  # in step 4, after the step-3 checkpoint
                raise Interrupt
            yield batch

    monkeypatch.setattr(ShardBatches, "__call__", failing)
    with pytest.raises(Interrupt):
        stage1.run(tiny_cfg(shards, tmp_path / "cut", "flair", steps=4, accum_freq=2))
    monkeypatch.setattr(ShardBatches, "__call__", original)
    torch.manual_seed(99)  # the resumed run must not depend on the global RNG state at start
    cfg = tiny_cfg(shards, tmp_path / "cut", "flair", steps=4, accum_freq=2)
    cfg.run.resume = True
    got, ref = Stage1Model.from_pretrained(stage1.run(cfg)), Stage1Model.from_pretrained(ref_final)
    for (name, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a, b), name
