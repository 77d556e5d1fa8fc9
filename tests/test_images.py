"""Image preprocessing: pure functions, the DoFn, and PreprocessImages in a TestPipeline.

Every image here is a real radiograph (the NIH ChestX-ray14 PNGs, re-encoded as JPEG, some
cropped and resized to other shapes), decoded by the real decoders.
"""

from __future__ import annotations

import math
from pathlib import Path

import apache_beam as beam
import cv2
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms import images, records, storage
from transforms.ledger import LEDGER_TAG

SIZES = (224, 518)
# What a mirror sync that never fetched the LFS object leaves behind: text with a .jpg name.
LFS_POINTER = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    b"size 1572864\n"
)


def make_record(record_id: str, image_path: str) -> records.CohortRecord:
    """A CohortRecord with the fields this stage reads; the rest minimal."""
    number = sum(map(ord, record_id))
    return records.CohortRecord(
        record_id=record_id,
        subject_id=10000000 + number,
        study_id=50000000 + number,
        stay_id=30000000 + number,
        hadm_id=None,
        view_position="PA",
        study_datetime="2180-07-23T21:30:14",
        image_path=image_path,
        patient=None,
        stay={"intime": "2180-07-23 20:00:00", "outtime": "2180-07-24 02:00:00"},
        triage=None,
        vitals=(),
        medications=(),
        prior_admissions=0,
        labels=(math.nan,) * 14,
    )


def _options() -> PipelineOptions:
    return PipelineOptions(["--runner=FnApiRunner"])


def _reshape_radiograph(png: Path, width: int, height: int) -> np.ndarray:
    """The real radiograph centre-cropped to width:height, then resized to width x height."""
    pixels = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
    rows, cols = pixels.shape
    if width / height < cols / rows:
        keep = round(rows * width / height)
        pixels = pixels[:, (cols - keep) // 2 : (cols - keep) // 2 + keep]
    else:
        keep = round(cols * height / width)
        pixels = pixels[(rows - keep) // 2 : (rows - keep) // 2 + keep, :]
    interpolation = cv2.INTER_AREA if width < pixels.shape[1] else cv2.INTER_CUBIC
    return cv2.resize(pixels, (width, height), interpolation=interpolation)


def _jpeg(pixels: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def shaped_jpegs(radiograph_pngs: list[Path], tmp_path_factory) -> dict[str, Path]:
    """Real radiographs as JPEGs of other shapes: portrait 300x420, landscape 420x300, and a
    1024 x 1200 one large enough for a 1/4 DCT-domain reduced decode at 224."""
    out = tmp_path_factory.mktemp("shaped")
    shapes = {"portrait": (300, 420), "landscape": (420, 300), "large": (1024, 1200)}
    paths = {}
    for name, (width, height) in shapes.items():
        path = out / f"{name}.jpg"
        path.write_bytes(_jpeg(_reshape_radiograph(radiograph_pngs[0], width, height)))
        paths[name] = path
    return paths


@pytest.fixture(scope="module")
def faulty_files(radiograph_jpegs: list[Path], tmp_path_factory) -> dict[str, Path]:
    """One file per fault kind, named .jpg like the real ones; "missing" is never written."""
    out = tmp_path_factory.mktemp("faulty")
    real = radiograph_jpegs[0].read_bytes()
    garbage = np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes()
    contents = {
        records.FAIL_IMAGE_EMPTY: b"",
        records.FAIL_IMAGE_TRUNCATED: real[: len(real) // 2],
        records.FAIL_IMAGE_NOT_AN_IMAGE: LFS_POINTER,
        # A valid JPEG start (SOI and the JFIF APP0 segment), then garbage, then an end marker.
        records.FAIL_IMAGE_UNREADABLE: real[:20] + garbage + b"\xff\xd9",
    }
    paths = {records.FAIL_IMAGE_MISSING: out / "missing.jpg"}
    for reason, data in contents.items():
        paths[reason] = out / f"{reason}.jpg"
        paths[reason].write_bytes(data)
    return paths


def _source_shape(path: Path) -> tuple[int, int]:
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).shape


def _local_contrast(image: np.ndarray, box: np.ndarray, block: int = 8) -> float:
    """Mean standard deviation over block x block tiles of the real pixels."""
    top, left, height, width = (int(v) for v in box)
    region = image[top : top + height, left : left + width].astype(np.float64)
    rows, cols = height // block * block, width // block * block
    tiles = region[:rows, :cols].reshape(rows // block, block, cols // block, block)
    return float(tiles.std(axis=(1, 3)).mean())


def _outside(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    top, left, height, width = (int(v) for v in box)
    mask = np.ones(image.shape, dtype=bool)
    mask[top : top + height, left : left + width] = False
    return image[mask]


# Pure functions ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("shape_name", ["portrait", "landscape", "real_square"])
def test_output_is_square_uint8_with_the_source_aspect(
    shape_name, size, shaped_jpegs, radiograph_jpegs
):
    path = radiograph_jpegs[0] if shape_name == "real_square" else shaped_jpegs[shape_name]
    src_h, src_w = _source_shape(path)

    image, box = images.preprocess_image(path.read_bytes(), size=size, clahe=False)

    assert image.shape == (size, size) and image.dtype == np.uint8
    assert box.shape == (4,) and box.dtype == np.int32
    top, left, height, width = (int(v) for v in box)
    assert max(height, width) == size
    if src_h >= src_w:
        assert abs(width - src_w * size / src_h) <= 1
    else:
        assert abs(height - src_h * size / src_w) <= 1
    assert (top, left) == ((size - height) // 2, (size - width) // 2)  # centred


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("clahe", [False, True])
def test_padding_is_zero_and_the_box_holds_the_radiograph(size, clahe, shaped_jpegs):
    image, box = images.preprocess_image(
        shaped_jpegs["portrait"].read_bytes(), size=size, clahe=clahe
    )
    top, left, height, width = (int(v) for v in box)
    assert left > 0 and top == 0  # portrait: padding left and right only
    assert not _outside(image, box).any()
    content = image[top : top + height, left : left + width]
    # The radiograph fills the box edge to edge: its first and last columns are not padding.
    assert content[:, 0].mean() > 5 and content[:, -1].mean() > 5
    assert content.std() > 20


@pytest.mark.parametrize("size", SIZES)
def test_box_content_is_the_resized_radiograph(size, shaped_jpegs):
    data = shaped_jpegs["landscape"].read_bytes()
    image, box = images.preprocess_image(data, size=size, clahe=False)
    top, left, height, width = (int(v) for v in box)

    full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    shrink = width <= full.shape[1]
    expected = cv2.resize(
        full, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    )
    content = image[top : top + height, left : left + width].astype(np.int16)
    assert np.abs(content - expected).max() <= 1


def test_reduced_decode_matches_the_full_decode(shaped_jpegs):
    """At 224 a 1024 x 1200 JPEG is decoded at 1/4 in the DCT domain; nothing visible lost."""
    data = shaped_jpegs["large"].read_bytes()
    reduced, box = images.preprocess_image(data, size=224, clahe=False)
    reference, reference_box = images.letterbox(images.decode_grayscale(data), 224)

    assert box.tolist() == reference_box.tolist()
    diff = np.abs(reduced.astype(np.int16) - reference.astype(np.int16))
    # A few pixels differ more along the burnt-in marker's hard edges (a different filter).
    assert diff.mean() < 0.5 and np.percentile(diff, 99.9) <= 6


def test_decode_grayscale_reads_jpeg_and_png(radiograph_pngs, radiograph_jpegs):
    png = cv2.imread(str(radiograph_pngs[0]), cv2.IMREAD_GRAYSCALE)

    from_png = images.decode_grayscale(radiograph_pngs[0].read_bytes())
    from_jpeg = images.decode_grayscale(radiograph_jpegs[0].read_bytes())

    assert np.array_equal(from_png, png)
    assert from_jpeg.shape == png.shape and from_jpeg.dtype == np.uint8
    assert np.abs(from_jpeg.astype(np.int16) - png).mean() < 2  # JPEG quality 95


@pytest.mark.parametrize("size", SIZES)
def test_clahe_changes_the_image_and_raises_local_contrast(size, radiograph_jpegs):
    data = radiograph_jpegs[1].read_bytes()
    plain, box = images.preprocess_image(data, size=size, clahe=False)
    enhanced, enhanced_box = images.preprocess_image(data, size=size, clahe=True)

    assert enhanced_box.tolist() == box.tolist()
    assert not np.array_equal(plain, enhanced)
    assert _local_contrast(enhanced, box) > 1.2 * _local_contrast(plain, box)


def test_clahe_sees_only_the_real_pixels(shaped_jpegs):
    """Same result as CLAHE on the unpadded content: the zero padding does not skew it."""
    plain, box = images.preprocess_image(shaped_jpegs["portrait"].read_bytes(), clahe=False)
    top, left, height, width = (int(v) for v in box)
    before = plain.copy()

    enhanced = images.enhance_contrast(plain, box, clip_limit=3.0, tile_grid=4)

    expected = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(4, 4)).apply(
        np.ascontiguousarray(plain[top : top + height, left : left + width])
    )
    assert np.array_equal(enhanced[top : top + height, left : left + width], expected)
    assert not _outside(enhanced, box).any()
    assert np.array_equal(plain, before)  # the input is not modified


def test_clip_limit_and_tile_grid_take_effect(radiograph_jpegs):
    data = radiograph_jpegs[0].read_bytes()
    default, _ = images.preprocess_image(data, size=224)
    stronger, _ = images.preprocess_image(data, size=224, clip_limit=4.0)
    coarser, _ = images.preprocess_image(data, size=224, tile_grid=2)
    assert not np.array_equal(default, stronger)
    assert not np.array_equal(default, coarser)


def test_same_bytes_give_identical_output(shaped_jpegs, radiograph_jpegs):
    for path in (shaped_jpegs["portrait"], radiograph_jpegs[0]):
        first = images.preprocess_image(path.read_bytes())
        second = images.preprocess_image(bytes(path.read_bytes()))
        assert first[0].tobytes() == second[0].tobytes()
        assert first[1].tobytes() == second[1].tobytes()


@pytest.mark.parametrize(
    "reason",
    [
        records.FAIL_IMAGE_EMPTY,
        records.FAIL_IMAGE_TRUNCATED,
        records.FAIL_IMAGE_NOT_AN_IMAGE,
        records.FAIL_IMAGE_UNREADABLE,
    ],
)
def test_bad_bytes_raise_with_their_reason(reason, faulty_files):
    data = faulty_files[reason].read_bytes()
    with pytest.raises(images.ImageDecodeError) as raised:
        images.decode_grayscale(data)
    assert raised.value.reason == reason
    with pytest.raises(images.ImageDecodeError) as raised:
        images.preprocess_image(data)
    assert raised.value.reason == reason


def test_truncated_png_is_caught(radiograph_pngs):
    png = radiograph_pngs[0].read_bytes()
    with pytest.raises(images.ImageDecodeError) as raised:
        images.decode_grayscale(png[: len(png) * 2 // 3])
    assert raised.value.reason == records.FAIL_IMAGE_TRUNCATED


def test_bad_settings_raise_value_error(radiograph_jpegs):
    pixels = np.zeros((10, 20), np.uint8)
    with pytest.raises(ValueError, match="size"):
        images.letterbox(pixels, 0)
    with pytest.raises(ValueError, match="uint8"):
        images.letterbox(pixels.astype(np.float32), 64)
    with pytest.raises(ValueError, match="clip_limit"):
        images.enhance_contrast(*images.letterbox(pixels, 64), clip_limit=0)
    with pytest.raises(ValueError, match="tile_grid"):
        images.PreprocessImages(tile_grid=0)
    with pytest.raises(ValueError, match="size"):
        images.PreprocessImages(image_size=-1)


# The DoFn, called directly -------------------------------------------------------------------


def test_dofn_adds_image_and_box_to_a_new_dict(radiograph_jpegs):
    fn = images._PreprocessImageFn(images.ImageSettings(224, True, 2.0, 8, None))
    fn.setup()
    sample = records.sample_from(make_record("good", str(radiograph_jpegs[0])))
    sample["notes"] = "kept"

    (out,) = list(fn.process(sample))

    assert set(sample) == {"cohort", "notes"}  # input untouched
    assert out["cohort"] is sample["cohort"] and out["notes"] == "kept"
    assert out["image"].shape == (224, 224) and out["image_box"].tolist() == [0, 0, 224, 224]


def test_dofn_sends_a_missing_file_to_the_dead_letters(tmp_path):
    fn = images._PreprocessImageFn(images.ImageSettings(224, True, 2.0, 8, None))
    fn.setup()
    record = make_record("gone", str(tmp_path / "gone.jpg"))

    (out,) = list(fn.process(records.sample_from(record)))

    assert out.tag == records.DEAD_LETTER_TAG
    assert (out.value.record_id, out.value.stage, out.value.reason) == (
        "gone", "image", records.FAIL_IMAGE_MISSING,
    )


# PreprocessImages in a pipeline --------------------------------------------------------------


def _summary(sample: dict) -> tuple:
    return (
        sample["cohort"].record_id,
        sample["image"].shape,
        str(sample["image"].dtype),
        tuple(int(v) for v in sample["image_box"]),
    )


def _dead_key(dead: records.DeadLetter) -> tuple:
    return (dead.record_id, dead.stage, dead.reason)


def test_pipeline_splits_good_images_from_every_dead_letter_kind(
    radiograph_jpegs, shaped_jpegs, faulty_files
):
    size = 224
    good_paths = {"real0": radiograph_jpegs[0], "real1": radiograph_jpegs[1],
                  "portrait": shaped_jpegs["portrait"]}
    samples = [records.sample_from(make_record(rid, str(p))) for rid, p in good_paths.items()]
    samples += [records.sample_from(make_record(reason, str(path)))
                for reason, path in faulty_files.items()]
    expected_good = []
    for rid, path in good_paths.items():
        _, box = images.preprocess_image(path.read_bytes(), size=size)
        expected_good.append((rid, (size, size), "uint8", tuple(int(v) for v in box)))
    expected_dead = [(reason, "image", reason) for reason in faulty_files]

    pipeline = test_pipeline.TestPipeline(options=_options())
    out = pipeline | beam.Create(samples) | images.PreprocessImages(image_size=size)
    good, dead = out[records.SAMPLES_TAG], out[records.DEAD_LETTER_TAG]
    assert_that(good | "Summarise" >> beam.Map(_summary), equal_to(expected_good), label="Good")
    assert_that(dead | "Keys" >> beam.Map(_dead_key), equal_to(expected_dead), label="Dead")
    # The ledger counts each failure where it happened, for the run's conservation check.
    assert_that(out[LEDGER_TAG] | "Sum" >> beam.CombinePerKey(sum),
                equal_to([(images.failed_counter(r), 1) for r in faulty_files]), label="Ledger")
    result = pipeline.run()
    result.wait_until_finish()

    def counter(name: str) -> int:
        found = result.metrics().query(MetricsFilter().with_namespace("image").with_name(name))
        return sum(c.committed for c in found["counters"])

    assert counter("images_processed") == 3
    for reason in faulty_files:
        assert counter(f"failed/{reason}") == 1


def test_pipeline_output_is_the_pure_function_output(radiograph_jpegs):
    path = radiograph_jpegs[1]
    expected, expected_box = images.preprocess_image(path.read_bytes(), size=518)
    sample = records.sample_from(make_record("real1", str(path)))

    with test_pipeline.TestPipeline(options=_options()) as pipeline:
        result = pipeline | beam.Create([sample]) | images.PreprocessImages()
        fingerprints = result[records.SAMPLES_TAG] | beam.Map(
            lambda s: (s["image"].tobytes(), s["image_box"].tobytes())
        )
        assert_that(
            fingerprints, equal_to([(expected.tobytes(), expected_box.tobytes())]), label="Same"
        )
        assert_that(result[records.DEAD_LETTER_TAG], equal_to([]), label="NoDead")


def test_gcs_requester_pays_read(gcs_emulator, radiograph_jpegs, faulty_files):
    from google.cloud import storage as gcs

    bucket = gcs.Client(project="test-project").bucket(gcs_emulator[len("gs://"):])
    real = radiograph_jpegs[0].read_bytes()
    bucket.blob("images/p10/real.jpg").upload_from_string(real)
    bucket.blob("images/p10/truncated.jpg").upload_from_string(real[: len(real) // 2])
    base = f"{gcs_emulator}/images/p10"

    assert storage.read_bytes(f"{base}/real.jpg", user_project="billed-project") == real
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{base}/absent.jpg", user_project="billed-project")

    expected, expected_box = images.preprocess_image(real, size=224)
    samples = [
        records.sample_from(make_record("real", f"{base}/real.jpg")),
        records.sample_from(make_record("truncated", f"{base}/truncated.jpg")),
        records.sample_from(make_record("absent", f"{base}/absent.jpg")),
    ]
    with test_pipeline.TestPipeline(options=_options()) as pipeline:
        result = pipeline | beam.Create(samples) | images.PreprocessImages(
            image_size=224, requester_pays_project="billed-project"
        )
        good, dead = result[records.SAMPLES_TAG], result[records.DEAD_LETTER_TAG]
        assert_that(
            good | "Bytes" >> beam.Map(lambda s: (s["image"].tobytes(), s["image_box"].tolist())),
            equal_to([(expected.tobytes(), expected_box.tolist())]),
            label="GoodFromGcs",
        )
        assert_that(
            dead | "Keys" >> beam.Map(_dead_key),
            equal_to([("truncated", "image", records.FAIL_IMAGE_TRUNCATED),
                      ("absent", "image", records.FAIL_IMAGE_MISSING)]),
            label="DeadFromGcs",
        )
