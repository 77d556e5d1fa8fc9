"""Checks before a Dataflow submission: what the workers will need is there and reachable.

Run on the launcher with the user's credentials, before workers start (start-up minutes are
paid even by a job that fails on its first read):

- inputs on PhysioNet's buckets (`*.physionet.org`): an error, since the workers' service
  account is not granted them; `run_dataflow.sh --stage` copies them to the user's bucket;
- every table the job reads exists with its columns, and a sample of the frontal images is
  under the image root (`transforms.join.tables.check_tables` / `check_image_root`, the launcher's
  own checks);
- `output_dir` and `temp_location` are writable (a probe object is written and deleted);
- each bucket's location holds the job's region, or a warning: reads and writes across
  locations are billed per GB as data transfer, and slower;
- no bucket of the user's that the job reads or writes (the staged copy, output_dir,
  temp_location) is open to the public: an error where its IAM policy, its ACL or its default
  object ACL names `allUsers` or `allAuthenticatedUsers` and public access prevention is not
  enforced (the output is credentialed data), unless `allow_public_output`; `public_access`
  decides on the JSON bodies GCS returns, so it is tested on documented bodies (the emulator
  keeps no IAM policy). The ACLs of single objects are not read.

`run_preflight` returns the findings, each one line; the caller prints them and stops on an
error. The write probe runs with the user's credentials: the workers' service account needs
the same access (storage.objectAdmin on the bucket), which cannot be checked from here.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, Iterable, Mapping, Optional

from transforms import storage
from transforms.errors import InputError
from transforms.join import schema
from transforms.join.tables import IMAGE_SAMPLE, check_image_root, check_tables

ERROR = "error"
WARNING = "warning"
PHYSIONET_SUFFIX = ".physionet.org"

# Predefined dual-regions and the regions they hold; a custom dual-region lists its own.
_DUAL_REGIONS = {
    "NAM4": ("us-central1", "us-east1"),
    "EUR4": ("europe-north1", "europe-west4"),
    "ASIA1": ("asia-northeast1", "asia-northeast2"),
}
# Multi-regions and the prefix of the regions inside them (by continent, approximately).
_MULTI_REGIONS = {"US": "us-", "EU": "europe-", "ASIA": "asia-"}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One result of the preflight: ERROR stops the submission, WARNING is printed."""

    level: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


def has_errors(findings: Iterable[Finding]) -> bool:
    return any(f.level == ERROR for f in findings)


def bucket_of(uri: str) -> Optional[str]:
    """The bucket of a gs:// URI; None for a local path."""
    try:
        return storage.split_gcs(uri, prefix=True)[0]
    except ValueError:
        return None


def physionet_buckets(uris: Iterable[str]) -> list[str]:
    """The distinct PhysioNet buckets among `uris`, sorted."""
    buckets = {bucket_of(uri) for uri in uris}
    return sorted(b for b in buckets if b and b.endswith(PHYSIONET_SUFFIX))


def location_holds(location: str, region: str, data_locations: Iterable[str] = ()) -> bool:
    """Whether a bucket in `location` (as GCS reports it: "US-CENTRAL1", "US", "NAM4", ...)
    serves workers in `region` from inside its location."""
    location, region = location.upper(), region.lower()
    custom = [d.lower() for d in data_locations]
    if custom:
        return region in custom
    if location.lower() == region:
        return True
    if location in _DUAL_REGIONS:
        return region in _DUAL_REGIONS[location]
    prefix = _MULTI_REGIONS.get(location)
    return prefix is not None and region.startswith(prefix)




PUBLIC_MEMBERS = ("allUsers", "allAuthenticatedUsers")
ALLOW_PUBLIC = "allow_public_output"  # the launcher key (and flag) that accepts the risk


def public_grants(resource: Mapping[str, Any], policy: Optional[Mapping[str, Any]]
                  ) -> list[str]:
    """Who the public may be, as "MEMBER ROLE (where)", from a bucket resource (projection
    full: `acl`, `defaultObjectAcl`, `iamConfiguration`) and its getIamPolicy body
    (`{"bindings": [{"role", "members"}]}`); none when public access prevention is enforced,
    which overrides both."""
    iam = resource.get("iamConfiguration") or {}
    if iam.get("publicAccessPrevention") == "enforced":
        return []
    grants = [f"{member} {binding.get('role')} (IAM policy)"
              for binding in (policy or {}).get("bindings", [])
              for member in binding.get("members", []) if member in PUBLIC_MEMBERS]
    if not (iam.get("uniformBucketLevelAccess") or {}).get("enabled"):  # ACLs still apply
        for field, where in (("acl", "bucket ACL"), ("defaultObjectAcl", "default object ACL")):
            grants += [f"{entry.get('entity')} {entry.get('role')} ({where})"
                       for entry in resource.get(field) or ()
                       if entry.get("entity") in PUBLIC_MEMBERS]
    return grants


def public_access(bucket: str, keys: Iterable[str], resource: Mapping[str, Any],
                  policy: Optional[Mapping[str, Any]], allow_public: bool = False
                  ) -> Optional[Finding]:
    """An error (a warning with `allow_public`) when bucket `bucket`, used for `keys`, is open
    to the public (`public_grants`)."""
    grants = public_grants(resource, policy)
    if not grants:
        return None
    state = (resource.get("iamConfiguration") or {}).get("publicAccessPrevention", "unset")
    head = (f"gs://{bucket} ({', '.join(keys)}) is open to the public: "
            f"{'; '.join(grants)}; publicAccessPrevention {state}")
    if allow_public:
        return Finding(WARNING, f"{head}; submitted anyway ({ALLOW_PUBLIC})")
    return Finding(ERROR, f"{head}: anyone could read credentialed PhysioNet data there; "
                   f"remove those grants or run `gcloud storage buckets update gs://{bucket} "
                   f"--public-access-prevention`, or set {ALLOW_PUBLIC} to accept the risk")


def check_public_access(bucket: str, keys: list[str], allow_public: bool = False
                        ) -> Optional[Finding]:
    """`public_access` of bucket `bucket` as GCS describes it; a warning if it cannot be read
    (getIamPolicy needs storage.buckets.getIamPolicy, which objectAdmin lacks)."""
    try:
        handle = storage.gcs_bucket(bucket)
        handle.reload(projection="full")
        resource = {"iamConfiguration": dict(handle.iam_configuration),
                    "acl": handle._properties.get("acl", []),  # as GCS sent them
                    "defaultObjectAcl": handle._properties.get("defaultObjectAcl", [])}
        enforced = handle.iam_configuration.public_access_prevention == "enforced"
        policy = None if enforced else handle.get_iam_policy().to_api_repr()
    except storage.gcs_call_errors() as err:
        return Finding(WARNING, f"cannot read who may read gs://{bucket} ({', '.join(keys)}): "
                       f"{storage.error_line(err)}; public access not checked")
    return public_access(bucket, keys, resource, policy, allow_public)


def check_writable(key: str, uri: str) -> Optional[Finding]:
    """Writes and deletes a probe object under `uri`; a Finding if that is refused."""
    bucket = bucket_of(uri)
    if bucket is None:
        return Finding(ERROR, f"{key} {uri} is not a gs:// path: Dataflow workers cannot "
                       "write there")
    folder = storage.split_gcs(uri, prefix=True)[1].strip("/")
    name = "/".join(p for p in (folder, f".preflight-{uuid.uuid4().hex}") if p)
    try:
        # Raw calls, so that the finding names the cause (a missing bucket is NotFound).
        blob = storage.gcs_bucket(bucket).blob(name)
        blob.upload_from_string(b"", if_generation_match=0)
        blob.delete()
    except storage.gcs_call_errors() as err:
        return Finding(ERROR, f"{key} {uri} is not writable: {storage.error_line(err)}")
    return None


def check_location(
    bucket: str, keys: list[str], region: str, user_project: Optional[str]
) -> Optional[Finding]:
    """A warning when bucket `bucket` (used for `keys`) is not in `region`'s location."""
    try:
        handle = storage.gcs_bucket(bucket, user_project)
        handle.reload()
    except storage.gcs_call_errors() as err:
        return Finding(WARNING, f"cannot read the location of gs://{bucket} "
                       f"({', '.join(keys)}): {storage.error_line(err)}; not checked against {region}")
    location = handle.location or "?"
    if location_holds(location, region, handle.data_locations or ()):
        return None
    return Finding(
        WARNING,
        f"gs://{bucket} ({', '.join(keys)}) is in {location}, the workers in {region}: every "
        "byte they read or write there crosses locations, billed per GB as data transfer, "
        f"and slower; use a bucket in {region} (or run the job in the bucket's region)")


def run_preflight(
    *,
    roots: Mapping[str, str],
    output_dir: str,
    temp_location: Optional[str],
    region: Optional[str],
    image_root: Optional[str] = None,
    views: Iterable[str] = ("AP", "PA"),
    user_project: Optional[str] = None,
    image_sample: int = IMAGE_SAMPLE,
    allow_public: bool = False,
) -> list[Finding]:
    """Every check of the module docstring; returns the findings in that order.

    Args:
        roots: schema.MIMIC_IV / MIMIC_ED / MIMIC_CXR -> the roots the job reads.
        output_dir: the job's output_dir.
        temp_location: Dataflow's temp_location (None: not checked).
        region: the job's region (None: locations not checked).
        image_root: the job's cxr_image_root (None: under the MIMIC-CXR root).
        views: the job's frontal views (for the image sample).
        user_project: the job's requester_pays_project (billed for the input checks).
        image_sample: frontal images checked under the image root.
        allow_public: a bucket open to the public is a warning, not an error.
    """
    views = tuple(views)
    image_root = image_root or roots[schema.MIMIC_CXR]
    inputs = {**{key: roots[key] for key in (schema.MIMIC_IV, schema.MIMIC_ED,
                                             schema.MIMIC_CXR)},
              "cxr_image_root": image_root}
    findings: list[Finding] = []
    physionet = physionet_buckets(inputs.values())
    if physionet:
        findings.append(Finding(
            ERROR,
            f"inputs on PhysioNet's buckets ({', '.join('gs://' + b for b in physionet)}): "
            "Dataflow workers run as a service account that PhysioNet does not grant, so "
            "their reads are refused; copy what the job reads to your bucket first with "
            "./run_dataflow.sh --stage (config key stage_to)"))
    for check in (lambda: check_tables(roots, user_project=user_project),
                  lambda: check_image_root(roots, image_root, views, user_project,
                                           image_sample)):
        try:
            check()
        except InputError as err:
            findings.append(Finding(ERROR, str(err)))
    places = {"output_dir": output_dir}
    if temp_location:
        places["temp_location"] = temp_location
    findings += [f for f in (check_writable(k, uri) for k, uri in places.items()) if f]
    used: dict[str, list[str]] = {}  # the user's own buckets
    for key, uri in {**inputs, **places}.items():
        bucket = bucket_of(uri)
        if bucket and bucket not in physionet:
            used.setdefault(bucket, []).append(key)
    findings += [f for f in (check_public_access(b, keys, allow_public)
                             for b, keys in used.items()) if f]
    if region:
        for bucket, keys in used.items():
            finding = check_location(bucket, keys, region,
                                     user_project if set(keys) & set(inputs) else None)
            if finding:
                findings.append(finding)
    return findings
