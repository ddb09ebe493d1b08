"""The pre-decoded train arrays: the same pixels and texts as the shards, twins beside them."""
import numpy as np
import pytest

from training.data import ArrayBatches, twin_pairs
from vlm.config import WorldConfig
from vlm.data.shards import ShardStream
from vlm.world.arrays import TrainArrays
from vlm.world.export import export_world, shard_caption
from vlm.world.generator import generate_twin

CFG = WorldConfig(n_train=24, n_eval=4, seed=5, twins=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    export_world(out, CFG, progress=False, samples_per_shard=10)
    return out


def test_arrays_equal_the_shards_pixel_for_pixel(world):
    arrays = TrainArrays(world)
    assert arrays.images.shape == (24, 64, 64, 3) and arrays.images.dtype == np.uint8
    stream = ShardStream(sorted(str(p) for p in (world / "shards").glob("*.tar")), shuffle_buffer=0)
    seen = 0
    for sample in stream:
        row = int(sample["key"])
        assert np.array_equal(np.asarray(sample["image"]), arrays.images[row])
        assert sample["text"] == arrays.index["captions"][row]
        assert sample["json"]["long_caption"] == arrays.index["long_captions"][row]
        seen += 1
    assert seen == 24


def test_twins_are_stored_with_their_texts(world):
    arrays = TrainArrays(world)
    for row in (0, 7):
        twin, _k, attr = generate_twin(row, CFG.seed, CFG)
        s = arrays.sample(row, twin=True)
        assert s["text"] == shard_caption(twin) and arrays.index["twin_attributes"][row] == attr
        assert np.abs(s["image"].astype(int) - twin.image).mean() < 6  # the JPEG round trip
        assert not np.array_equal(s["image"], arrays.images[row])


def test_array_batches_put_twins_beside_their_rows_and_resume_exactly(world):
    arrays = TrainArrays(world)
    collate = lambda pairs, worker: {"keys": [s["key"] for _, s in pairs], "pos": [p for p, _ in pairs]}
    batches = ArrayBatches(arrays, 8, collate, seed=1, twin_fraction=0.5)
    assert twin_pairs(8, 0.5) == 2
    it = batches(0)
    first = [next(it) for _ in range(5)]
    for b, batch in enumerate(first):
        keys = batch["keys"]
        assert len(keys) == 8 and keys[6:] == [keys[0] + "-twin", keys[1] + "-twin"]
        assert batch["pos"] == list(range(8 * b, 8 * b + 8))
    assert next(batches(3)) == first[3]


def test_missing_arrays_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_images.npy"):
        TrainArrays(tmp_path)


def test_twin_fraction_without_twins_is_a_clear_error(tmp_path):
    cfg = WorldConfig(n_train=8, n_eval=2, seed=1)
    export_world(tmp_path, cfg, progress=False)
    with pytest.raises(ValueError, match="world.twins"):
        ArrayBatches(TrainArrays(tmp_path), 4, lambda p, w: p, seed=0, twin_fraction=0.5)
