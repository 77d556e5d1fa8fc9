"""The chunk format and its loader; imports torch (never Beam), so training code needs no Beam.

    from transforms.chunks import ChunkedDataset, collate_records
    ds = ChunkedDataset("gs://bucket/out", "train", batch_size=32, seed=0)
    loader = DataLoader(ds, batch_size=32, num_workers=4, collate_fn=collate_records)

Mid-epoch resume works through torchdata's `StatefulDataLoader` (optional) or the dataset's
own `state_dict()`, on any number of workers and ranks; see `IterableChunkedDataset`.
"""

from transforms.chunks.dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TRAINING_FIELDS,
    ChunkedDataset,
    IterableChunkedDataset,
    MapChunkedDataset,
    collate_records,
    normalize_images,
)
from transforms.chunks.errors import ChunkIntegrityError, IncompleteOutputError, MissingChunkError
from transforms.chunks.format import (
    CHUNK_FIELDS,
    FORMAT_VERSION,
    RECORD_FIELDS,
    chunk_len,
    chunk_name,
    chunk_relpath,
    decode_chunk,
    decode_record,
    encode_chunk,
    encode_record,
    record_at,
)
from transforms.chunks.storage import METADATA_NAME, read_metadata

__all__ = [
    "CHUNK_FIELDS",
    "FORMAT_VERSION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "METADATA_NAME",
    "RECORD_FIELDS",
    "TRAINING_FIELDS",
    "ChunkIntegrityError",
    "ChunkedDataset",
    "IncompleteOutputError",
    "IterableChunkedDataset",
    "MapChunkedDataset",
    "MissingChunkError",
    "chunk_len",
    "chunk_name",
    "chunk_relpath",
    "collate_records",
    "decode_chunk",
    "decode_record",
    "encode_chunk",
    "encode_record",
    "normalize_images",
    "read_metadata",
    "record_at",
]
