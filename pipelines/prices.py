"""The GCP list prices (USD) behind the launcher's estimates, in one table: the Dataflow job's
(`pipelines.dataflow_config`) and the staged copy's (`pipelines.stage`).

Recorded on `as_of` from the published rates for `region` (https://cloud.google.com/dataflow/
pricing, https://cloud.google.com/storage/pricing); other regions cost more. Every figure made
from them is printed with them: list prices to check before relying on an estimate.
"""

PRICES = {
    "as_of": "2026-11-22",
    "region": "us-central1",
    # Dataflow batch workers and Dataflow Shuffle.
    "vcpu_hour": 0.056,
    "memory_gb_hour": 0.003557,
    "pd_standard_gb_hour": 0.000054,
    "shuffle_gb": 0.011,
    # Cloud Storage, Standard class in a regional bucket (a US multi-region bucket costs
    # $0.026/GB-month and $0.010 per 1,000 Class A operations). Class A: a write, a rewrite, a
    # list call; class B: a read.
    "gcs_class_a_per_1000": 0.005,
    "gcs_class_b_per_1000": 0.0004,
    "gcs_storage_gb_month": 0.020,
    # Data transfer between locations on one continent, charged when the source and the
    # destination bucket are in different locations (free within one location).
    "gcs_transfer_gb_cross_location": 0.02,
}
