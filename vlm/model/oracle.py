"""The oracle tower: a vision tower whose patch grid is the world's own annotation of the image shown.

Selected with ``model.vision_tower=oracle`` (``model.oracle_world`` names the exported world; stage
two fills it from ``data.world_dir``). It lets stage two be checked apart from any learned tower:
with perfect features, what remains is the bridge, LoRA and the LLM.

Features. The image is cut into a fixed ``GRID x GRID`` grid of cells (8 x 8: 8-px cells on 64-px
world images). Cell k gets, from the object that covers most of its pixels (``cell_features``):
one-hot shape (``len(SHAPES)``), one-hot colour (``len(COLORS)``), size (1 = large), a foreground
bit (any object pixel in the cell), the covered fraction of the cell, and the cell's (row, col)
centre in [0, 1]. A cell without object pixels is all zeros except its position.
``forward(pixel_values [B,3,H,W]) -> [B, GRID*GRID, ORACLE_WIDTH]``, the [B,N,w] every bridge reads.

How the annotation is found: from the pixels shown, never from the question. ``WorldIndex``
fingerprints every image the world export holds (``DIR/images/*.jpg``: the files stage two trains
on and every eval shows; the train ones read from the export's pre-decoded ``arrays/``) as 16 x 16
mean colours, and keys each by a digest of its exact pixels. ``forward`` un-normalises the pixels;
an image whose pixels are exactly an exported one's (every image the readers decode) is found by its
digest, any other by the nearest fingerprint, accepted only when it is near (RMS distance
< ``MATCH_RMS`` grey levels) and clearly nearer than the runner-up (``MATCH_RATIO``); the sample
index then regenerates the exact masks (``generate_sample`` is a pure function of (seed, index)).
(The digest made a batch's lookup 80x cheaper: the demo's oracle stage went from 101 s to 77 s.)
Why fingerprints rather than carrying the file name or the sample index through the processor:
the VLM's interface is pixels only (``generate`` / ``score`` take [B,3,H,W]), so nothing upstream
changes, the oracle cannot be handed the annotation of another image than the one in the batch,
and the blank-image control works as for any tower: a uniform image (every pixel within
``UNIFORM_RANGE`` grey levels) has no objects, so its grid is empty. The exported JPEGs decode to
the same pixels every time (distance ~0). Measured on the demo's world (20,300 images): two
different images are >= 4.5 grey levels RMS apart (1% of them < 6.6), a lossless render of an image
is <= 3.3 from its JPEG, so a render usually matches too, and the ratio test refuses (never
mislabels) the rare render that lands near another image. Any other image (real data) raises
``ValueError``: the oracle only knows its world.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encoders.towers import ImageTransform
from vlm.config import WorldConfig, portable_path
from vlm.files import atomic_write_text, open_image, read_json
from vlm.world.arrays import TrainArrays
from vlm.world.generator import generate_sample
from vlm.world.types import WorldSample
from vlm.world.vocab import COLORS, SHAPES

ORACLE = "oracle"  # the model.vision_tower value that selects this tower
GRID = 8
ORACLE_WIDTH = len(SHAPES) + len(COLORS) + 5  # shape, colour, size, foreground, coverage, row, col
FINGERPRINT = 16  # fingerprint side: FINGERPRINT x FINGERPRINT mean colours
MATCH_RMS = 8.0  # grey levels; a render is <= 3.3 from its JPEG
MATCH_RATIO = 0.6  # best distance must be below this fraction of the second best
UNIFORM_RANGE = 2.0  # grey levels: an image whose pixels all lie in this range is blank
CONFIG_FILE = "oracle.json"
_COLOR_NAMES = tuple(COLORS)


def is_oracle(vision_tower: str | Path) -> bool:
    """Whether a ``model.vision_tower`` value selects the oracle."""
    return str(vision_tower) == ORACLE


def cell_bounds(size: int, grid: int) -> np.ndarray:
    """Pixel edges of ``grid`` cells along a side of ``size`` px -> int [grid + 1]."""
    return np.linspace(0, size, grid + 1).round().astype(int)


def empty_grid(grid: int = GRID) -> torch.Tensor:
    """The grid of an image without objects -> [grid*grid, ORACLE_WIDTH]: zeros but the positions."""
    feats = torch.zeros(grid * grid, ORACLE_WIDTH)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    feats[:, -2] = (rows.flatten() + 0.5) / grid
    feats[:, -1] = (cols.flatten() + 0.5) / grid
    return feats


def cell_pixel_counts(sample: WorldSample, grid: int = GRID) -> tuple[np.ndarray, np.ndarray]:
    """(pixels of each object in each cell, int [K, grid*grid]; each cell's area in pixels, [grid*grid]),
    cells row-major, objects in ``sample.objects`` order (instance ids 1..K)."""
    inst = sample.instance_mask
    ys, xs = cell_bounds(inst.shape[0], grid), cell_bounds(inst.shape[1], grid)
    ids = np.arange(1, len(sample.objects) + 1)
    per_object = (inst[None] == ids[:, None, None]).astype(np.int64)  # [K,H,W]
    counts = np.add.reduceat(np.add.reduceat(per_object, ys[:-1], axis=1), xs[:-1], axis=2)  # [K,grid,grid]
    area = np.diff(ys)[:, None] * np.diff(xs)[None, :]
    return counts.reshape(len(ids), -1), area.reshape(-1)


def cell_owner(sample: WorldSample, grid: int = GRID) -> np.ndarray:
    """Per cell the index of the object with most pixels in it (a tie goes to the earlier object), -1
    for a cell without object pixels -> int [grid*grid], row-major: the object ``cell_features``
    describes there."""
    if not sample.objects:
        return np.full(grid * grid, -1)
    return _owner(cell_pixel_counts(sample, grid)[0])


def _owner(counts: np.ndarray) -> np.ndarray:
    """[K, cells] pixel counts -> the argmax object per cell, -1 where no object has pixels."""
    return np.where(counts.sum(0) > 0, counts.argmax(0), -1)


def cell_features(sample: WorldSample, grid: int = GRID) -> torch.Tensor:
    """A world sample's oracle grid -> float [grid*grid, ORACLE_WIDTH], row-major cells.

    Each cell describes the object with most pixels in it (``sample.instance_mask``; a tie goes
    to the earlier object): one-hot shape, one-hot colour, size (1 = large), foreground bit,
    covered fraction, then the cell position.
    """
    feats = empty_grid(grid)
    if not sample.objects:
        return feats
    counts, area = cell_pixel_counts(sample, grid)
    covered, owner = counts.sum(0) / area, _owner(counts)
    n_s, n_c = len(SHAPES), len(COLORS)
    for cell in np.flatnonzero(owner >= 0):
        obj = sample.objects[int(owner[cell])]
        row = feats[cell]
        row[SHAPES.index(obj.shape)] = 1.0
        row[n_s + _COLOR_NAMES.index(obj.color)] = 1.0
        row[n_s + n_c] = float(obj.size == "large")
        row[n_s + n_c + 1] = 1.0
        row[n_s + n_c + 2] = float(covered[cell])
    return feats


def fingerprints(images: torch.Tensor) -> torch.Tensor:
    """Images [B,3,H,W] in grey levels (0..255) -> [B, 3*FINGERPRINT^2] mean colours."""
    return F.adaptive_avg_pool2d(images.float(), FINGERPRINT).flatten(1)


class WorldIndex:
    """Fingerprints of every image of a world export -> sample index (see the module docstring).

    world_dir: an export of ``vlm.world.export`` (``world.json`` + ``images/{index:08d}.jpg``).
    The train images are read from the export's pre-decoded ``arrays/`` (the same pixels as their
    JPEGs) when it has them. An image whose pixels equal an indexed image's exactly (every image
    the exports' readers decode) is found by a hash of its bytes; any other by its fingerprint.
    """

    def __init__(self, world_dir: str | Path):
        self.world_dir = Path(world_dir)
        meta = self.world_dir / "world.json"
        if not meta.is_file():
            raise FileNotFoundError(f"model.oracle_world: {self.world_dir} is not a world export (no world.json)")
        self.cfg = WorldConfig(**read_json(meta, "world export metadata")["config"])
        paths = {int(p.stem): p for p in (self.world_dir / "images").glob("*.jpg")}
        if not paths:
            raise FileNotFoundError(f"model.oracle_world: no images in {self.world_dir / 'images'}")
        indices, prints, self.exact = [], [], {}
        for chunk_indices, pixels in self._pixels(paths):
            prints.append(fingerprints(pixels))
            self.exact.update(zip(map(_pixel_key, pixels), chunk_indices))
            indices += chunk_indices
        self.indices = torch.tensor(indices)
        self.prints = torch.cat(prints)

    def _pixels(self, paths: dict[int, Path]) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(sample indices, uint8 [B,3,H,W]) chunks of every image: the arrays' rows, then the other JPEGs."""
        rows: list[int] = []
        try:
            train = TrainArrays(self.world_dir)
        except FileNotFoundError:  # an export without arrays: every image from its JPEG
            train = None
        if train is not None:
            rows = [int(k) for k in train.index["keys"]]
            for start in range(0, len(rows), 1024):
                pixels = torch.from_numpy(np.array(train.images[start:start + 1024]))
                yield rows[start:start + 1024], pixels.permute(0, 3, 1, 2)
        rest = sorted(set(paths) - set(rows))
        for chunk in _chunks(rest, 512):
            yield chunk, self._load([paths[i] for i in chunk])

    @staticmethod
    def _load(paths: list[Path]) -> torch.Tensor:
        """Image files -> uint8 [B,3,H,W]."""
        arrays = []
        for p in paths:
            arrays.append(np.asarray(open_image(p)))
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    def lookup(self, images: torch.Tensor) -> list[Optional[int]]:
        """Images [B,3,H,W] in grey levels -> the world sample index of each, None for a blank
        (uniform) image; ``ValueError`` for an image that is not one of this world's."""
        images = images.detach().float().cpu()
        flat = images.flatten(2)
        blank = ((flat.amax(-1) - flat.amin(-1)) <= UNIFORM_RANGE).all(-1)
        levels = images.round().clamp(0, 255)
        whole = ((images - levels).abs().flatten(1).amax(-1) < 0.01).tolist()  # uint8 pixels, up to float error
        levels = levels.to(torch.uint8)
        exact = [self.exact.get(_pixel_key(levels[b])) if whole[b] else None for b in range(images.shape[0])]
        out: list[Optional[int]] = [None if bool(blank[b]) else exact[b] for b in range(images.shape[0])]
        search = [b for b in range(images.shape[0]) if out[b] is None and not bool(blank[b])]
        if not search:
            return out
        dist = torch.cdist(fingerprints(images[search]), self.prints) / self.prints.shape[1] ** 0.5
        two = dist.topk(min(2, dist.shape[1]), dim=1, largest=False)
        for row, b in enumerate(search):
            best = float(two.values[row, 0])
            second = float(two.values[row, 1]) if two.values.shape[1] > 1 else float("inf")
            if best < MATCH_RMS and best < MATCH_RATIO * second:
                out[b] = int(self.indices[two.indices[row, 0]])
            else:
                raise ValueError(f"oracle tower: image {b} of the batch is not an image of the world in "
                                 f"{self.world_dir} (nearest fingerprint {best:.1f} grey levels RMS away)")
        return out


def _pixel_key(image: torch.Tensor) -> bytes:
    """uint8 [3,H,W] -> a digest of its bytes (the exact-match key of ``WorldIndex``)."""
    return hashlib.blake2b(image.contiguous().numpy().tobytes(), digest_size=16).digest()


def _chunks(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]


class OracleTower(nn.Module):
    """The oracle as a VLM vision tower (``VLMVisionTower``'s interface: ``transform``, ``width``,
    ``num_patches``, ``num_tokens``, ``frozen``, ``forward``, ``save_pretrained``). No parameters;
    ``vision_feature_layer`` / ``select_strategy`` do not apply (there are no layers and no CLS)."""

    frozen = True

    def __init__(self, world_dir: str | Path, grid: int = GRID):
        super().__init__()
        self.index = WorldIndex(world_dir)
        self.grid = grid
        self.transform = ImageTransform(self.index.cfg.image_size, square_resize=True)
        self._cache: dict[int, torch.Tensor] = {}

    @property
    def width(self) -> int:
        """w = ORACLE_WIDTH features per cell."""
        return ORACLE_WIDTH

    @property
    def num_patches(self) -> int:
        """P = grid * grid cells."""
        return self.grid * self.grid

    @property
    def num_tokens(self) -> int:
        """N = P (no CLS token)."""
        return self.num_patches

    def grid_of(self, index: Optional[int]) -> torch.Tensor:
        """The grid of world sample ``index`` (None: a blank image) -> [P, ORACLE_WIDTH] (cached)."""
        if index is None:
            return empty_grid(self.grid)
        if index not in self._cache:
            sample = generate_sample(index, self.index.cfg.seed, self.index.cfg)
            self._cache[index] = cell_features(sample, self.grid)
        return self._cache[index]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B,3,H,W] (normalised by ``transform``) -> features [B, P, ORACLE_WIDTH]."""
        mean = torch.tensor(self.transform.mean, device=pixel_values.device).view(1, 3, 1, 1)
        std = torch.tensor(self.transform.std, device=pixel_values.device).view(1, 3, 1, 1)
        grey = (pixel_values.float() * std + mean) * 255.0
        grids = [self.grid_of(i) for i in self.index.lookup(grey)]
        return torch.stack(grids).to(pixel_values.device)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``oracle.json`` (world dir as ``vlm.config.portable_path``, grid) and the ``preprocessor_config.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / CONFIG_FILE, json.dumps({"world_dir": portable_path(self.index.world_dir, directory),
                                                               "grid": self.grid}, indent=2))
        self.transform.save_pretrained(directory)
