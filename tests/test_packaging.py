"""What a wheel installs: every package of aibridge, so that a non-editable install imports."""

from __future__ import annotations

import tomllib

from tests.harness import REPO


def test_every_aibridge_package_is_listed_for_setuptools() -> None:
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "aibridge").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert listed == found
