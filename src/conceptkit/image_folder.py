"""A folder of images someone gives us (`evaluate images`, `cluster --reference-images`, `implant`):
which files count, how they are read, and the folder's identity in a cache key. One way for all.

Every check runs before any work: no such folder, no images, an unreadable file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from conceptkit.errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_files(folder: Path, what: str) -> list[Path]:
    """The folder's image files, sorted by name; `what` names the option in messages."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{what} {folder}: not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"{what} {folder}: no PNG or JPG images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_images(folder: Path, what: str, size: tuple[int, int] | None = None) -> tuple[np.ndarray, list[str]]:
    """(N, H, W, 3) uint8 RGB images and their file names; resized (bicubic) to `size` (W, H), else to the first's."""
    from PIL import Image, UnidentifiedImageError

    arrays = []
    files = image_files(folder, what)
    for p in files:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                size = size or im.size
                if im.size != size:
                    im = im.resize(size, Image.Resampling.BICUBIC)
                arrays.append(np.asarray(im, dtype=np.uint8))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise UsageError(f"{what}: cannot read image {p}: {exc}") from None
    return np.stack(arrays), [p.name for p in files]


def folder_digest(folder: Path, what: str) -> str:
    """sha256 over the image files' names and bytes: the folder's identity in a cache key."""
    h = hashlib.sha256()
    for p in image_files(folder, what):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()
