"""The world's train split as pre-decoded arrays: the demo's fast stage-one data path.

Beside the shards, ``vlm world`` writes
```
arrays/train_images.npy         uint8 [N, S, S, 3]: the train images, decoded from the very JPEG bytes
                                stored in the shards (so the pixels equal the shard path's)
arrays/train_twin_images.npy    uint8 [N, S, S, 3]: each image's twin (``world.twins``: one object's
                                shape or colour changed; ``generator.generate_twin``), JPEG round trip too
arrays/train.json               {"keys", "captions", "long_captions", "objects"[, "twin_captions",
                                "twin_long_captions", "twin_attributes", "twin_objects"]}: row i of the
                                arrays; "objects" holds [shape, colour, size] per object
```
Reading a batch is a slice of a memory-mapped ``.npy`` (``numpy.load(..., allow_pickle=False)``):
the images of a batch of 64 cost 2.7x less than from the tar shards (``python -m bench.data_path``). Files are written under a temporary
name and renamed when complete.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from vlm.files import atomic_write_text, read_json

ARRAYS_DIR = "arrays"
IMAGES_FILE = "train_images.npy"
TWINS_FILE = "train_twin_images.npy"
INDEX_FILE = "train.json"


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> uint8 [H, W, 3] RGB, as the shard reader decodes them (PIL, convert("RGB"))."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


class TrainArrayWriter:
    """Fills ``arrays/`` row by row during the export; ``close()`` renames the files into place."""

    def __init__(self, out: Path, n: int, image_size: int, twins: bool) -> None:
        self.dir = Path(out) / ARRAYS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        shape = (n, image_size, image_size, 3)
        self.images = np.lib.format.open_memmap(self.dir / (IMAGES_FILE + ".tmp"), mode="w+", dtype=np.uint8,
                                                shape=shape)
        self.twins = (np.lib.format.open_memmap(self.dir / (TWINS_FILE + ".tmp"), mode="w+", dtype=np.uint8,
                                                shape=shape) if twins else None)
        self.index: dict[str, list] = {"keys": [], "captions": [], "long_captions": [], "objects": []}
        if twins:
            self.index.update(twin_captions=[], twin_long_captions=[], twin_attributes=[], twin_objects=[])

    def add(self, row: int, key: str, jpg: bytes, caption: str, long_caption: str, objects: list[list[str]],
            twin: Optional[tuple[bytes, str, str, str, list[list[str]]]] = None) -> None:
        """Row ``row``: the decoded ``jpg``, its texts and objects ([shape, colour, size] each);
        ``twin`` = (jpg, caption, long caption, changed attribute, objects) when the writer keeps twins."""
        if row != len(self.index["keys"]):
            raise ValueError(f"rows must be added in order: expected {len(self.index['keys'])}, got {row}")
        self.images[row] = decode_jpeg(jpg)
        self.index["keys"].append(key)
        self.index["captions"].append(caption)
        self.index["long_captions"].append(long_caption)
        self.index["objects"].append(objects)
        if self.twins is not None:
            if twin is None:
                raise ValueError(f"row {row}: this writer keeps twins; none given")
            self.twins[row] = decode_jpeg(twin[0])
            self.index["twin_captions"].append(twin[1])
            self.index["twin_long_captions"].append(twin[2])
            self.index["twin_attributes"].append(twin[3])
            self.index["twin_objects"].append(twin[4])

    def close(self) -> None:
        """Flush and move every file into place (the index last)."""
        n = len(self.index["keys"])
        for arr, name in ((self.images, IMAGES_FILE), (self.twins, TWINS_FILE)):
            if arr is None:
                continue
            if n != arr.shape[0]:
                raise ValueError(f"{name}: {n} of {arr.shape[0]} rows written")
            arr.flush()
            (self.dir / (name + ".tmp")).replace(self.dir / name)
        self.images = self.twins = None  # type: ignore[assignment]
        atomic_write_text(self.dir / INDEX_FILE, json.dumps(self.index))


class TrainArrays:
    """Read what ``TrainArrayWriter`` wrote: ``images`` (and ``twin_images``) as read-only memory
    maps [N,S,S,3] uint8, ``index`` the texts of each row. Raises ``FileNotFoundError`` naming the
    missing file."""

    def __init__(self, world_dir: str | Path) -> None:
        d = Path(world_dir) / ARRAYS_DIR
        for name in (IMAGES_FILE, INDEX_FILE):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name} does not exist: export the world with `vlm world` first")
        self.images = np.load(d / IMAGES_FILE, mmap_mode="r", allow_pickle=False)
        self.index = read_json(d / INDEX_FILE, "train-array index")
        self.twin_images = (np.load(d / TWINS_FILE, mmap_mode="r", allow_pickle=False)
                            if (d / TWINS_FILE).is_file() and "twin_captions" in self.index else None)
        if len(self.index["keys"]) != self.images.shape[0]:
            raise ValueError(f"{d}: {INDEX_FILE} has {len(self.index['keys'])} rows, {IMAGES_FILE} "
                             f"{self.images.shape[0]}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def sample(self, row: int, twin: bool = False) -> dict:
        """Row ``row`` (or its twin) as a shard-style sample {"key", "image" uint8 [S,S,3], "text", "json"}."""
        if twin and self.twin_images is None:
            raise ValueError("these arrays have no twins: export the world with world.twins=true")
        prefix = "twin_" if twin else ""
        image = (self.twin_images if twin else self.images)[row]
        return {"key": self.index["keys"][row] + ("-twin" if twin else ""), "image": np.asarray(image),
                "text": self.index[f"{prefix}captions"][row],
                "json": {"long_caption": self.index[f"{prefix}long_captions"][row],
                         "objects": self.index[f"{prefix}objects"][row]}}
