"""What the CLAM module installs on first use (Resources/requirements.txt) and which of it is missing."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from packaging.requirements import Requirement

REQUIREMENTS_FILE = Path(__file__).resolve().parent / "Resources" / "requirements.txt"
TORCH_REQUIREMENT = ">=2.1"


def load_requirements(path: str | os.PathLike = REQUIREMENTS_FILE) -> list[Requirement]:
    """The requirements of a requirements.txt file (comments, blank lines and pip options skipped)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip() and not line.strip().startswith(("#", "-"))]


def is_satisfied(requirement: Requirement) -> bool:
    """Whether an installed distribution meets the requirement (name and version range)."""
    try:
        version = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return requirement.specifier.contains(version, prereleases=True)


def missing_requirements(requirements: list[Requirement] | None = None) -> list[str]:
    """The requirements (as pip strings) that are not installed or too old."""
    return [str(r) for r in (requirements if requirements is not None else load_requirements())
            if not is_satisfied(r)]


def manual_install_hint(missing: list[str]) -> str:
    """What to type in Slicer's Python console to install the packages by hand."""
    return f"slicer.util.pip_install({' '.join(missing)!r})"
