"""Shared test set-up: CLAMLib importable from the source tree, the shared data folder located."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "CLAM"))
DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def data_dir() -> Path:
    """The shared real-CT folder, or a skip when this clone has none beside it."""
    if not DATA.is_dir():
        pytest.skip(f"real CT data not found at {DATA} (a fresh clone has no ../shared); CI and developers have it")
    return DATA
