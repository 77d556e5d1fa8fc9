"""Preflight: PhysioNet inputs, tables and images, writable output, bucket locations; on the
GCS emulator."""

from __future__ import annotations

import json
import os
import urllib.request

import pytest

from pipelines import preflight
from pipelines.preflight import ERROR, WARNING
from transforms.join import schema

INPUTS = "preflight-inputs"
OUTPUTS = "preflight-outputs"
PHYSIONET = "mimic-preflight.physionet.org"


@pytest.mark.parametrize("location, region, holds", [
    ("US-CENTRAL1", "us-central1", True),
    ("us-central1", "us-east1", False),
    ("US", "us-central1", True),
    ("US", "europe-west4", False),
    ("EU", "europe-west4", True),
    ("NAM4", "us-east1", True),
    ("NAM4", "us-west1", False),
    ("XYZ", "us-central1", False),
])
def test_location_holds(location, region, holds):
    assert preflight.location_holds(location, region) is holds


def test_location_holds_a_custom_dual_region_by_its_data_locations():
    assert preflight.location_holds("US", "us-east4", ["US-EAST4", "US-WEST1"])
    assert not preflight.location_holds("US", "us-central1", ["US-EAST4", "US-WEST1"])


def test_physionet_buckets_are_recognised_by_name():
    assert preflight.physionet_buckets([
        "gs://mimiciv-3.1.physionet.org", "gs://mimic-cxr-jpg-2.1.0.physionet.org/files",
        "gs://mimiciv-3.1.physionet.org/hosp", "gs://my-bucket/physionet.org", "/local",
    ]) == ["mimic-cxr-jpg-2.1.0.physionet.org", "mimiciv-3.1.physionet.org"]


def _client():
    from google.cloud import storage

    return storage.Client(project="test-project")


def _roots(data) -> dict[str, str]:
    return {schema.MIMIC_IV: data.mimic_iv_dir, schema.MIMIC_ED: data.mimic_ed_dir,
            schema.MIMIC_CXR: data.mimic_cxr_dir}


@pytest.fixture(scope="module")
def buckets(gcs_emulator):
    from synthetic.mimic import generate

    client = _client()
    for name in (INPUTS, OUTPUTS, PHYSIONET):
        if client.lookup_bucket(name) is None:
            client.create_bucket(name)
    kwargs = dict(n_patients=8, seed=3, image_height=32, image_width=32, image_pool=2)
    return {"mine": generate(f"gs://{INPUTS}/mimic", **kwargs),
            "physionet": generate(f"gs://{PHYSIONET}", **kwargs)}


def _set_location(bucket: str, location: str) -> None:
    """The emulator creates every bucket in "US"; a PATCH moves it (metadata only)."""
    request = urllib.request.Request(
        f"{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/b/{bucket}",
        data=json.dumps({"location": location}).encode(), method="PATCH",
        headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()


def test_a_ready_job_has_no_findings(buckets):
    findings = preflight.run_preflight(
        roots=_roots(buckets["mine"]), output_dir=f"gs://{OUTPUTS}/dataset",
        temp_location=f"gs://{OUTPUTS}/temp", region="us-central1",
        user_project="test-project")
    assert findings == []
    # The probes are gone.
    assert [b.name for b in _client().list_blobs(OUTPUTS)] == []


def test_each_problem_is_one_line(buckets):
    data = buckets["mine"]
    roots = {**_roots(data), schema.MIMIC_IV: f"gs://{INPUTS}/nothing-here"}
    findings = preflight.run_preflight(
        roots=roots, output_dir="gs://no-such-bucket/dataset", temp_location="/tmp/local",
        region="us-central1", image_root=f"gs://{INPUTS}/wrong-images",
        user_project="test-project")
    errors = [f.message for f in findings if f.level == ERROR]
    assert len(errors) == 4 and all("\n" not in e for e in errors)
    assert "hosp/patients.csv.gz not found" in errors[0]
    assert "hosp/admissions.csv.gz not found" in errors[0]
    assert "none of the first" in errors[1] and "wrong-images" in errors[1]
    assert errors[2].startswith("output_dir gs://no-such-bucket/dataset is not writable: "
                                "NotFound")
    assert errors[3].startswith("temp_location /tmp/local is not a gs:// path")
    assert preflight.has_errors(findings)
    # The missing bucket's location cannot be read: said, not fatal.
    warnings = [f.message for f in findings if f.level == WARNING]
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    assert warnings[0].startswith("cannot read who may read gs://no-such-bucket (output_dir): "
                                  "NotFound")
    assert "public access not checked" in warnings[0]
    assert "cannot read the location of gs://no-such-bucket" in warnings[1]


def test_inputs_on_physionet_say_to_stage_them(buckets):
    findings = preflight.run_preflight(
        roots=_roots(buckets["physionet"]), output_dir=f"gs://{OUTPUTS}/dataset",
        temp_location=None, region="us-central1", user_project="test-project")
    assert [f.level for f in findings] == [ERROR]
    assert f"gs://{PHYSIONET}" in findings[0].message
    assert "./run_dataflow.sh --stage" in findings[0].message
    assert str(findings[0]).startswith("error: inputs on PhysioNet's buckets")


def test_a_bucket_outside_the_region_is_a_warning_with_its_cost(buckets):
    _set_location(OUTPUTS, "EUROPE-WEST4")
    try:
        findings = preflight.run_preflight(
            roots=_roots(buckets["mine"]), output_dir=f"gs://{OUTPUTS}/dataset",
            temp_location=f"gs://{OUTPUTS}/temp", region="us-central1",
            user_project="test-project")
    finally:
        _set_location(OUTPUTS, "US")
    assert [f.level for f in findings] == [WARNING]
    assert findings[0].message.startswith(
        f"gs://{OUTPUTS} (output_dir, temp_location) is in EUROPE-WEST4, the workers in "
        "us-central1: ")
    assert "billed per GB as data transfer" in findings[0].message
    assert not preflight.has_errors(findings)


# ----------------------------------------------------------------------------- public access
# Bodies as GCS documents them: the bucket resource (projection=full) and getIamPolicy's.
_PRIVATE = {"iamConfiguration": {"uniformBucketLevelAccess": {"enabled": True},
                                 "publicAccessPrevention": "inherited"}}
_FINE_GRAINED = {"iamConfiguration": {"uniformBucketLevelAccess": {"enabled": False},
                                      "publicAccessPrevention": "inherited"},
                 "acl": [{"entity": "project-owners-123", "role": "OWNER"}],
                 "defaultObjectAcl": [{"entity": "project-owners-123", "role": "OWNER"}]}
_ENFORCED = {"iamConfiguration": {"uniformBucketLevelAccess": {"enabled": True},
                                  "publicAccessPrevention": "enforced"}}
_TEAM = {"bindings": [{"role": "roles/storage.objectAdmin",
                       "members": ["user:me@example.org", "group:mimic@example.org"]}]}


def _with(policy: dict, member: str, role: str = "roles/storage.objectViewer") -> dict:
    return {"bindings": [*policy["bindings"], {"role": role, "members": [member]}]}


@pytest.mark.parametrize("resource, policy, grants", [
    (_PRIVATE, _TEAM, []),
    (_PRIVATE, {"version": 1, "etag": "CAE="}, []),  # no bindings at all
    (_PRIVATE, _with(_TEAM, "allUsers"), ["allUsers roles/storage.objectViewer (IAM policy)"]),
    (_PRIVATE, _with(_TEAM, "allAuthenticatedUsers", "roles/storage.legacyBucketReader"),
     ["allAuthenticatedUsers roles/storage.legacyBucketReader (IAM policy)"]),
    # Enforced prevention overrides any public grant.
    (_ENFORCED, _with(_TEAM, "allUsers"), []),
    (_FINE_GRAINED, _TEAM, []),
    ({**_FINE_GRAINED, "defaultObjectAcl": [{"entity": "allUsers", "role": "READER"}]}, _TEAM,
     ["allUsers READER (default object ACL)"]),
    ({**_FINE_GRAINED, "acl": [{"entity": "allAuthenticatedUsers", "role": "READER"}]}, _TEAM,
     ["allAuthenticatedUsers READER (bucket ACL)"]),
    # With uniform bucket-level access, ACLs no longer apply.
    ({**_PRIVATE, "defaultObjectAcl": [{"entity": "allUsers", "role": "READER"}]}, _TEAM, []),
    # A policy that could not be read (None): the ACLs are still judged.
    ({**_FINE_GRAINED, "acl": [{"entity": "allUsers", "role": "READER"}]}, None,
     ["allUsers READER (bucket ACL)"]),
])
def test_public_grants(resource, policy, grants):
    assert preflight.public_grants(resource, policy) == grants


def test_a_public_bucket_is_an_error_unless_the_risk_is_accepted():
    policy = _with(_TEAM, "allUsers")
    refused = preflight.public_access("lab", ["output_dir"], _PRIVATE, policy)
    assert refused.level == ERROR and "\n" not in refused.message
    assert refused.message.startswith("gs://lab (output_dir) is open to the public: allUsers "
                                      "roles/storage.objectViewer (IAM policy); "
                                      "publicAccessPrevention inherited: ")
    assert preflight.ALLOW_PUBLIC in refused.message
    accepted = preflight.public_access("lab", ["output_dir"], _PRIVATE, policy,
                                       allow_public=True)
    assert accepted.level == WARNING and accepted.message.endswith(
        f"submitted anyway ({preflight.ALLOW_PUBLIC})")
    assert preflight.public_access("lab", ["output_dir"], _PRIVATE, _TEAM) is None


def _patch_bucket(bucket: str, body: dict) -> None:
    request = urllib.request.Request(
        f"{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/b/{bucket}",
        data=json.dumps(body).encode(), method="PATCH",
        headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()


def test_an_output_bucket_whose_new_objects_are_public_stops_the_submission(buckets):
    public = "preflight-public"
    if _client().lookup_bucket(public) is None:
        _client().create_bucket(public)
    _patch_bucket(public, {"defaultObjectAcl": [{"entity": "allUsers", "role": "READER"}]})
    kwargs = dict(roots=_roots(buckets["mine"]), output_dir=f"gs://{public}/dataset",
                  temp_location=f"gs://{OUTPUTS}/temp", region=None)
    findings = preflight.run_preflight(**kwargs)
    assert [str(f) for f in findings] == [
        f"error: gs://{public} (output_dir) is open to the public: allUsers READER (default "
        "object ACL); publicAccessPrevention inherited: anyone could read credentialed "
        f"PhysioNet data there; remove those grants or run `gcloud storage buckets update "
        f"gs://{public} --public-access-prevention`, or set allow_public_output to accept "
        "the risk"]
    assert [f.level for f in preflight.run_preflight(**kwargs, allow_public=True)] == [WARNING]
    _patch_bucket(public, {"iamConfiguration": {"publicAccessPrevention": "enforced"}})
    assert preflight.run_preflight(**kwargs) == []


def test_the_risk_is_accepted_by_the_config_key_or_its_flag(tmp_path):
    from pipelines import dataflow_config as dc

    overrides, rest = dc.split_overrides(["--allow_public_output", "--views", "AP"])
    assert overrides == {preflight.ALLOW_PUBLIC: True} and rest == ["--views", "AP"]
    assert dc.split_overrides(["--views", "AP"])[0] == {}
    assert dc.KEYS_BY_NAME[preflight.ALLOW_PUBLIC].default is False
