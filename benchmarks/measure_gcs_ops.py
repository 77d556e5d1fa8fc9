"""GCS calls of the whole output path on the emulator, counted by kind, per record.

Generates a synthetic MIMIC-shaped dataset (local inputs, real JPEGs), runs the pipeline
(`build_dataset.run`, the default local runner) with its output on gs:// behind
`tests.gcs_proxy.CountingProxy`, and prints one JSON line: requests by kind, object writes
(uploads and copies: class A; deletes are free), API calls, each per record, and the Dataflow
estimate's GCS operations cost for 107,949 records from these counts at list prices.

    python benchmarks/measure_gcs_ops.py [N_PATIENTS] [CHUNK_SIZE]   # default 400, 50
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import _fake_credentials, _free_port  # noqa: E402
from tests.gcs_proxy import CountingProxy  # noqa: E402

MIMIC_RECORDS = 107_949


def main() -> None:
    patients = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    chunk_size = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    work = Path(tempfile.mkdtemp())
    os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = str(_fake_credentials(work))
    os.environ["GOOGLE_CLOUD_PROJECT"] = "test-project"
    port = _free_port()
    emulator = subprocess.Popen(
        [str(Path(sys.executable).with_name("gcp-storage-emulator")), "start", "--host",
         "127.0.0.1", "--port", str(port), "--in-memory"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(150):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        proxy = CountingProxy(f"http://127.0.0.1:{port}")
        os.environ["STORAGE_EMULATOR_HOST"] = proxy.url
        from google.cloud import storage as gcs

        from pipelines import build_dataset
        from pipelines.prices import PRICES
        from synthetic.mimic import generate

        gcs.Client(project="test-project").create_bucket("bench")
        data = generate(str(work / "mimic"), n_patients=patients, seed=1, image_height=512,
                        image_width=448, image_pool=4)
        proxy.reset()
        with open(os.devnull, "w") as quiet:
            stdout, sys.stdout = sys.stdout, quiet
            try:
                meta = build_dataset.run([
                    "--mimic_iv_dir", data.mimic_iv_dir, "--mimic_ed_dir", data.mimic_ed_dir,
                    "--mimic_cxr_dir", data.mimic_cxr_dir, "--output_dir", "gs://bench/out",
                    "--chunk_size", str(chunk_size), "--image_size", "64",
                    "--max_text_length", "128"])
            finally:
                sys.stdout = stdout
        counts = proxy.counts()
        records = meta["total_records"]
        class_a = counts["upload"] + counts["copy"]
        reads = counts["read"]
        calls = sum(counts.values())
        # Scaled to MIMIC's records: class A per object write, class B per read; plus the
        # source JPEG's read and its metadata (inputs were local here).
        per = MIMIC_RECORDS / records
        usd = (class_a * per * PRICES["gcs_class_a_per_1000"]
               + (reads * per + 2 * MIMIC_RECORDS) * PRICES["gcs_class_b_per_1000"]) / 1000
        print(json.dumps({
            "records": records, "chunks": len(meta["chunks"]), "chunk_size": chunk_size,
            "requests": dict(sorted(counts.items())), "api_calls": calls,
            "object_writes": class_a, "object_writes_per_record": round(class_a / records, 3),
            "api_calls_per_record": round(calls / records, 3),
            "output_gcs_usd_at_107949_records": round(usd, 3)}))
        proxy.close()
    finally:
        emulator.terminate()
        emulator.wait(timeout=10)


if __name__ == "__main__":
    main()
