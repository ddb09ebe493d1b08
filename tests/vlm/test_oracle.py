"""The oracle tower: its grid against a hand-built sample, the lookup of the image actually shown
(exported file, fresh render, blank, foreign image), and both bridges through the VLM."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_vlm import vlm_config
from vlm.config import WorldConfig
from vlm.model.oracle import GRID, ORACLE_WIDTH, OracleTower, cell_features, empty_grid
from vlm.model.vision_language_model import VisionLanguageModel
from vlm.world.export import export_world
from vlm.world.generator import generate_sample
from vlm.world.types import WorldObject, WorldSample
from vlm.world.vocab import COLORS, SHAPES

N_S, N_C = len(SHAPES), len(COLORS)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("oracle_world")
    export_world(out, WorldConfig(n_train=12, n_eval=4), progress=False)
    return out


@pytest.fixture(scope="module")
def tower(world):
    return OracleTower(world)


def hand_sample() -> WorldSample:
    """64 px: a large red square on pixels [0:16, 0:16] (cells (0,0)-(1,1)) and a small blue circle
    of 4 x 4 pixels at rows 20:24, cols 42:46 (a quarter of cell (2, 5))."""
    inst = np.zeros((64, 64), dtype=np.int64)
    inst[0:16, 0:16] = 1
    inst[20:24, 42:46] = 2
    objects = [WorldObject("square", "red", "large", (0, 0, 16, 16), (8.0, 8.0)),
               WorldObject("circle", "blue", "small", (42, 20, 46, 24), (44.0, 22.0))]
    return WorldSample(index=0, image=np.zeros((64, 64, 3), np.uint8), class_mask=inst.copy(), instance_mask=inst,
                       objects=objects, relations=[], captions={}, long_caption="", referring=[])


def expected_cell(shape, color, size, cover, r, c) -> torch.Tensor:
    row = torch.zeros(ORACLE_WIDTH)
    row[SHAPES.index(shape)] = 1
    row[N_S + list(COLORS).index(color)] = 1
    row[N_S + N_C] = float(size == "large")
    row[N_S + N_C + 1] = 1
    row[N_S + N_C + 2] = cover
    row[-2:] = torch.tensor([(r + 0.5) / GRID, (c + 0.5) / GRID])
    return row


def test_grid_of_a_hand_built_sample():
    feats = cell_features(hand_sample())
    assert feats.shape == (GRID * GRID, ORACLE_WIDTH)
    for r, c in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        assert torch.equal(feats[r * GRID + c], expected_cell("square", "red", "large", 1.0, r, c))
    assert torch.equal(feats[2 * GRID + 5], expected_cell("circle", "blue", "small", 0.25, 2, 5))
    background = [k for k in range(GRID * GRID) if k not in (0, 1, GRID, GRID + 1, 2 * GRID + 5)]
    assert torch.equal(feats[background], empty_grid()[background])
    assert feats[background, :-2].abs().sum() == 0


def loop_cell_features(sample: WorldSample, grid: int = GRID) -> torch.Tensor:
    """The grid cell by cell: np.unique per cell, the most frequent id (the smaller on a tie)."""
    from vlm.model.oracle import cell_bounds
    feats = empty_grid(grid)
    inst = sample.instance_mask
    ys, xs = cell_bounds(inst.shape[0], grid), cell_bounds(inst.shape[1], grid)
    for r in range(grid):
        for c in range(grid):
            block = inst[ys[r]:ys[r + 1], xs[c]:xs[c + 1]]
            ids, counts = np.unique(block[block > 0], return_counts=True)
            if len(ids):
                obj = sample.objects[int(ids[counts.argmax()]) - 1]
                feats[r * grid + c] = expected_cell(obj.shape, obj.color, obj.size, float((block > 0).mean()), r, c)
    return feats


@pytest.mark.parametrize("size", [64, 60])  # 60 px: cells of 7 and 8 px
def test_grid_matches_a_cell_by_cell_loop(size):
    cfg = WorldConfig(image_size=size, n_train=40, n_eval=0, max_objects=4)
    for i in range(40):
        sample = generate_sample(i, cfg.seed, cfg)
        torch.testing.assert_close(cell_features(sample), loop_cell_features(sample), rtol=0, atol=1e-7)


def test_index_reads_the_arrays_and_the_other_jpegs(world, tower):
    cfg = tower.index.cfg
    assert sorted(tower.index.indices.tolist()) == list(range(cfg.n_train + cfg.n_eval))
    assert len(tower.index.exact) == cfg.n_train + cfg.n_eval  # every exported image by its exact pixels


def test_index_without_arrays_reads_every_jpeg(world, tower, tmp_path):
    import shutil

    from vlm.model.oracle import WorldIndex
    bare = tmp_path / "no_arrays"
    shutil.copytree(world, bare, ignore=shutil.ignore_patterns("arrays"))
    index = WorldIndex(bare)
    assert index.exact == tower.index.exact  # the arrays hold the JPEGs' very pixels
    order = {int(i): k for k, i in enumerate(tower.index.indices)}
    torch.testing.assert_close(index.prints, tower.index.prints[[order[int(i)] for i in index.indices]])


def test_lookup_uses_the_image_shown(world, tower):
    cfg = tower.index.cfg
    indices = [3, cfg.n_train + 1]  # a train and a held-out image
    files = [Image.open(world / "images" / f"{i:08d}.jpg").convert("RGB") for i in indices]
    rendered = generate_sample(5, cfg.seed, cfg).image  # lossless render, not the JPEG
    blank = Image.new("RGB", (64, 64), tuple(round(255 * m) for m in tower.transform.mean))
    pixels = torch.stack([tower.transform(im) for im in [*files, rendered, blank]])
    feats = tower(pixels)
    assert feats.shape == (4, GRID * GRID, ORACLE_WIDTH)
    for b, i in enumerate([*indices, 5]):
        assert torch.equal(feats[b], cell_features(generate_sample(i, cfg.seed, cfg)))
    assert torch.equal(feats[3], empty_grid())
    swapped = tower(pixels[[1, 0]])  # the grid follows the pixels, not the batch position
    assert torch.equal(swapped[0], feats[1]) and torch.equal(swapped[1], feats[0])


def test_a_foreign_image_is_refused(tower):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="not an image of the world"):
        tower(tower.transform(noise)[None])


@pytest.mark.parametrize("bridge", ["projector", "flamingo"])
def test_both_bridges_read_the_oracle_grid(world, tiny_llm_dir, tmp_path, bridge):
    torch.manual_seed(0)
    cfg = vlm_config("oracle", tiny_llm_dir, bridge, oracle_world=str(world))
    model = VisionLanguageModel.build(cfg).eval()
    image = Image.open(world / "images" / "00000002.jpg").convert("RGB")
    batch = model.processor([image], ["Is there a red circle?"])
    assert model.tower(batch["pixel_values"]).shape == (1, GRID * GRID, ORACLE_WIDTH)
    scores = model.score(batch["pixel_values"], ["Is there a red circle?"], ["Yes", "No"])
    assert scores.shape == (1, 2) and torch.isfinite(scores).all()
    model.save_pretrained(tmp_path / "ckpt")
    again = VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    assert isinstance(again.tower, OracleTower) and again.cfg.vision_tower == "oracle"
    assert torch.allclose(again.score(batch["pixel_values"], ["Is there a red circle?"], ["Yes", "No"]), scores)
