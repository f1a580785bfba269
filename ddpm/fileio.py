"""File helpers shared by every stage: atomic writes, content hashes and image grids.

Torch-free, so the ONNX sampler can use them.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, fsync, then rename.

    A crash or a full disk leaves the previous file untouched and no temporary file behind.
    A symbolic link at `path` is replaced by the new file, never written through.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)  # left by a killed process with this PID: removed, never opened
        with open(tmp, "xb") as f:  # O_EXCL: a link planted at tmp since is refused, not followed
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # a failed write names no file: name the target
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    fsync_dir(path.parent)  # make the rename itself durable


def fsync_dir(folder: str | Path) -> None:
    """fsync a folder, so that renames into it survive a power loss; a file system that cannot is ignored."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def file_digest(path: str | Path, algo: str = "sha256") -> str:
    """Hex digest of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algo).hexdigest()


def file_sha256(path: str | Path) -> str:
    return file_digest(path, "sha256")


def grid_png(images: Any, nrow: int | None = None, padding: int = 2) -> bytes | None:
    """uint8 [N, C, H, W] (a numpy array) -> PNG bytes of a grid laid out as torchvision's make_grid (`nrow` images
    per row, `padding` white pixels between and around them, also around a single image, which make_grid leaves
    bare), one channel as a grayscale PNG (make_grid repeats it into RGB); None without Pillow."""
    try:
        from PIL import Image
    except ImportError:
        return None
    import numpy as np

    n, c, h, w = images.shape
    ncol = min(nrow or max(int(n ** 0.5), 1), n)
    nrows = -(-n // ncol)
    grid = np.full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), 255, np.uint8)
    for k, img in enumerate(images):
        r, col = divmod(k, ncol)
        y, x = r * (h + padding) + padding, col * (w + padding) + padding
        grid[:, y:y + h, x:x + w] = img
    pil = Image.fromarray(grid[0] if c == 1 else grid.transpose(1, 2, 0))
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=1)  # zlib's fastest level: the grid of a large sample run
    # encodes in a fraction of the default level's time, for a file a little larger
    return buf.getvalue()
