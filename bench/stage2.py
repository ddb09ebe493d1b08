"""Stage-two benchmark: training tokens/s per bridge, and generation tokens/s with vs without KV cache.

The models are the tiny recipes (``configs/stage2/{projector,flamingo}_tiny.yaml``): the tower and
LLM they name when those checkpoints exist (``runs/stage1/sparc/final``, ``runs/lm/final``), else
random stand-ins of the same sizes (the stage-one tiny tower of ``configs/stage1/sparc_tiny.yaml``,
the LM of ``configs/lm/tiny_world.yaml`` with a BPE trained on the world's text); cost does not
depend on the weights. Batches are real world samples and LLaVA conversations.

1. Training tokens/s (forward + backward + AdamW step on the trainable parameters, median of
   ``iters`` after ``warmup``; tokens = real tokens, image tokens included) for each bridge, and
   the implied wall time of the tiny recipe (``optim.max_steps`` steps).
2. Generation tokens/s (greedy, ``new_tokens`` new tokens for each of ``gen_batch`` prompts, every
   sequence forced to full length) with the KV cache and without it, and their ratio.
3. Padding: the tokens an epoch of ``pad_samples`` world conversations computes (each batch padded
   to its longest) with shuffled batches over with length-grouped ones (``data.group_by_length``);
   a count, not a time, so it does not move with the machine's load.

``python -m bench.stage2 [--device cpu|cuda]`` prints the table.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.common import Row, format_table, median_time
from encoders.config import Stage1Config
from encoders.towers import build_vision_tower, default_transform, is_conv_tower, load_vision_tower
from training.data import ResumableBatches
from training.lm import build_lm
from vlm.config import LMConfig, Stage2Config, load_config
from vlm.data.prompts import IMAGE_TOKEN
from vlm.data.tokenizer import train_bpe_tokenizer
from vlm.model.vision_language_model import VisionLanguageModel
from vlm.world.generator import generate_sample, world_corpus
from vlm.world.text import llava_conversations

ROOT = Path(__file__).resolve().parents[1]


def stand_ins(directory: Path, world_cfg) -> tuple[Path, Path]:
    """Random tower and LLM of the tiny recipes' sizes, saved under ``directory``: (tower, llm)."""
    s1 = load_config(Stage1Config, ROOT / "configs/stage1/sparc_tiny.yaml")
    lm_cfg = load_config(LMConfig, ROOT / "configs/lm/tiny_world.yaml")
    torch.manual_seed(0)
    tower = build_vision_tower(s1.model.vision)
    tower.save_pretrained(str(directory / "tower"))
    default_transform(tower).save_pretrained(directory / "tower")
    tok = train_bpe_tokenizer(world_corpus(world_cfg, range(300)), vocab_size=lm_cfg.model.vocab_size,
                              model_max_length=lm_cfg.model.max_position, extra_special_tokens=(IMAGE_TOKEN,),
                              add_bos=True, add_eos=True)
    build_lm(lm_cfg.model, tok).save_pretrained(str(directory / "llm"))
    tok.save_pretrained(str(directory / "llm"))
    return directory / "tower", directory / "llm"


def world_batch(model, world_cfg, n: int) -> tuple[list, list[list[tuple[str, str]]]]:
    """n world images and one LLaVA conversation each."""
    images, convs = [], []
    for i in range(n):
        sample = generate_sample(i, world_cfg.seed, world_cfg)
        images.append(sample.image)
        convs.append(llava_conversations(sample, world_cfg.seed, world_cfg.image_size)[0])
    return images, convs


def padded_tokens(lengths: list[int], batch_size: int, group: int) -> int:
    """Tokens of one epoch when each batch is padded to its longest sequence (``group`` 0: shuffled)."""
    rb = ResumableBatches(len(lengths), batch_size, lambda ids: ids, seed=0, lengths=lengths, group_by_length=group)
    idx = rb.epoch_indices(0)
    return sum(max(lengths[i] for i in idx[b:b + batch_size]) * batch_size for b in range(0, len(idx), batch_size))


def padding_row(model, world_cfg, batch_size: int, group: int, n: int) -> Row:
    """Padded tokens per epoch, shuffled / length-grouped batches, on ``n`` world conversations."""
    lengths = []
    for i in range(n):
        for conv in llava_conversations(generate_sample(i, world_cfg.seed, world_cfg), world_cfg.seed,
                                        world_cfg.image_size):
            lengths.append(len(model.processor.encode_conversation(conv)[0]))
    ratio = padded_tokens(lengths, batch_size, 0) / padded_tokens(lengths, batch_size, group)
    return Row(f"stage2: padded tokens per epoch, shuffled / grouped by length (group {group}, batch {batch_size})",
               ratio, "x", "> 1")


def run(device: str = "auto", warmup: int = 2, iters: int = 5, gen_batch: int = 8, new_tokens: int = 32,
        tower: str = "", llm: str = "", pad_samples: int = 1000) -> list[Row]:
    """Measure both bridges; returns the rows."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfgs = {b: load_config(Stage2Config, ROOT / f"configs/stage2/{b}_tiny.yaml") for b in ("projector", "flamingo")}
        world_cfg = cfgs["projector"].world
        tower_path = Path(tower or cfgs["projector"].model.vision_tower)
        llm_path = Path(llm or cfgs["projector"].model.llm)
        source = "trained checkpoints"
        if not (tower_path.is_dir() and llm_path.is_dir()):
            tower_path, llm_path = stand_ins(Path(tmp), world_cfg)
            source = "random stand-ins of the same sizes"
        print(f"stage-two bench on {dev}: tower {tower_path}, llm {llm_path} ({source})")
        conv = is_conv_tower(load_vision_tower(tower_path)[0])
        for bridge, cfg in cfgs.items():
            cfg.model.vision_tower, cfg.model.llm = str(tower_path), str(llm_path)
            if conv:  # a conv tower has no CLS and no penultimate grid: its last stage's full grid (as the demo)
                cfg.model.vision_feature_layer, cfg.model.vision_feature_select_strategy = -1, "full"
            torch.manual_seed(0)
            model = VisionLanguageModel.build(cfg.model, max_len=cfg.data.max_len).to(dev)
            images, convs = world_batch(model, world_cfg, cfg.optim.batch_size)
            batch = {k: v.to(dev) for k, v in model.processor.conversations(images, convs).items()}
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4)
            autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda"
                        else torch.autocast("cpu", enabled=False))

            def step() -> None:
                with autocast:
                    loss = model(batch)["loss"]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            model.train()
            seconds = median_time(step, dev, warmup, iters)
            tokens = int(batch["attention_mask"].sum())
            rows.append(Row(f"stage2 {bridge}: train tokens/s (batch {cfg.optim.batch_size})", tokens / seconds,
                            "tok/s"))
            rows.append(Row(f"stage2 {bridge}: tiny recipe ({cfg.optim.max_steps} steps), implied wall time",
                            seconds * cfg.optim.max_steps, "s", "<= 240 s on 2 CPU cores"))

            model.eval()
            prompts = [c[0][1] for c in convs[:gen_batch]]
            pixels = model.processor.pixel_values(images[:gen_batch])
            speeds = {}
            for use_cache in (True, False):
                def gen() -> None:
                    model.generate_ids(pixels, prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       use_cache=use_cache)
                speeds[use_cache] = gen_batch * new_tokens / median_time(gen, dev, 1, max(2, iters // 2))
            rows.append(Row(f"stage2 {bridge}: generate tokens/s with KV cache", speeds[True], "tok/s"))
            rows.append(Row(f"stage2 {bridge}: generate tokens/s without KV cache", speeds[False], "tok/s"))
            rows.append(Row(f"stage2 {bridge}: KV-cache speed-up ({new_tokens} new tokens)",
                            speeds[True] / speeds[False], "x", "> 1"))
            if bridge == "projector":
                rows.append(padding_row(model, world_cfg, cfg.optim.batch_size, cfg.data.group_by_length or 16,
                                        pad_samples))
            del model, opt
    return rows


def main() -> None:
    """Command line: print the stage-two table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--tower", default="", help="vision tower dir (default: the tiny recipe's)")
    parser.add_argument("--llm", default="", help="LLM dir (default: the tiny recipe's)")
    args = parser.parse_args()
    rows = run(args.device, iters=args.iters, new_tokens=args.new_tokens, tower=args.tower, llm=args.llm)
    print(format_table(rows, "stage two"))


if __name__ == "__main__":
    main()
