"""Shared fixtures: paths to the real slides in ../shared/data (read-only)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SLIDES = SHARED / "slides"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"shared test data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def cmu_svs(shared_data: Path) -> Path:
    return shared_data / "slides" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def tcga_j2k_svs(shared_data: Path) -> Path:
    return shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs"


@pytest.fixture(scope="session")
def dicom_dir(shared_data: Path) -> Path:
    return shared_data / "slides" / "dicom-cmu-1-small-region"


@pytest.fixture(scope="session")
def ndpi(shared_data: Path) -> Path:
    return shared_data / "slides" / "test3-DAPI-2-387.ndpi"


@pytest.fixture(scope="session")
def bad_dicom(shared_data: Path) -> Path:
    return shared_data / "bad" / "pathml_small_dicom.dcm"


@pytest.fixture
def one_torch_thread():
    """Torch on one thread: tiny models on a shared 2-core machine only gain spin-wait contention from more."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
