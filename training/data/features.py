"""Stage-1 data: the patients of a cohort (`training.cohort`) with their patch features, report and RNA profile.

The cohort table, reports and feature files are read by `training.cohort`; RNA-Seq is `rna/expression.csv`, genes x
cases (first column the gene name, one column per case id).

Each item is one *patient* (decision §7.3): a random slide of the patient per epoch, its patches sampled without
replacement to `n_patches` when it has more, and all patches plus a with-replacement draw when it has fewer
(decision §7.5, keeps the PPEG grid exact). Sampled indices are kept in file order, which is the raster order of
the tiling grid. All randomness is seeded by (seed, epoch, index), so DDP ranks, data-loader workers and resumed
runs see the same data.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from service.errors import InvalidParameterError
from training.cohort import Case
from training.models.gene_encoder import bin_expression, quantile_edges

log = logging.getLogger(__name__)


def load_expression(path: str | Path | None) -> tuple[list[str], dict[str, np.ndarray]]:
    """(genes, {case_id: values [genes]}) from a genes x cases CSV; empty when the file is absent."""
    if path is None or not Path(path).is_file():
        return [], {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header or len(header) < 2:
            raise InvalidParameterError(f"{path}: expected a header 'gene,<case_id>,...' (genes x cases CSV)")
        genes, rows, seen = [], [], set()
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise InvalidParameterError(
                    f"{path}, line {line}: {len(row)} fields where the header has {len(header)}"
                )
            if row[0] in seen:
                raise InvalidParameterError(f"{path}, line {line}: gene {row[0]!r} listed twice")
            seen.add(row[0])
            genes.append(row[0])
            rows.append([_expression_value(v, path, line, header[j + 1]) for j, v in enumerate(row[1:])])
    mat = np.asarray(rows, dtype=np.float32).reshape(len(rows), len(header) - 1)  # genes x cases
    return genes, {case: mat[:, j] for j, case in enumerate(header[1:])}


def _expression_value(text: str, path: str | Path, line: int, case: str) -> float:
    """One expression value; an empty cell is missing (NaN), anything else must be a finite number."""
    if text.strip() == "":
        return np.nan
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not np.isfinite(value):
        raise InvalidParameterError(
            f"{path}, line {line}, case {case}: expression value {text[:40]!r} is not a finite number "
            "(leave the cell empty for a missing value)"
        )
    return value


def sample_indices(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` row indices of an `n`-row bag, in increasing order (see module docstring)."""
    if n <= 0:
        raise InvalidParameterError("a feature file has no patches")
    if n >= count:
        idx = rng.choice(n, size=count, replace=False)
    else:
        idx = np.concatenate([np.arange(n), rng.choice(n, size=count - n, replace=True)])
    return np.sort(idx)


def read_feature_rows(path: Path, idx: np.ndarray) -> np.ndarray:
    """Rows `idx` (sorted, may repeat) of dataset `features`, reading each distinct row once."""
    try:
        with h5py.File(path, "r") as fh:
            ds = fh["features"]
            uniq, inverse = np.unique(idx, return_inverse=True)
            rows = ds[:] if len(uniq) * 2 > ds.shape[0] else ds[uniq]
            if len(uniq) * 2 > ds.shape[0]:
                rows = rows[uniq]
    except (OSError, KeyError) as err:  # a file cut short or overwritten after the run started
        raise InvalidParameterError(f"cannot read features from {path}: {err}") from err
    return np.asarray(rows, dtype=np.float32)[inverse]


def feature_count(path: Path) -> tuple[int, int]:
    """(patches, width) of a feature file, refused with the reason when it cannot be read or is no [N, D] array."""
    try:
        with h5py.File(path, "r") as fh:
            if "features" not in fh:
                raise InvalidParameterError(f"{path}: no 'features' dataset")
            shape = fh["features"].shape
    except OSError as err:  # truncated, not HDF5, unreadable
        raise InvalidParameterError(f"cannot read feature file {path}: {err}") from err
    if len(shape) != 2 or shape[0] == 0:
        raise InvalidParameterError(f"{path}: 'features' must be a non-empty [patches, width] array, not {shape}")
    return int(shape[0]), int(shape[1])


class Stage1Dataset(Dataset):
    """Patients of one split with their features, report text and binned RNA profile."""

    def __init__(
        self,
        cases: list[Case],
        features_dir: str | Path,
        reports: dict[str, str],
        genes: list[str],
        expression: dict[str, np.ndarray],
        label_names: list[str],
        n_patches: int = 4096,
        n_bins: int = 5,
        bin_edges: np.ndarray | None = None,
        seed: int = 0,
    ) -> None:
        self.features_dir = Path(features_dir)
        self.n_patches, self.n_bins, self.bin_edges, self.seed = n_patches, n_bins, bin_edges, seed
        self.label_index = {name: i for i, name in enumerate(label_names)}
        self.reports, self.genes, self.expression = reports, genes, expression
        self.epoch = 0
        self.feature_mean: np.ndarray | None = None
        self.feature_std: np.ndarray | None = None
        self.cases: list[Case] = []
        self.n_features = 0
        dropped = 0
        for case in cases:
            slides = [s for s in case.slide_ids if (self.features_dir / f"{s}.h5").is_file()]
            dropped += len(case.slide_ids) - len(slides)
            if slides:
                self.cases.append(case.with_slides(slides))
        if dropped:
            log.warning("%d slides have no feature file under %s and are skipped", dropped, self.features_dir)
        # every file checked up front (metadata only): a damaged one refused now, not hours into training
        widths = {s: feature_count(self.features_dir / f"{s}.h5")[1] for case in self.cases for s in case.slide_ids}
        if len(set(widths.values())) > 1:
            first = next(iter(widths))
            odd = next(s for s, w in widths.items() if w != widths[first])
            raise InvalidParameterError(
                f"feature files disagree on their width: {first} has {widths[first]}, {odd} has {widths[odd]} "
                "(extracted with different encoders?)"
            )
        if self.cases:
            self.n_features = next(iter(widths.values()))

    def fit_standardization(self, max_rows: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension mean/std over (up to `max_rows`) patches of this split's slides; applied to every item."""
        rows, total = [], 0
        for case in self.cases:
            for slide in case.slide_ids:
                path = self.features_dir / f"{slide}.h5"
                try:
                    with h5py.File(path, "r") as fh:
                        rows.append(np.asarray(fh["features"][:], dtype=np.float64))
                except OSError as err:
                    raise InvalidParameterError(f"cannot read features from {path}: {err}") from err
                total += len(rows[-1])
            if total >= max_rows:
                break
        allrows = np.concatenate(rows)
        self.feature_mean = allrows.mean(0).astype(np.float32)
        self.feature_std = (allrows.std(0) + 1e-6).astype(np.float32)
        return self.feature_mean, self.feature_std

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def labels(self) -> list[int]:
        return [self.label_index[c.cancer_type] for c in self.cases]

    def __len__(self) -> int:
        return len(self.cases)

    def rna_bins(self, case_id: str) -> tuple[np.ndarray, bool]:
        values = self.expression.get(case_id)
        if values is None or np.isnan(values).all():
            return np.zeros(len(self.genes), dtype=np.int64), False
        return bin_expression(np.nan_to_num(values)[None], self.n_bins, self.bin_edges)[0], True

    def __getitem__(self, i: int) -> dict:
        case = self.cases[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        slide = case.slide_ids[int(rng.integers(len(case.slide_ids)))]
        path = self.features_dir / f"{slide}.h5"
        n, d = feature_count(path)
        if d != self.n_features:
            raise InvalidParameterError(f"{path}: feature dim {d} != {self.n_features}")
        feats = read_feature_rows(path, sample_indices(n, self.n_patches, rng))
        if self.feature_mean is not None:
            feats = (feats - self.feature_mean) / self.feature_std
        bins, has_rna = self.rna_bins(case.case_id)
        text = self.reports.get(case.case_id)
        return {
            "features": torch.from_numpy(feats),
            "text": text or "",
            "has_report": text is not None,
            "rna_bins": torch.from_numpy(bins),
            "has_rna": has_rna,
            "label": self.label_index[case.cancer_type],
            "case_id": case.case_id,
        }


def collate(items: list[dict]) -> dict:
    return {
        "features": torch.stack([it["features"] for it in items]),
        "text": [it["text"] for it in items],
        "has_report": torch.tensor([it["has_report"] for it in items]),
        "rna_bins": torch.stack([it["rna_bins"] for it in items]),
        "has_rna": torch.tensor([it["has_rna"] for it in items]),
        "label": torch.tensor([it["label"] for it in items]),
        "case_id": [it["case_id"] for it in items],
    }


def cancer_type_batches(labels: list[int], batch_size: int, per_class: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch of global batches: chunks of exactly `per_class` same-type patients, shuffled and packed.

    `batch_size` must be a multiple of `per_class`, so no chunk straddles two batches: every type present in a batch
    has >= `per_class` >= 2 patients (triplet positives). A patient is one item, so it appears once per batch. Per
    epoch, a type's leftover (< `per_class`) patients and the incomplete last batch are skipped; the permutation
    changes every epoch so nobody is left out for long. Every batch has exactly `batch_size` items, so DDP ranks
    get equal shares.
    """
    if per_class < 2 or batch_size % per_class:
        raise InvalidParameterError(f"batch_size {batch_size} must be a multiple of per_class {per_class} >= 2")
    rng = np.random.default_rng([seed, epoch, 7])
    by_type: dict[int, list[int]] = defaultdict(list)
    for i, lab in enumerate(labels):
        by_type[lab].append(i)
    chunks: list[list[int]] = []
    for lab in sorted(by_type):
        items = [int(i) for i in rng.permutation(by_type[lab])]
        chunks.extend(items[j : j + per_class] for j in range(0, len(items) - per_class + 1, per_class))
    order = rng.permutation(len(chunks))
    flat = [i for c in order for i in chunks[c]]
    return [flat[j : j + batch_size] for j in range(0, len(flat) - batch_size + 1, batch_size)]


def fit_bin_edges(train_cases: list[Case], expression: dict[str, np.ndarray], n_bins: int) -> np.ndarray | None:
    """Per-gene quantile edges from the training cases' profiles (None when there is no RNA)."""
    rows = [expression[c.case_id] for c in train_cases if c.case_id in expression]
    if not rows:
        return None
    return quantile_edges(np.nan_to_num(np.stack(rows)), n_bins)
