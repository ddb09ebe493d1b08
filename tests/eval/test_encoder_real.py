"""``vlm eval encoder`` on real files: ImageFolder zero-shot and COCO-captions retrieval, checked
against the same numbers computed by hand from the DualEncoder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from encoders.dual_encoder import DualEncoder
from eval.encoder_real import read_classnames, read_imagefolder, read_templates
from vlm.cli import main
from vlm.config import EncoderConfig, TextTowerConfig, VisionTowerConfig
from vlm.data.formats import write_coco_captions
from vlm.data.tokenizer import train_bpe_tokenizer

CLASSES = {"red_square": (220, 30, 30), "blue_circle": (30, 30, 220), "green_star": (30, 200, 30)}


@pytest.fixture(scope="module")
def dual_dir(tmp_path_factory):
    words = [f"a photo of a {c.replace('_', ' ')}." for c in CLASSES] + ["a picture of a thing.", "two shapes"]
    tok = train_bpe_tokenizer(words * 5, vocab_size=200, add_eos=True)
    torch.manual_seed(0)
    cfg = EncoderConfig(vision=VisionTowerConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1,
                                                 num_heads=2, mlp_ratio=2),
                        text=TextTowerConfig(hidden_size=32, num_layers=1, num_heads=2, max_len=32), embed_dim=16,
                        pool="cls", global_mlp=False, local_heads=False)
    out = tmp_path_factory.mktemp("enc") / "dual"
    DualEncoder(cfg, tok).save_pretrained(out)
    return out


def write_imagefolder(root):
    rng = np.random.default_rng(0)
    for c, colour in CLASSES.items():
        for k in range(2):
            folder = root / c / ("nested" if k else "")
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{k}.png")
    (root / "notes.txt").write_text("not a class")
    return root


@torch.no_grad()
def global_image_emb(dual, paths):
    pixels = torch.stack([dual.transform(Image.open(p).convert("RGB")) for p in paths])
    return F.normalize(dual.encode_image(pixels).global_emb, dim=-1)


def test_imagefolder_zero_shot_matches_the_hand_computation(dual_dir, tmp_path, capsys):
    root = write_imagefolder(tmp_path / "folder")
    (tmp_path / "names.txt").write_text("blue circle\ngreen star\nred square\n")
    (tmp_path / "templates.txt").write_text("a photo of a {c}.\na picture of a {}.\n")
    out = tmp_path / "out"
    assert main(["eval", "encoder", "--ckpt", str(dual_dir), "--imagefolder", str(root), "--classnames",
                 str(tmp_path / "names.txt"), "--templates", str(tmp_path / "templates.txt"), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())["zero_shot"]
    preds = [json.loads(line) for line in (out / "predictions_zero_shot.jsonl").read_text().splitlines()]
    assert summary["n_images"] == len(preds) == 6 and summary["n_classes"] == 3 and summary["top3"] == 1.0
    assert summary["top1"] == pytest.approx(np.mean([p["pred"] == p["label"] for p in preds]))
    # By hand: open_clip's classifier (mean of the normalised template embeddings) and the cosine argmax.
    dual = DualEncoder.from_pretrained(dual_dir).eval()
    names = ["blue circle", "green star", "red square"]
    with torch.no_grad():
        cls = torch.stack([F.normalize(F.normalize(dual.encode_texts([f"a photo of a {n}.", f"a picture of a {n}."])
                                                   .global_emb, dim=-1).mean(0), dim=-1) for n in names])
    data = read_imagefolder(root)
    want = (global_image_emb(dual, data.paths) @ cls.T).argmax(1)
    assert [p["pred"] for p in preds] == [names[int(i)] for i in want]
    assert [p["label"] for p in preds] == [names[y] for y in data.labels]
    assert preds[1]["image"] == "blue_circle/nested/1.png"


def test_coco_retrieval_matches_the_hand_computation(dual_dir, tmp_path):
    root = write_imagefolder(tmp_path / "imgs")
    files = {i + 1: str(p.relative_to(root)) for i, p in enumerate(read_imagefolder(root).paths)}
    caps = {i: [f"a photo of a {f.split('/')[0].replace('_', ' ')}.", "two shapes"][: 1 + i % 2] for i, f in files.items()}
    write_coco_captions(tmp_path / "captions.json", files, caps)
    out = tmp_path / "out"
    assert main(["eval", "encoder", "--ckpt", str(dual_dir), "--captions", str(tmp_path / "captions.json"),
                 "--images", str(root), "--out", str(out), "--limit", "5"]) == 0
    summary = json.loads((out / "summary.json").read_text())["retrieval"]
    recs = [json.loads(line) for line in (out / "predictions_retrieval.jsonl").read_text().splitlines()]
    assert summary["n_images"] == len(recs) == 5 and summary["n_captions"] == sum(len(caps[i]) for i in range(1, 6))
    assert summary["i2t_r10"] == 1.0 and summary["t2i_r10"] == 1.0  # fewer candidates than 10
    dual = DualEncoder.from_pretrained(dual_dir).eval()
    texts = [c for i in range(1, 6) for c in caps[i]]
    with torch.no_grad():
        sim = global_image_emb(dual, [root / files[i] for i in range(1, 6)]) @ F.normalize(
            dual.encode_texts(texts).global_emb, dim=-1).T
    owner = [i for i in range(5) for _ in caps[i + 1]]
    for n, rec in enumerate(recs):
        own = [j for j, o in enumerate(owner) if o == n]
        best = max(float(sim[n, j]) for j in own)
        assert rec["i2t_rank"] == sum(float(v) >= best for j, v in enumerate(sim[n]) if j not in own)  # 0-based
    assert summary["i2t_r1"] == pytest.approx(np.mean([r["i2t_rank"] == 0 for r in recs]))


def test_real_data_inputs_are_checked(tmp_path, dual_dir, capsys):
    with pytest.raises(ValueError, match="2 names for 3 class folders"):
        (tmp_path / "n.txt").write_text("a\nb\n")
        read_classnames(tmp_path / "n.txt", ["x", "y", "z"])
    (tmp_path / "n.json").write_text(json.dumps({"x": "ex", "y": "why"}))
    assert read_classnames(tmp_path / "n.json", ["y", "x"]) == ["why", "ex"]
    assert read_classnames(None, ["red_square"]) == ["red square"]
    (tmp_path / "t.txt").write_text("no slot here\n")
    with pytest.raises(ValueError, match="one \\{\\}"):
        read_templates(tmp_path / "t.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        read_imagefolder(tmp_path / "empty")
    with pytest.raises(ValueError, match="--captions needs --images"):
        main(["eval", "encoder", "--ckpt", str(dual_dir), "--captions", str(tmp_path / "c.json")])
