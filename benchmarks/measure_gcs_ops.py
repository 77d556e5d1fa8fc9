"""GCS calls of the output stages (spill, chunks, metadata) on the emulator, counted by kind.

Runs `tests.test_write_chunks.run_pipeline` on a synthetic cohort with its output on gs://,
behind `tests.gcs_proxy.CountingProxy`, and prints one JSON line: requests by kind, object
writes (uploads, copies, deletes) and writes per record.

    python benchmarks/measure_gcs_ops.py [N_PATIENTS]   # default 24 patients, 48 records
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
from tests.gcs_proxy import CountingProxy, write_ops  # noqa: E402


def main() -> None:
    patients = int(sys.argv[1]) if len(sys.argv) > 1 else 24
    os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = str(
        _fake_credentials(Path(tempfile.mkdtemp())))
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

        gcs.Client(project="test-project").create_bucket("bench")
        from tests.test_write_chunks import make_cohort_records, run_pipeline
        from transforms.metadata import check_output_dir

        cohort = make_cohort_records(patients)
        check_output_dir("gs://bench/out", overwrite=False)
        proxy.reset()
        run_pipeline("gs://bench/out", cohort, chunk_size=4)
        counts = proxy.counts()
        print(json.dumps({
            "records": len(cohort), "requests": dict(sorted(counts.items())),
            "total_requests": sum(counts.values()), "write_ops": write_ops(counts),
            "writes_per_record": round(write_ops(counts) / len(cohort), 2)}))
        proxy.close()
    finally:
        emulator.terminate()
        emulator.wait(timeout=10)


if __name__ == "__main__":
    main()
