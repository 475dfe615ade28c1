"""CLAM/TRIDENT HDF5 layout: round trip, attributes where MIL code looks for them, atomic writes."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from service.errors import InvalidParameterError, MstarError
from service.slides.grid import build_grid
from service.slides.h5io import read_h5, write_h5
from service.slides.open import open_slide


@pytest.fixture(scope="module")
def ndpi_grid(ndpi: Path):
    with open_slide(ndpi) as r:
        return build_grid(r)


def test_round_trip_with_features(tmp_path: Path, ndpi_grid) -> None:
    g = ndpi_grid
    feats = np.random.default_rng(0).standard_normal((len(g), 8)).astype(np.float32)
    out = write_h5(tmp_path / "sub" / "slide.h5", g, feats, extra_attrs={"encoder": "tiny"}, name="slide")
    coords, features, attrs = read_h5(out)
    np.testing.assert_array_equal(coords, g.coords)
    np.testing.assert_array_equal(features, feats)
    assert attrs["patch_size"] == 224 and attrs["patch_size_level0"] == g.patch_size_level0
    assert attrs["read_level"] == attrs["patch_level"] == g.read_level
    assert attrs["read_size"] == g.read_size and attrs["target_mpp"] == 0.5
    assert attrs["effective_mpp"] == pytest.approx(g.effective_mpp)
    assert (attrs["level0_width"], attrs["level0_height"]) == (3968, 4864)
    assert attrs["mpp_source"] == g.mpp_source and attrs["encoder"] == "tiny" and attrs["name"] == "slide"
    np.testing.assert_allclose(attrs["downsample"], [2.0, 2.0])
    np.testing.assert_array_equal(attrs["level_dim"], [1984, 2432])
    # CLAM/TRIDENT readers look at f["coords"].attrs and expect int64 coords.
    with h5py.File(out) as f:
        assert f["coords"].dtype == np.int64 and f["coords"].attrs["patch_level"] == g.read_level
        assert f["features"].dtype == np.float32
    assert [p.name for p in out.parent.iterdir()] == ["slide.h5"]  # no temp file left behind


def test_feature_rows_must_match(tmp_path: Path, ndpi_grid) -> None:
    with pytest.raises(InvalidParameterError, match="features"):
        write_h5(tmp_path / "x.h5", ndpi_grid, np.zeros((len(ndpi_grid) + 1, 4), np.float32))
    assert not any(tmp_path.iterdir())


def test_failed_write_keeps_previous_file(tmp_path: Path, ndpi_grid) -> None:
    out = write_h5(tmp_path / "a.h5", ndpi_grid)
    before = out.read_bytes()
    with pytest.raises(TypeError):
        write_h5(out, ndpi_grid, extra_attrs={"bad": object()})
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["a.h5"]


def test_read_refuses_non_patch_files(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("x", data=[1])
    with pytest.raises(MstarError, match="coords"):
        read_h5(tmp_path / "other.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(MstarError, match="cannot read"):
        read_h5(tmp_path / "junk.h5")
