"""`service.embedding.embed_grid`, the one embedding loop: grid order, progress and cancel, and byte-identical
features in `mstar analyze` (features.h5) and `mstar extract` against the plain loop each used to run."""

from __future__ import annotations

import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
from inference_fixtures import build_tiny_bundle

from service.embedding import EmbeddingCanceled, EmbedStats, embed_grid
from service.errors import MstarError
from service.slides.grid import build_grid
from service.slides.open import open_slide
from service.slides.stream import iter_batches


def _stats_encoder(patches: np.ndarray) -> np.ndarray:
    """A deterministic stand-in encoder: per-patch channel means and a corner pixel, so rows are distinct."""
    p = patches.astype(np.float32)
    return np.concatenate([p.mean(axis=(1, 2)), p[:, 0, 0, :], p[:, -1, -1, :]], axis=1)


def _plain_loop(reader, grid, encode, batch_size: int, workers: int) -> np.ndarray:
    """The loop `run_analysis` and `extract_slide` each had before `embed_grid`."""
    return np.concatenate([encode(b) for b, _ in iter_batches(reader, grid, batch_size=batch_size, workers=workers)])


@pytest.mark.parametrize("fixture", ["cmu_svs", "ndpi"])
def test_embed_grid_equals_a_plain_loop_in_grid_order(request, fixture: str) -> None:
    slide = request.getfixturevalue(fixture)
    seen: list[tuple[int, int]] = []
    stats = EmbedStats()
    with open_slide(slide) as r:
        g = build_grid(r, tissue_threshold=0.0)
        feats = embed_grid(
            r, g, _stats_encoder, 9, batch_size=7, workers=2, progress=lambda d, n: seen.append((d, n)), stats=stats
        )
        ref = _plain_loop(r, g, _stats_encoder, batch_size=7, workers=1)
    assert feats.dtype == np.float32 and np.array_equal(feats, ref)
    n = len(g)
    assert [d for d, _ in seen] == [min(n, 7 * (i + 1)) for i in range(len(seen))] and seen[-1] == (n, n)
    assert stats.patches == n and stats.batches == len(seen) and stats.total_s >= stats.encode_s > 0


def test_cancel_and_bad_encoder_stop_the_readers(cmu_svs: Path) -> None:
    before = threading.active_count()
    with open_slide(cmu_svs) as r:
        g = build_grid(r, tissue_threshold=0.0)
        calls = [0]

        def cancel() -> bool:
            calls[0] += 1
            return calls[0] > 2

        with pytest.raises(EmbeddingCanceled):
            embed_grid(r, g, _stats_encoder, 9, batch_size=4, should_cancel=cancel)
        with pytest.raises(MstarError, match="expected"):
            embed_grid(r, g, lambda p: np.zeros((len(p), 3), np.float32), 9, batch_size=4)
        with pytest.raises(ZeroDivisionError):  # an error in a progress callback propagates unchanged

            def boom(done: int, total: int) -> None:
                raise ZeroDivisionError

            embed_grid(r, g, _stats_encoder, 9, batch_size=4, progress=boom)
    assert threading.active_count() <= before  # every reader pool shut down


def test_analyze_features_h5_byte_identical_to_the_plain_loop(cmu_svs: Path, tmp_path_factory, tmp_path) -> None:
    from service.inference.bundle import load_bundle
    from service.inference.ort_backend import OrtBackend
    from service.pipeline import AnalysisOptions, run_analysis

    bundle_dir = build_tiny_bundle(tmp_path_factory.getbasetemp())
    opts = AnalysisOptions(tasks=("embedding",), batch_size=16)
    with OrtBackend(load_bundle(bundle_dir), device="cpu") as be:
        run_analysis(cmu_svs, tmp_path, opts, backend=be)
        with open_slide(cmu_svs) as r:
            g = build_grid(r, target_mpp=0.5, patch_size=112)
            ref = _plain_loop(r, g, be.embed_patches, batch_size=16, workers=2)
    with h5py.File(tmp_path / "features.h5", "r") as f:
        feats = f["features"][...]
        np.testing.assert_array_equal(f["coords"][...], g.coords)
    assert feats.tobytes() == ref.astype(np.float32).tobytes()


def test_extract_features_byte_identical_to_the_plain_loop(cmu_svs: Path, tmp_path: Path) -> None:
    from training.extract import embed_batch, extract_slide, load_encoder
    from training.stage2 import init_random_stage0

    enc = load_encoder(init_random_stage0("vit_micro_112", tmp_path / "stage0.pt", seed=0))
    with open_slide(cmu_svs) as r:
        extract_slide(r, enc, tmp_path / "x.h5", target_mpp=1.0, patch_size=112, batch_size=16, workers=2)
        g = build_grid(r, target_mpp=1.0, patch_size=112)
        ref = _plain_loop(r, g, lambda p: embed_batch(enc, p), batch_size=16, workers=2)
    with h5py.File(tmp_path / "x.h5", "r") as f:
        assert f["features"][...].tobytes() == ref.tobytes()
