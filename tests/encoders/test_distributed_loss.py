"""Two gloo processes give the single-process losses and gradients on the concatenated batch.

Each rank computes its local rows against the gathered columns; DDP would average parameter
gradients over ranks, so the effective gradient of rank r's input rows is its gradient / world
size, and the objectives' parameter gradients are averaged. Both must equal the single-process
gradients on the full batch.

FLAIR's text-conditioned term is by construction not the single-process loss of the concatenated
batch: as the reference (src/flair/loss.py ``FlairLoss.forward``), each rank samples its own
[B, B+K-1] texts and adds the other ranks' rows as negative-only chunks. Its single-process value
is therefore the float64 loop reference of that multi-rank loss on the full batch
(``test_flair_loss.loop_tcs_ranks``, the mean over the simulated ranks), with the multi-positive
term as the loop over each rank's rows against all captions.
"""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from encoders.features import ImageFeatures, TextFeatures
from encoders.objectives.clip import ClipConfig
from encoders.registry import build_objective, objective_config_class

WORLD, B, K, P, L, D, W = 2, 3, 2, 5, 4, 8, 6
NAMES = ("clip", "siglip", "sparc", "flair")


def make_data():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    n = WORLD * B
    mask = torch.ones(n, L, dtype=torch.bool)
    for i in range(n):
        mask[i, 1 + i % L:] = False
    return {"img_global": r(n, D), "patch_emb": r(n, P, D), "patch_tokens": r(n, P, W),
            "txt_global": r(n, D), "token_emb": r(n, L, D), "token_mask": mask,
            "sub_global": r(n * K, D), "neg_index": torch.randint(0, K, (n, B - 1), generator=g)}


def run_objectives(data, rows, names=NAMES):
    """Loss and gradients of every objective on the rows ``rows`` of the data (this rank's share)."""
    lo, hi = rows
    results = {}
    for name in names:
        torch.manual_seed(0)  # identical parameters on every rank
        cfg = objective_config_class(name)(**({"num_subcaptions": K, "num_heads": 2} if name == "flair" else {}))
        obj = build_objective(cfg, embed_dim=D, vision_width=W).double()
        leaf = {k: data[k][lo:hi].clone().requires_grad_(True)
                for k in ("img_global", "patch_emb", "patch_tokens", "txt_global", "token_emb")}
        sub = data["sub_global"][lo * K:hi * K].clone().requires_grad_(True)
        img = ImageFeatures(leaf["img_global"], leaf["patch_emb"], leaf["patch_tokens"])
        txt = TextFeatures(leaf["txt_global"], leaf["token_emb"], data["token_mask"][lo:hi])
        batch = {"sub_text": TextFeatures(sub, torch.zeros(sub.shape[0], L, D, dtype=torch.float64),
                                          torch.ones(sub.shape[0], L, dtype=torch.bool)),
                 "flair_neg_index": data["neg_index"][lo:hi]}
        out = obj(img, txt, batch)
        out["loss"].backward()
        results[f"{name}/loss"] = out["loss"].detach()
        for k, v in leaf.items():
            results[f"{name}/grad/{k}"] = v.grad if v.grad is not None else torch.zeros_like(v)
        results[f"{name}/grad/sub_global"] = sub.grad if sub.grad is not None else torch.zeros_like(sub)
        for pname, p in obj.named_parameters():
            results[f"{name}/param/{pname}"] = p.grad.detach().clone()
    # gather_with_grad=False gathers without gradient: same loss value (its gradients differ)
    obj = build_objective(ClipConfig(gather_with_grad=False), embed_dim=D, vision_width=W).double()
    img = ImageFeatures(data["img_global"][lo:hi], data["patch_emb"][lo:hi], data["patch_tokens"][lo:hi])
    txt = TextFeatures(data["txt_global"][lo:hi], data["token_emb"][lo:hi], data["token_mask"][lo:hi])
    results["clip_nograd/loss"] = obj(img, txt, {})["loss"].detach()
    return results


def worker(rank, init_file, out_dir, data):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = run_objectives(data, (rank * B, (rank + 1) * B))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def flair_multi_rank_reference(data):
    """FLAIR's single-process value of the WORLD-rank loss: the mean over simulated ranks of the
    loop references (same keys as ``run_objectives``)."""
    from test_flair_loss import log_sigmoid, cosine, loop_tcs_ranks

    torch.manual_seed(0)
    cfg = objective_config_class("flair")(num_subcaptions=K, num_heads=2)
    obj = build_objective(cfg, embed_dim=D, vision_width=W).double()
    img = data["img_global"].clone().requires_grad_(True)
    patches = data["patch_emb"].clone().requires_grad_(True)
    sub = data["sub_global"].clone().requires_grad_(True)
    t, bias = obj.logit_scale(), obj.logit_bias
    subs = sub.view(WORLD * B, K, D)
    tcs = loop_tcs_ranks(obj.pooling, patches, subs, data["neg_index"], t, bias, WORLD)
    total = 0.0
    for r in range(WORLD):
        mps = 0.0
        for i in range(r * B, (r + 1) * B):   # this rank's rows against every rank's captions
            for j in range(WORLD * B):
                for m in range(K):
                    z = 1.0 if i == j else -1.0
                    mps = mps - log_sigmoid(z * (t * cosine(img[i], subs[j, m]) + bias))
        total = total + (tcs[r] + mps / (B * K)) / 2
    loss = total / WORLD
    loss.backward()
    out = {"flair/loss": loss.detach(), "flair/grad/img_global": img.grad, "flair/grad/patch_emb": patches.grad,
           "flair/grad/sub_global": sub.grad}
    for pname, p in obj.named_parameters():
        out[f"flair/param/{pname}"] = p.grad.detach().clone()
    return out


def test_two_ranks_equal_single_process(tmp_path):
    data = make_data()
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path), data), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = run_objectives(data, (0, WORLD * B), names=[n for n in NAMES if n != "flair"])
    single.update(flair_multi_rank_reference(data))
    # FLAIR reads patch_emb (post-norm + global projection), never the tower-width tokens
    for key in ("flair/grad/patch_tokens", "flair/grad/txt_global", "flair/grad/token_emb"):
        assert all(float(res[key].abs().sum()) == 0 for res in ranks), key
    for key, expected in single.items():
        parts = [res[key] for res in ranks]
        if "/grad/" in key:      # row gradients: rank r owns its rows; DDP's average divides by WORLD
            got = torch.cat(parts) / WORLD
        else:                    # losses and parameter gradients: the mean over ranks
            got = torch.stack(parts).mean(0)
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12), key
    # the test is not vacuous: every objective moves its inputs
    for name in NAMES:
        assert single[f"{name}/grad/img_global"].abs().sum() > 0
    assert single["flair/grad/sub_global"].abs().sum() > 0 and single["flair/grad/patch_emb"].abs().sum() > 0
    assert single["sparc/grad/patch_emb"].abs().sum() > 0 and single["sparc/grad/token_emb"].abs().sum() > 0
