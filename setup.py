"""Installable package: Dataflow workers install it from the staged sdist (--setup_file)."""

from pathlib import Path

import re

import setuptools

HERE = Path(__file__).resolve().parent


def _version() -> str:
    """The one version string, `transforms.__version__` (read, not imported: no Beam here)."""
    text = (HERE / "transforms" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def _requirements() -> list[str]:
    lines = (HERE / "requirements_dataflow.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setuptools.setup(
    name="mimic-multimodal-beam",
    version=_version(),
    description="MIMIC-IV + MIMIC-IV-ED + MIMIC-CXR-JPG to multimodal torch chunks on Beam",
    python_requires=">=3.11",  # the code uses hashlib.file_digest
    # synthetic: the demo's generator (development data; a real run never imports it).
    packages=setuptools.find_packages(include=["pipelines", "pipelines.*", "transforms",
                                               "transforms.*", "synthetic", "synthetic.*"]),
    package_data={
        "transforms.text.knowledge": ["*.jsonl"],
        # The seed radiographs of the synthetic demo (NIH ChestX-ray14, see their README).
        "synthetic": ["radiographs/*.png", "radiographs/*.md", "radiographs/*.csv"],
    },
    include_package_data=True,
    install_requires=_requirements(),
)
