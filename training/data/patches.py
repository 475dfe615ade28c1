"""Stage-2 data: teacher targets per slide, and patch images streamed from the slides with their targets.

Targets (mSTAR §2, §7.7-8): for each slide, sample `n_patches` rows of its Stage-0 feature file (as Stage 1 does:
without replacement when the slide has more, all rows plus repeats when it has fewer, raster order kept), run the
frozen Stage-1 aggregator once and keep, for every sampled patch, its output token after the final LayerNorm
(`TransMILOutput.tokens`: CLS and square-padding repeats already excluded). A patch drawn more than once (small
slides) gets the mean of its tokens (config `duplicates: first` keeps the first). Written per slide as
`<targets_dir>/<slide_id>.h5` with `targets` [U, 512] + `coords` [U, 2] + the geometry attributes of the feature
file, so a training item is (the patch at `coords[i]`, `targets[i]`).

Patches are read on the fly from the slide by the tiling engine (`PatchReader`), never dumped to image files.
`BlockShuffleSampler` shuffles runs of `block` raster-adjacent patches of a slide across all slides (neighbouring
patches share decoded JPEG tiles, so a block costs little more than one patch), and gives each DDP rank its own
equal-length share of the epoch, like `DistributedSampler`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from service.atomic import atomic_path
from service.errors import InvalidParameterError
from service.slides.h5io import read_h5
from training.checkpoints import build_stage1_aggregator, read_stage1
from training.data.features import sample_indices
from training.models.mstar import Stage1Vision

log = logging.getLogger(__name__)

# all-patches mode: the most patches one teacher pass takes (TransMIL at 512-d: well under 2 GB at this size)
MAX_ALL_PATCHES = 65_536

# ---------------------------------------------------------------------------------------------- teacher


def load_teacher(checkpoint: str | os.PathLike, num_landmarks: int | None = None) -> tuple[Stage1Vision, dict]:
    """The frozen Stage-1 aggregator of a Stage-1 checkpoint, built from its recorded config, behind the feature
    standardisation Stage 1 trained it with (`feature_mean/std`, as the downstream heads apply it): without it a
    `standardize: true` run's teacher sees raw features and its tokens are not the ones Stage 1 learnt.

    `num_landmarks` overrides the recorded landmark count (landmarks are not weights, so any count loads)."""
    ckpt = read_stage1(checkpoint)
    aggregator = build_stage1_aggregator(ckpt, num_landmarks=num_landmarks)
    model = Stage1Vision(aggregator, ckpt.feature_mean, ckpt.feature_std)
    model.requires_grad_(False)
    from service.inference.bundle import sha256_file

    info = {
        "checkpoint": str(Path(checkpoint).resolve()),
        # its content, not only its path: a new Stage-1 checkpoint written to the same path kept the old targets
        "sha256": sha256_file(checkpoint),
        "n_features": int(aggregator.config["n_features"]),
        "dim": int(aggregator.config["dim"]),
        "heads": int(aggregator.config["heads"]),
        "dim_head": int(aggregator.config["dim_head"]),
        "num_landmarks": int(aggregator.config["num_landmarks"]),
        "standardized": ckpt.feature_mean is not None,
    }
    return model.eval(), info


def _slide_seed(seed: int, slide_id: str) -> list[int]:
    return [seed, int.from_bytes(hashlib.sha256(slide_id.encode()).digest()[:4], "little")]


@torch.inference_mode()
def slide_targets(
    teacher: torch.nn.Module,
    features: np.ndarray,
    n_patches: int | None,
    rng: np.random.Generator,
    duplicates: str = "mean",
    device: str | torch.device = "cpu",
    max_all_patches: int = MAX_ALL_PATCHES,
) -> tuple[np.ndarray, np.ndarray]:
    """`(rows [U] of the feature file, targets [U, dim])` for one slide's sampled patches.

    `n_patches=None` is the official all-patches mode: the teacher re-embeds every patch of the slide in one pass
    (full slide context), except that a slide with more than `max_all_patches` rows is sampled down to that many,
    which bounds the teacher's memory (Nyström attention is linear in the patch count)."""
    n = features.shape[0]
    if n_patches is None:
        idx = np.arange(n) if n <= max_all_patches else sample_indices(n, max_all_patches, rng)
    else:
        idx = sample_indices(n, n_patches, rng)
    out = teacher(torch.from_numpy(features[idx]).to(device)[None])
    tokens = out.tokens[0].float().cpu().numpy()  # [n_patches, dim], input order
    rows, inverse = np.unique(idx, return_inverse=True)
    if duplicates == "mean":
        sums = np.zeros((len(rows), tokens.shape[1]), np.float64)
        np.add.at(sums, inverse, tokens)
        targets = (sums / np.bincount(inverse, minlength=len(rows))[:, None]).astype(np.float32)
    elif duplicates == "first":
        first = np.full(len(rows), -1)
        for pos in range(len(idx) - 1, -1, -1):
            first[inverse[pos]] = pos
        targets = tokens[first]
    else:
        raise InvalidParameterError(f"duplicates must be 'mean' or 'first', got {duplicates!r}")
    return rows, targets


def write_targets(path: Path, coords: np.ndarray, rows: np.ndarray, targets: np.ndarray, attrs: dict[str, Any]) -> None:
    """Atomic write of one slide's target file (temporary sibling, then rename)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("coords", data=np.asarray(coords, np.int64))
        f.create_dataset("targets", data=np.asarray(targets, np.float32))
        f.create_dataset("feature_rows", data=np.asarray(rows, np.int64))
        for k, v in attrs.items():
            ds.attrs[k] = v
            f.attrs[k] = v


def _cached_count(path: Path, recipe: dict[str, Any]) -> int | None:
    """Targets in a cached file made by this very recipe (teacher, standardisation, sampling), else None: a cache
    written before a teacher fix or by another checkpoint must not be reused silently."""
    with h5py.File(path, "r") as f:
        for key, want in recipe.items():
            got = f.attrs.get(key)
            got = got.decode() if isinstance(got, bytes) else got
            if got is None or (got != want if isinstance(want, str) else int(got) != want):
                return None
        return int(f["targets"].shape[0])


def compute_targets(
    slide_ids: list[str],
    features_dir: str | os.PathLike,
    teacher_checkpoint: str | os.PathLike,
    targets_dir: str | os.PathLike,
    *,
    n_patches: int | None = 4096,
    seed: int = 0,
    duplicates: str = "mean",
    num_landmarks: int | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    max_all_patches: int = MAX_ALL_PATCHES,
) -> dict[str, int]:
    """Cache the teacher targets of every slide that has a feature file; returns {slide_id: targets kept}.
    `n_patches=None`: every patch of each slide (up to `max_all_patches`), see `slide_targets`."""
    teacher, info = load_teacher(teacher_checkpoint, num_landmarks)
    teacher.to(device)
    recipe = {
        "teacher": json.dumps(info, sort_keys=True),
        "n_patches": -1 if n_patches is None else int(n_patches),  # -1: all patches
        "max_all_patches": int(max_all_patches),
        "seed": int(seed),
        "duplicates": duplicates,
    }
    out_dir = Path(targets_dir)
    counts: dict[str, int] = {}
    for sid in slide_ids:
        dst = out_dir / f"{sid}.h5"
        if dst.is_file() and not overwrite:
            cached = _cached_count(dst, recipe)
            if cached is not None:
                counts[sid] = cached
                continue
            log.info("stage2: %s was cached with another teacher or sampling recipe; recomputing", dst)
        src = Path(features_dir) / f"{sid}.h5"
        if not src.is_file():
            continue
        coords, feats, attrs = read_h5(src)
        if feats is None:
            raise InvalidParameterError(f"{src}: no 'features' dataset")
        if feats.shape[1] != info["n_features"]:
            raise InvalidParameterError(
                f"{src}: {feats.shape[1]}-d features, but the Stage-1 aggregator takes {info['n_features']}-d"
            )
        rng = np.random.default_rng(_slide_seed(seed, sid))
        if n_patches is None and len(feats) > max_all_patches:
            log.warning("stage2: %s has %d patches; the teacher sees a sample of %d", sid, len(feats), max_all_patches)
        rows, targets = slide_targets(teacher, feats, n_patches, rng, duplicates, device, max_all_patches)
        keep = {k: v for k, v in attrs.items() if not isinstance(v, np.ndarray) or v.size < 64}
        keep.update(recipe, features_file=str(src.resolve()))
        write_targets(dst, coords[rows], rows, targets, keep)
        counts[sid] = len(rows)
    return counts


# ---------------------------------------------------------------------------------------------- dataset


@dataclass
class SlideTargets:
    """One slide's cached targets plus what is needed to reopen the slide and rebuild its grid."""

    slide_id: str
    slide_path: Path
    coords: np.ndarray  # int64 [U, 2]
    targets: np.ndarray  # float32 [U, dim]
    attrs: dict[str, Any]
    mpp_override: float | None = None

    def grid(self) -> Any:
        """A `TileGrid` over exactly these coordinates with the geometry the features were extracted with."""
        from service.slides.grid import TileGrid

        a = self.attrs
        ds = a.get("downsample", 1.0)
        return TileGrid(
            coords=self.coords,
            patch_size=int(a["patch_size"]),
            patch_size_level0=int(a["patch_size_level0"]),
            step_level0=int(a.get("step_size_level0", a["patch_size_level0"])),
            target_mpp=float(a["target_mpp"]),
            effective_mpp=float(a["effective_mpp"]),
            read_level=int(a["read_level"]),
            read_size=int(a["read_size"]),
            level_downsample=float(np.asarray(ds).reshape(-1)[0]),
            level0_width=int(a["level0_width"]),
            level0_height=int(a["level0_height"]),
            mpp_source=str(a.get("mpp_source", "")),
            mpp=float(a.get("mpp", a["target_mpp"])),
            overlap=int(a.get("overlap", 0)),
            tissue_threshold=float(a.get("tissue_threshold", 0.0)),
            tissue_fraction=np.ones(len(self.coords), np.float32),
        )


def load_slide_targets(
    slides: list[tuple[str, Path]], targets_dir: str | os.PathLike, mpp_override: float | None = None
) -> list[SlideTargets]:
    """`SlideTargets` for each `(slide_id, slide_path)` with a target file (others are skipped)."""
    out = []
    for sid, spath in slides:
        p = Path(targets_dir) / f"{sid}.h5"
        if not p.is_file():
            continue
        with h5py.File(p, "r") as f:
            coords = np.asarray(f["coords"][...], np.int64)
            targets = np.asarray(f["targets"][...], np.float32)
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f["coords"].attrs.items()}
        out.append(SlideTargets(sid, Path(spath), coords, targets, attrs, mpp_override))
    return out


def augment(
    patch: np.ndarray, rng: np.random.Generator, hflip: bool = True, vflip: bool = True, rot90: bool = True
) -> np.ndarray:
    """Flips and quarter turns only: they keep the tissue (and so the teacher's target) of the tile unchanged."""
    if rot90:
        patch = np.rot90(patch, int(rng.integers(4)))
    if hflip and rng.random() < 0.5:
        patch = patch[:, ::-1]
    if vflip and rng.random() < 0.5:
        patch = patch[::-1]
    return np.ascontiguousarray(patch)


class PatchTargetDataset(Dataset):
    """Item `i` = (uint8 patch `[S, S, 3]`, float target `[dim]`), read from the slide when asked.

    Each process (DataLoader worker) keeps up to `open_slides` slides open (LRU), with a small decoded-tile cache
    each; augmentation draws come from `(seed, epoch, i)`, so they do not depend on the worker layout.
    """

    def __init__(
        self,
        slides: list[SlideTargets],
        *,
        seed: int = 0,
        augment_flips: bool = True,
        augment_rot90: bool = True,
        open_slides: int = 8,
        cache_mb: int = 16,
    ) -> None:
        if not slides:
            raise InvalidParameterError("no slide has cached Stage-2 targets")
        self.slides = slides
        self.offsets = np.cumsum([0] + [len(s.coords) for s in slides])
        self.seed, self.epoch = seed, 0
        self.flips, self.rot90 = augment_flips, augment_rot90
        self.open_slides, self.cache_mb = max(1, open_slides), cache_mb
        self._cache: OrderedDict[int, tuple[Any, Any]] = OrderedDict()
        self._pid = os.getpid()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def target_dim(self) -> int:
        return int(self.slides[0].targets.shape[1])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return k, i - int(self.offsets[k])

    def _patch_reader(self, k: int) -> Any:
        if self._pid != os.getpid():  # a forked worker must not share the parent's open files
            self._cache, self._pid = OrderedDict(), os.getpid()
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k][1]
        from service.slides.mpp import override_mpp
        from service.slides.open import open_slide
        from service.slides.stream import PatchReader

        s = self.slides[k]
        reader = open_slide(s.slide_path)
        if reader.mpp is None and s.mpp_override is not None:
            reader.mpp = override_mpp(s.mpp_override)
        patches = PatchReader(reader, s.grid(), cache_mb=self.cache_mb)
        self._cache[k] = (reader, patches)
        while len(self._cache) > self.open_slides:
            _, (old_reader, old_patches) = self._cache.popitem(last=False)
            old_patches.close()
            old_reader.close()
        return patches

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, r = self.locate(int(i))
        patch = self._patch_reader(k).read_batch(r, r + 1)[0]
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        patch = augment(patch, rng, self.flips, self.flips, self.rot90)
        return torch.from_numpy(patch), torch.from_numpy(self.slides[k].targets[r])

    def close(self) -> None:
        for reader, patches in self._cache.values():
            patches.close()
            reader.close()
        self._cache.clear()


class BlockShuffleSampler(Sampler[int]):
    """Runs of `block` consecutive rows of a slide, shuffled across all slides per epoch; rank `r` of `world`
    takes the r-th contiguous equal share (the remainder is dropped so every rank runs the same step count)."""

    def __init__(self, offsets: np.ndarray, block: int = 8, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.offsets = np.asarray(offsets)
        self.block, self.seed, self.rank, self.world = max(1, block), seed, rank, max(1, world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _blocks(self) -> list[np.ndarray]:
        blocks = []
        for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True):
            blocks.extend(np.arange(s, min(s + self.block, b)) for s in range(int(a), int(b), self.block))
        return blocks

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch, 11])
        blocks = self._blocks()
        flat = np.concatenate([blocks[j] for j in rng.permutation(len(blocks))]) if blocks else np.zeros(0, int)
        share = len(flat) // self.world
        return iter(int(i) for i in flat[self.rank * share : (self.rank + 1) * share])

    def __len__(self) -> int:
        return int(self.offsets[-1]) // self.world


def collate_patches(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([p for p, _ in items]), torch.stack([t for _, t in items])
