"""The README's code layout names every module of the product and of the dev tools."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _layout_section() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"^## Code layout\n(.*?)^## ", text, re.S | re.M)
    assert match, "README.md has no '## Code layout' section"
    return match.group(1)


def test_readme_layout_names_every_module_and_package() -> None:
    section = _layout_section()
    missing = []
    for top in ("pipelines", "transforms", "synthetic", "examples"):
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO)
            if path.name == "__init__.py":
                name = f"{rel.parent.name}/"  # a package: listed as a folder
            elif "knowledge" in rel.parts:
                name = "knowledge/"  # the retrieval package is listed whole
            else:
                name = path.name
            if name not in section and f"{top}/" != name:
                missing.append(str(rel))
    assert missing == [], f"README's code layout does not mention {missing}"


def test_readme_layout_names_nothing_that_is_gone() -> None:
    section = _layout_section()
    named = set(re.findall(r"\b([a-z_]+\.py)\b", section))
    present = {p.name for top in ("pipelines", "transforms", "synthetic", "examples")
               for p in (REPO / top).rglob("*.py")}
    assert named - present == set()
