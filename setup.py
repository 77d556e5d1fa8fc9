"""Installable package: Dataflow workers install it from the staged sdist (--setup_file)."""

from pathlib import Path

import setuptools

HERE = Path(__file__).resolve().parent


def _requirements() -> list[str]:
    lines = (HERE / "requirements_dataflow.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setuptools.setup(
    name="mimic-multimodal-beam",
    version="0.1.0",
    description="MIMIC-IV + MIMIC-IV-ED + MIMIC-CXR-JPG to multimodal torch chunks on Beam",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["pipelines", "pipelines.*", "transforms",
                                               "transforms.*"]),
    package_data={"transforms.knowledge": ["*.jsonl"]},
    include_package_data=True,
    install_requires=_requirements(),
)
