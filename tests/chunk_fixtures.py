"""A tiny pipeline output written with the real chunk encoder, for the loader's tests."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Optional

import torch

from transforms.chunks import FORMAT_VERSION, chunk_relpath, encode_chunk

LABEL_NAMES = [f"label_{k}" for k in range(14)]
SEGMENT_NAMES = ("triage", "vitals", "medications", "retrieved_knowledge")


def make_record(
    n: int,
    split: str,
    *,
    image_size: int = 32,
    n_features: int = 5,
    text_len: Optional[int] = None,
) -> dict:
    """Record number `n`: deterministic, distinct content, every field exercised."""
    gen = torch.Generator().manual_seed(n)
    size = image_size
    height = size - (n % 3) * 4  # letterboxed: some rows of padding
    top = (size - height) // 2
    image = torch.zeros(size, size, dtype=torch.uint8)
    image[top : top + height] = torch.randint(0, 256, (height, size), generator=gen,
                                              dtype=torch.uint8)
    length = text_len if text_len is not None else 5 + (n * 7) % 23
    ids = torch.randint(1, 30000, (length,), generator=gen, dtype=torch.int32)
    cut = length // 2
    labels = torch.tensor([float((n + k) % 4) - 1.0 for k in range(14)], dtype=torch.float32)
    labels[labels == 2.0] = float("nan")
    mask = torch.tensor([(n + k) % 3 != 0 for k in range(n_features)], dtype=torch.bool)
    return {
        "record_id": f"dicom-{n:05d}",
        "subject_id": 10000000 + n // 2,
        "study_id": 50000000 + n,
        "stay_id": 30000000 + n,
        "hadm_id": None if n % 4 == 0 else 20000000 + n,
        "view_position": "AP" if n % 2 else "PA",
        "split": split,
        "study_datetime": f"2180-01-{1 + n % 28:02d}T10:00:00",
        "image": image,
        "image_box": torch.tensor([top, 0, height, size], dtype=torch.int32),
        "enhanced_note": f"note of record {n}",
        "text_input_ids": ids,
        "attention_segments": [["triage", 0, cut], ["vitals", cut, length]],
        "clinical_data": torch.where(mask, torch.arange(n_features, dtype=torch.float32) + n,
                                     torch.zeros(n_features)),
        "clinical_mask": mask,
        "labels": labels,
        "retrieved_knowledge": [f"fact {n}"] if n % 2 else [],
    }


def write_dataset(
    root: Path,
    counts: dict[str, int],
    *,
    chunk_size: int = 4,
    image_size: int = 32,
    n_features: int = 5,
    text_len: Optional[int] = None,
) -> dict:
    """Writes chunks of `counts[split]` records per split and metadata.json; returns it."""
    entries = []
    n = 0
    for split, count in counts.items():
        n_chunks = math.ceil(count / chunk_size)
        for index in range(n_chunks):
            size = min(chunk_size, count - index * chunk_size)
            records = [
                make_record(n + k, split, image_size=image_size, n_features=n_features,
                            text_len=text_len)
                for k in range(size)
            ]
            n += size
            data = encode_chunk(records, split=split)
            rel = chunk_relpath(split, index, n_chunks)
            os.makedirs(root / split, exist_ok=True)
            (root / rel).write_bytes(data)
            entries.append({"path": rel, "split": split, "index": index, "records": size,
                            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    meta = {
        "format_version": FORMAT_VERSION,
        **{f"n_{split}": counts.get(split, 0) for split in ("train", "val", "test")},
        "total_records": sum(counts.values()),
        "image_size": image_size,
        "feature_names": [f"feature_{k}" for k in range(n_features)],
        "label_names": LABEL_NAMES,
        "chunks": entries,
    }
    (root / "metadata.json").write_text(json.dumps(meta, indent=1))
    return meta


def upload_tree(local: Path, gs_uri: str) -> None:
    """Copies every file under `local` to `gs_uri` (a gs://bucket/prefix)."""
    from google.cloud import storage

    bucket_name, _, prefix = gs_uri[len("gs://"):].partition("/")
    bucket = storage.Client().bucket(bucket_name)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            name = f"{prefix}/{path.relative_to(local).as_posix()}".lstrip("/")
            bucket.blob(name).upload_from_filename(str(path))
