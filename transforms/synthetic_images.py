"""Synthetic chest radiographs for the synthetic MIMIC-CXR-JPG tree, and the faulty files.

Texture comes from real radiographs (the two NIH ChestX-ray14 PNGs shipped in
`transforms/radiographs/`, see its README for licence and citation): each pool
image is one of them, cropped, maybe mirrored, resized up to the full MIMIC-CXR-JPG size,
re-exposed (brightness, contrast, gamma) and given fine film grain so that the JPEG has the
size and decode cost of a real one (1-2 MB at 2544x3056). A pool of distinct encoded images is
made once and its bytes reused, so tens of thousands of files cost little: hard links on local
disk, server-side copies on gs://.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from transforms import storage

# Package data (setup.py, MANIFEST.in): a clone and an installed package both have them.
DEFAULT_RADIOGRAPH_DIR = Path(__file__).resolve().parent / "radiographs"

# The kinds of broken image file the generator can plant, as the pipeline sees them.
FAULT_MISSING = "missing"
FAULT_EMPTY = "empty"
FAULT_TRUNCATED = "truncated"
FAULT_NOT_AN_IMAGE = "not_an_image"
FAULT_KINDS: tuple[str, ...] = (FAULT_MISSING, FAULT_EMPTY, FAULT_TRUNCATED, FAULT_NOT_AN_IMAGE)

# What a mirror sync that never fetched the LFS object leaves behind: text with a .jpg name.
_NOT_AN_IMAGE_BYTES = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    b"size 1572864\n"
)


@dataclasses.dataclass(frozen=True)
class EncodedImage:
    """One pool entry: JPEG bytes and the pixel size they decode to."""

    data: bytes
    height: int
    width: int


def load_radiographs(
    directory: str | os.PathLike[str] = DEFAULT_RADIOGRAPH_DIR,
) -> list[np.ndarray]:
    """Reads the seed radiographs (greyscale PNGs) from `directory`, sorted by name.

    Raises:
        FileNotFoundError: when the directory holds no readable PNG.
    """
    paths = sorted(Path(directory).glob("*.png"))
    images = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths]
    images = [im for im in images if im is not None]
    if not images:
        raise FileNotFoundError(
            f"no seed radiographs (*.png) in {directory}; pass --radiograph_dir with "
            f"greyscale radiograph PNGs (the bundled ones are in {DEFAULT_RADIOGRAPH_DIR})"
        )
    return images


def synthesize_radiograph(
    source: np.ndarray, height: int, width: int, rng: np.random.Generator
) -> np.ndarray:
    """A new greyscale radiograph of `height` x `width` with `source`'s texture.

    Random crop (80-100% of each side), mirror, resize up, exposure (contrast, brightness,
    gamma) and fine Gaussian grain, so that JPEG size and decode cost look like a real film.
    """
    src_h, src_w = source.shape
    crop_h = int(src_h * rng.uniform(0.8, 1.0))
    crop_w = int(src_w * rng.uniform(0.8, 1.0))
    top = int(rng.integers(0, src_h - crop_h + 1))
    left = int(rng.integers(0, src_w - crop_w + 1))
    patch = source[top : top + crop_h, left : left + crop_w]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    pixels = cv2.resize(
        np.ascontiguousarray(patch, dtype=np.float32), (width, height),
        interpolation=cv2.INTER_CUBIC,
    )
    pixels = np.clip(pixels / 255.0, 0.0, 1.0)
    pixels = pixels ** rng.uniform(0.75, 1.35)
    pixels = pixels * rng.uniform(0.85, 1.1) + rng.uniform(-0.05, 0.08)
    pixels = pixels * 255.0 + rng.standard_normal((height, width), dtype=np.float32) * rng.uniform(
        1.8, 2.8
    )
    return np.clip(pixels, 0, 255).astype(np.uint8)


def pool_shapes(
    height: int, width: int, count: int, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """Sizes for `count` pool images: mostly `height` x `width`, some landscape, some shorter."""
    shapes = []
    for _ in range(count):
        draw = rng.random()
        if draw < 0.8:
            shapes.append((height, width))
        elif draw < 0.9:
            shapes.append((width, height))  # landscape film
        else:
            shapes.append((max(1, round(height * 0.94)), width))  # collimated shorter film
    return shapes


def encode_pool(
    sources: Sequence[np.ndarray], height: int, width: int, count: int, seed: int
) -> list[EncodedImage]:
    """`count` distinct JPEGs (quality 93-95) made from `sources`; deterministic by `seed`."""
    if height < 16 or width < 16:
        raise ValueError(f"image size {height}x{width} is too small: both sides must be >= 16")
    if count < 1:
        raise ValueError(f"image_pool={count}: need at least one pool image")
    rng = _pool_rng(seed)
    pool = []
    for index, (h, w) in enumerate(pool_shapes(height, width, count, rng)):
        pixels = synthesize_radiograph(sources[index % len(sources)], h, w, rng)
        quality = int(rng.integers(93, 96))
        ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:  # pragma: no cover - OpenCV returns False only on an unusable encoder
            raise RuntimeError("OpenCV failed to encode a JPEG")
        pool.append(EncodedImage(buf.tobytes(), h, w))
    return pool


def pool_without_pixels(height: int, width: int, count: int, seed: int) -> list[EncodedImage]:
    """The sizes `encode_pool` gives for the same arguments, with empty bytes (tables only)."""
    return [EncodedImage(b"", h, w) for h, w in pool_shapes(height, width, count, _pool_rng(seed))]


def _pool_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0x0C8])


def fault_bytes(kind: str, image: EncodedImage) -> bytes | None:
    """The bytes written for a planted fault of `kind` (None: the file is not written)."""
    if kind == FAULT_MISSING:
        return None
    if kind == FAULT_EMPTY:
        return b""
    if kind == FAULT_TRUNCATED:
        return image.data[: len(image.data) // 2]
    if kind == FAULT_NOT_AN_IMAGE:
        return _NOT_AN_IMAGE_BYTES
    raise ValueError(f"unknown fault kind {kind!r}; allowed: {', '.join(FAULT_KINDS)}")


class ImageTreeWriter:
    """Writes image files under a local or gs:// root, reusing pool bytes cheaply.

    The first file of each pool entry gets the bytes; later ones become hard links to it on
    local disk (a copy of the bytes where linking fails, e.g. across devices or past the link
    limit) and server-side copies on gs://, batched.
    """

    _COPY_BATCH = 100

    def __init__(self, root: str) -> None:
        self._root = root
        self._remote = storage.is_gcs(root)
        self._first: dict[int, str] = {}
        self._pending: list[tuple[str, str]] = []

    def _path(self, relpath: str) -> str:
        return storage.join(self._root, relpath)

    def write(self, relpath: str, data: bytes) -> None:
        """Writes `data` to `relpath`, replacing any file there (never through a link: locally
        a new file is renamed over the name, see `storage.write_bytes`)."""
        storage.write_bytes(self._path(relpath), data)

    def remove(self, relpath: str) -> None:
        """Removes `relpath` if a previous run left a file there."""
        path = self._path(relpath)
        if self._remote:
            storage.delete([path])
        elif os.path.lexists(path):
            os.unlink(path)

    def write_pooled(self, relpath: str, pool_index: int, image: EncodedImage) -> None:
        """Writes pool entry `pool_index` to `relpath`, sharing bytes with earlier copies."""
        first = self._first.get(pool_index)
        if first is None:
            self.write(relpath, image.data)
            self._first[pool_index] = relpath
            return
        if self._remote:
            self._pending.append((self._path(first), self._path(relpath)))
            if len(self._pending) >= self._COPY_BATCH:
                self.flush()
            return
        path = self._path(relpath)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.lexists(path):
            os.unlink(path)
        try:
            os.link(self._path(first), path)
        except OSError:
            # Too many links, another device, or a file system without hard links.
            self.write(relpath, image.data)
            self._first[pool_index] = relpath

    def flush(self) -> None:
        """Issues the pending server-side copies (gs:// only)."""
        if self._pending:
            pending, self._pending = self._pending, []
            storage.copy(pending)
