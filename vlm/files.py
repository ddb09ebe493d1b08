"""Files the project writes and reads, made safe against kills, full disks and hostile inputs.

    VlmError                      the one error type of expected failures (bad input, a damaged or
                                  missing file, a full disk, a busy run dir); the CLI prints its
                                  one-line message and exits 2 (``--debug`` shows the traceback)
    atomic_path(path)             a temporary path beside ``path`` to write to; fsynced and renamed
                                  onto ``path`` only when the block succeeds (a kill leaves the old
                                  file or none, never half of one)
    atomic_write_text / _bytes / _json / fsync_path
    naming_disk_full(path)        for files inside a directory renamed into place as a whole
    loading_weights(dir)          around ``from_pretrained``: missing dir / no safetensors -> one line
    check_image(path, max_pixels) the image's header read (no decode): exists, is an image, at most
                                  ``max_pixels`` pixels; ``open_image`` then decodes it as RGB

Every writer of json, jsonl, md, png, yaml and checkpoint files goes through ``atomic_path``;
an ``OSError`` ENOSPC (or torch's "file write failed") there becomes ``DiskFullError`` naming the file.
"""
from __future__ import annotations

import errno
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from PIL import Image

DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096  # 16.8 M pixels, 50 MB as RGB; the world's images are 64 x 64


class VlmError(Exception):
    """An expected failure with a one-line message naming its cause (file, key or line)."""


class DiskFullError(VlmError):
    """The disk filled up while writing ``path``."""


class ImageError(VlmError, OSError):
    """An image file is missing, unreadable or larger than the size guard allows."""


class ImageNotFoundError(ImageError, FileNotFoundError):
    """An image file does not exist."""


def fsync_path(path: Path) -> None:
    """Flush a file (or a directory entry) to disk; ignored where the OS does not support it."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` is the OS (or torch's stream writer) reporting that the disk is full."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(e, RuntimeError) and "file write failed" in str(e)


def _tmp_name(path: Path) -> Path:
    """``.NAME.tmp-PID.SUFFIX`` beside ``path``: hidden, per process, and with the suffix kept
    (PIL and matplotlib pick the format from it)."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


@contextmanager
def naming_disk_full(path: str | Path) -> Iterator[None]:
    """Turn a full disk inside the block into ``DiskFullError`` naming ``path``; for files written
    into a directory that is itself renamed into place (a checkpoint's ``.tmp-step_*``)."""
    try:
        yield
    except BaseException as e:
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise DiskFullError(f"disk full while writing {path}") from e
        raise


@contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (parents created) for the caller to write; when the
    block returns, ``os.replace`` it onto ``path``; when it raises, remove it. A full disk raises
    ``DiskFullError`` naming ``path``. ``durable``: fsync the file and its directory too (off for
    bulk files whose set is committed by a marker written last, like a world export's images)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise DiskFullError(f"disk full while writing {path}") from e
        raise
    if durable:
        fsync_path(path.parent)


@contextmanager
def loading_weights(directory: str | Path, what: str = "model") -> Iterator[None]:
    """Around a library's ``from_pretrained(directory)``: a missing ``directory`` is a
    ``FileNotFoundError`` naming it (not a hub repo-id error), and the library's ``OSError`` (no
    ``model.safetensors``: pickled weights are never loaded) a ``VlmError`` naming it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{what} directory not found: {directory}")
    try:
        yield
    except OSError as e:
        if isinstance(e, VlmError):
            raise
        reason = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise VlmError(f"cannot load the {what} in {directory}: {reason}") from e


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (``atomic_path``). Returns the path."""
    with atomic_path(path, durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (``atomic_path``). Returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: Optional[int] = 2) -> Path:
    """Write ``obj`` as JSON with a final newline to ``path`` atomically. Returns the path."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    """``json.loads`` of ``path``; a missing, unreadable or truncated file raises ``VlmError`` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise VlmError(f"{what} not found: {path}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise VlmError(f"cannot read {what} {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise VlmError(f"{path}:{e.lineno}: not valid JSON ({e.msg}; truncated by a killed write?)") from e


def read_jsonl_rows(path: str | Path) -> list[dict]:
    """The JSON objects of a jsonl file the project appends to (``metrics.jsonl``). A torn last line
    (a kill during the append) is dropped with a warning on stderr; a bad line before it is damage
    that a kill cannot cause and raises ``VlmError`` naming ``path:line``."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    numbered = [(i, ln) for i, ln in enumerate(lines, 1) if ln.strip()]
    rows = []
    for k, (lineno, line) in enumerate(numbered):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        except ValueError as e:
            if k == len(numbered) - 1:
                print(f"warning: {path}:{lineno}: dropping a half-written last line", file=sys.stderr)
                break
            raise VlmError(f"{path}:{lineno}: not a JSON object ({e})") from e
        rows.append(row)
    return rows


def check_image(path: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding it; ``ImageError`` naming the file
    when it is missing, not an image, or has more than ``max_pixels`` pixels."""
    path = Path(path)
    if not path.is_file():
        raise ImageNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if width * height > max_pixels:
        raise ImageError(f"image {path} is {width} x {height} = {width * height:,} pixels, over the "
                         f"{max_pixels:,} allowed (raise the max_image_pixels setting to accept it)")
    return width, height


def open_image(path: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """The image at ``path`` decoded as RGB, after ``check_image``; ``ImageError`` naming the file
    when it cannot be read or decoded."""
    check_image(path, max_pixels)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot decode image {path}: {e}") from e
