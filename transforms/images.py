"""Image preprocessing: JPEG bytes to a square, letterboxed, contrast-enhanced uint8 image.

`PreprocessImages` reads each record's radiograph (local or gs://, requester-pays when asked),
decodes it to greyscale, resizes it keeping the aspect ratio so the longer side is the target
size, pads it to a square (pad value 0, centred) and applies CLAHE to the real pixels only.
The image is stored as uint8 (268 KB at 518); `image_box` = (top, left, height, width) of the
real pixels lets the loader rebuild the mask.

Decode path, chosen by measurement (benchmarks/bench_image_decode.py, one core, 2544 x 3056
JPEGs of ~1.2 MB): a full decode costs ~26 ms and a resize from full size ~11 ms more, while a
DCT-domain reduced decode to 1/4 (636 x 764, still >= 518) costs ~16 ms and its resize ~1.4 ms;
after the resize to 518 it differs from the full-decode path by at most a few grey levels
(mean ~0.3). Pillow's `draft()` and OpenCV's IMREAD_REDUCED_GRAYSCALE_* run the same
libjpeg-turbo code at the same speed (both release the GIL), but Pillow reports corrupt
entropy-coded data as an error where OpenCV returns a silently grey image, and `draft()` picks
the largest reduction that keeps both sides >= the target box. So JPEGs go through Pillow with
`draft()`; PNGs (tests, other sources) through OpenCV, which scales 16-bit PNGs to 8 bits.

Faults: truncation is found by the missing end marker, not left to the decoder. Damaged
entropy-coded data is reported when libjpeg treats it as an error (e.g. garbage that breaks the
marker structure); data damaged in a way libjpeg only warns about decodes with artefacts, as
in any viewer. Checking that too (a scan of every FFxx in the data) would cost ~1 ms a file.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Iterator, Optional, Union

import apache_beam as beam
import cv2
import numpy as np
from apache_beam.metrics import Metrics
from PIL import Image, UnidentifiedImageError

from transforms import records, storage
from transforms.ledger import LEDGER_TAG, Tally

STAGE = "image"

_JPEG_SOI = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"  # the IEND chunk type and its fixed CRC
# End markers are searched in the file's tail, not at its last byte: some writers pad after
# them. FFD9 cannot occur inside entropy-coded JPEG data (an FF there is always stuffed).
_END_MARKER_WINDOW = 4096

_DECODE_REASONS = (
    records.FAIL_IMAGE_EMPTY,
    records.FAIL_IMAGE_TRUNCATED,
    records.FAIL_IMAGE_NOT_AN_IMAGE,
    records.FAIL_IMAGE_UNREADABLE,
)
# Every reason a record fails here (each a ledger entry, `failed_counter`).
REASONS = (records.FAIL_IMAGE_MISSING,) + _DECODE_REASONS


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image; `reason` is one of the records.FAIL_IMAGE_* values."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)  # both in args, so the error pickles
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def _fit(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the longer side `size` and the aspect kept, rounded half up."""
    if height >= width:
        return size, max(1, (2 * width * size + height) // (2 * height))
    return max(1, (2 * height * size + width) // (2 * width)), size


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"image size must be a positive integer, got {size!r}")


def _ends_with(data: bytes, marker: bytes) -> bool:
    return data.rfind(marker, max(0, len(data) - _END_MARKER_WINDOW)) >= 0


def _decode_jpeg(data: bytes, reduce_to: Optional[int]) -> tuple[np.ndarray, tuple[int, int]]:
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
            source = (image.height, image.width)
            # One decoder call for the whole file: Pillow otherwise feeds it 64 KB at a time
            # and retakes the GIL each time, which starves the decode (about 4x slower here)
            # while another worker thread of the same process runs Python code.
            image.decodermaxblock = max(len(data), 65536)
            if reduce_to is None:
                image.draft("L", None)
            else:
                # The smallest of 1/1, 1/2, 1/4, 1/8 that keeps both sides >= the target box.
                height, width = _fit(*source, reduce_to)
                image.draft("L", (width, height))
            image.load()
            if image.mode != "L":  # e.g. CMYK, which libjpeg cannot output as greyscale
                image = image.convert("L")
            pixels = np.asarray(image)
    except UnidentifiedImageError as exc:
        # Its message holds a BytesIO repr with an address, which would break determinism.
        raise ImageDecodeError(
            records.FAIL_IMAGE_UNREADABLE, "JPEG decoder cannot read the headers"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        # Pillow's messages name the fault (e.g. "broken data stream"), never the content.
        raise ImageDecodeError(
            records.FAIL_IMAGE_UNREADABLE, f"JPEG decoder: {type(exc).__name__}: {exc}"
        ) from exc
    return pixels, source


def _decode_png(data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
    try:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    except cv2.error as exc:
        raise ImageDecodeError(
            records.FAIL_IMAGE_UNREADABLE, f"PNG decoder: {type(exc).__name__}"
        ) from exc
    if pixels is None or pixels.size == 0:
        raise ImageDecodeError(records.FAIL_IMAGE_UNREADABLE, "PNG decoder returned no image")
    return pixels, pixels.shape


def _decode(data: bytes, reduce_to: Optional[int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Greyscale pixels (maybe DCT-reduced) and the (height, width) of the full image."""
    if not data:
        raise ImageDecodeError(records.FAIL_IMAGE_EMPTY, "0 bytes")
    if data.startswith(_JPEG_SOI):
        # Checked here, not left to the decoder: libjpeg tolerates a missing end (OpenCV
        # returns a grey-filled image on some versions; Pillow too with LOAD_TRUNCATED_IMAGES).
        if not _ends_with(data, _JPEG_EOI):
            raise ImageDecodeError(
                records.FAIL_IMAGE_TRUNCATED,
                f"JPEG of {len(data)} bytes has no end-of-image marker (FFD9)",
            )
        return _decode_jpeg(data, reduce_to)
    if data.startswith(_PNG_SIGNATURE):
        if not _ends_with(data, _PNG_IEND):
            raise ImageDecodeError(
                records.FAIL_IMAGE_TRUNCATED, f"PNG of {len(data)} bytes has no IEND chunk"
            )
        return _decode_png(data)
    raise ImageDecodeError(
        records.FAIL_IMAGE_NOT_AN_IMAGE,
        f"{len(data)} bytes with neither a JPEG nor a PNG signature",
    )


def decode_grayscale(data: bytes) -> np.ndarray:
    """Decodes JPEG or PNG bytes to a full-resolution greyscale uint8 array [H, W].

    Raises:
        ImageDecodeError: with reason FAIL_IMAGE_EMPTY (no bytes), FAIL_IMAGE_TRUNCATED (no
            end-of-image marker), FAIL_IMAGE_NOT_AN_IMAGE (no JPEG or PNG signature) or
            FAIL_IMAGE_UNREADABLE (the decoder failed).
    """
    pixels, _ = _decode(data, reduce_to=None)
    return pixels if pixels.flags.writeable else pixels.copy()


def letterbox(
    pixels: np.ndarray, size: int, *, source_shape: Optional[tuple[int, int]] = None
) -> tuple[np.ndarray, np.ndarray]:
    """Resizes keeping the aspect ratio (longer side == `size`) and pads to a centred square.

    Args:
        pixels: greyscale uint8 [H, W].
        size: side of the square output.
        source_shape: (height, width) of the full-resolution image when `pixels` is a reduced
            decode of it, so that the box keeps the original aspect exactly (a reduced decode
            rounds each side up).

    Returns:
        The uint8 [size, size] image (padding 0) and the int32 box (top, left, height, width)
        of the real pixels in it.
    """
    _check_size(size)
    if pixels.ndim != 2 or pixels.dtype != np.uint8 or pixels.size == 0:
        raise ValueError(
            f"letterbox needs a non-empty 2-D uint8 array, got {pixels.dtype} {pixels.shape}"
        )
    height, width = _fit(*(source_shape or pixels.shape), size)
    if (height, width) == pixels.shape:
        resized = pixels
    else:
        shrinking = height <= pixels.shape[0] and width <= pixels.shape[1]
        resized = cv2.resize(
            pixels,
            (width, height),
            interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR,
        )
    top, left = (size - height) // 2, (size - width) // 2
    image = np.zeros((size, size), dtype=np.uint8)
    image[top : top + height, left : left + width] = resized
    return image, np.array([top, left, height, width], dtype=np.int32)


def enhance_contrast(
    image: np.ndarray, box: np.ndarray, *, clip_limit: float = 2.0, tile_grid: int = 8
) -> np.ndarray:
    """CLAHE on the real pixels inside `box` only; the padding stays as it is.

    Args:
        image: greyscale uint8 [S, S] from `letterbox`.
        box: (top, left, height, width) of the real pixels.
        clip_limit: CLAHE contrast clip limit (> 0).
        tile_grid: tiles per side (>= 1).

    Returns:
        A new uint8 array; `image` is not modified.
    """
    if not clip_limit > 0:
        raise ValueError(f"clip_limit must be > 0, got {clip_limit!r}")
    if isinstance(tile_grid, bool) or not isinstance(tile_grid, int) or tile_grid < 1:
        raise ValueError(f"tile_grid must be a positive integer, got {tile_grid!r}")
    top, left, height, width = (int(v) for v in box)
    # A CLAHE object keeps scratch buffers, so one per call (about a microsecond) is the
    # thread-safe choice: Beam may run this on several threads of one process.
    clahe = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(tile_grid, tile_grid))
    region = np.ascontiguousarray(image[top : top + height, left : left + width])
    result = image.copy()
    result[top : top + height, left : left + width] = clahe.apply(region)
    return result


def preprocess_image(
    data: bytes,
    *,
    size: int = 518,
    clahe: bool = True,
    clip_limit: float = 2.0,
    tile_grid: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Encoded image bytes to the stored image: uint8 [size, size] and its int32 box.

    JPEGs are decoded in the DCT domain at the smallest 1/2^k scale that keeps both sides at
    least as large as the target box, which costs no visible detail (see the module docstring).

    Raises:
        ImageDecodeError: see `decode_grayscale`.
    """
    _check_size(size)
    pixels, source_shape = _decode(data, reduce_to=size)
    image, box = letterbox(pixels, size, source_shape=source_shape)
    if clahe:
        image = enhance_contrast(image, box, clip_limit=clip_limit, tile_grid=tile_grid)
    return image, box


def failed_counter(reason: str) -> str:
    """The counter (and ledger entry) of the records that failed here for `reason`."""
    return f"{STAGE}/failed/{reason}"


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """How a record's radiograph becomes its stored image (the image flags, checked)."""

    size: int = 518
    clahe: bool = True
    clip_limit: float = 2.0
    tile_grid: int = 8
    requester_pays_project: Optional[str] = None

    def __post_init__(self) -> None:
        _check_size(self.size)
        if self.clahe and not self.clip_limit > 0:
            raise ValueError(f"clip_limit must be > 0 when CLAHE is on, got {self.clip_limit!r}")
        tile = self.tile_grid
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
            raise ValueError(f"tile_grid must be a positive integer, got {tile!r}")


def image_of(
    record: records.CohortRecord, settings: ImageSettings
) -> Union[tuple[np.ndarray, np.ndarray], records.DeadLetter]:
    """Reads and preprocesses the record's radiograph: (image, box), or a DeadLetter (stage
    "image") for a missing, empty, truncated or undecodable file.

    Errors that are not per-record (permission denied, a requester-pays read without a billing
    project) raise: they would dead-letter every record.
    """
    path = record.image_path
    try:
        data = storage.read_bytes(path, user_project=settings.requester_pays_project)
    except FileNotFoundError as exc:
        return records.DeadLetter.of(record, STAGE, records.FAIL_IMAGE_MISSING,
                                     f"{type(exc).__name__}: {path}")
    try:
        return preprocess_image(data, size=settings.size, clahe=settings.clahe,
                                clip_limit=settings.clip_limit, tile_grid=settings.tile_grid)
    except ImageDecodeError as exc:
        return records.DeadLetter.of(record, STAGE, exc.reason, f"{exc.detail}: {path}")


def use_one_opencv_thread() -> None:
    """Each worker thread already keeps a core busy; OpenCV's own thread pool on top of that
    only adds contention for resize and CLAHE on images this small."""
    cv2.setNumThreads(1)


class _PreprocessImageFn(beam.DoFn):
    """Sample dict -> the same sample with "image" and "image_box" added, or a DeadLetter."""

    def __init__(self, settings: ImageSettings) -> None:
        self._settings = settings
        self._processed = Metrics.counter(STAGE, "images_processed")
        self._tally = Tally([failed_counter(r) for r in REASONS])

    def setup(self) -> None:
        use_one_opencv_thread()

    def start_bundle(self) -> None:
        self._tally.start()

    def finish_bundle(self):
        yield from self._tally.flush()

    def process(self, sample: dict[str, Any]) -> Iterator[Any]:
        result = image_of(sample["cohort"], self._settings)
        if isinstance(result, records.DeadLetter):
            self._tally.inc(failed_counter(result.reason))
            yield beam.pvalue.TaggedOutput(records.DEAD_LETTER_TAG, result)
            return
        self._processed.inc()
        image, box = result
        yield {**sample, "image": image, "image_box": box}


@beam.typehints.with_input_types(dict)
class PreprocessImages(beam.PTransform):
    """Reads, decodes, letterboxes and contrast-enhances each record's radiograph.

    Input: PCollection of sample dicts {"cohort": records.CohortRecord, ...}.

    Main output (tag "samples"): new sample dicts with "image" (np.uint8 [S, S], padding 0) and
    "image_box" (np.int32 [4]: top, left, height, width of the real pixels) added.

    Dead-letter output (tag records.DEAD_LETTER_TAG): records.DeadLetter with stage "image"
    and reason FAIL_IMAGE_MISSING, _EMPTY, _TRUNCATED, _NOT_AN_IMAGE or _UNREADABLE.

    Ledger output (tag LEDGER_TAG): the failures counted (`transforms.ledger`).

    Returns a dict of PCollections keyed by records.SAMPLES_TAG, records.DEAD_LETTER_TAG and
    LEDGER_TAG. Counters (namespace "image"): images_processed and
    failed/<reason>.

    Errors that are not per-record (permission denied, a requester-pays bucket read without
    a billing project) raise and fail the pipeline, rather than dead-lettering every record.
    """

    def __init__(
        self,
        image_size: int = 518,
        clahe: bool = True,
        clip_limit: float = 2.0,
        tile_grid: int = 8,
        requester_pays_project: Optional[str] = None,
    ) -> None:
        super().__init__()
        self._fn = _PreprocessImageFn(ImageSettings(
            image_size, clahe, clip_limit, tile_grid, requester_pays_project or None))

    def expand(self, samples: beam.PCollection) -> dict[str, beam.PCollection]:
        out = samples | "DecodeAndLetterbox" >> beam.ParDo(self._fn).with_outputs(
            records.DEAD_LETTER_TAG, LEDGER_TAG, main=records.SAMPLES_TAG
        )
        return {tag: out[tag] for tag in (records.SAMPLES_TAG, records.DEAD_LETTER_TAG,
                                          LEDGER_TAG)}
