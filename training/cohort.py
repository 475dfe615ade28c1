"""The cohort layer every stage and task reads: one `Case`, the cohort table, the reports file, the feature store.

Cohort layout (the synthetic-cohort generator and real cohorts alike):
- `cohort.csv`: `case_id, slide_id, split[, cancer_type, survival_months, event, ...]`, one row per slide; a case
  (patient) with several slides has several rows, all in one split;
- `reports.jsonl`: `{"case_id": ..., "report"|"text": ...}` per case;
- features: `<features_dir>/<slide_id>.h5` with dataset `features` [N, D] float32 and `coords` [N, 2] (the house
  CLAM/TRIDENT layout), or `h5_files/<slide_id>.h5`, `<slide_id>.pt`, `pt_files/<slide_id>.pt`.

A case's slides are concatenated when a task reads the case as one bag, as mSTAR's downstream code does with
';'-joined slide lists; Stage 1 instead draws one slide of the case per epoch (`training.data.features`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch

from service.errors import InvalidParameterError

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"validation": "val", "valid": "val"}
REQUIRED_COLUMNS = ("case_id", "slide_id", "split")


@dataclass
class Case:
    """One patient: its slides (in cohort-table order), its split, and the first row of its table entries."""

    case_id: str
    slide_ids: list[str]
    split: str
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def cancer_type(self) -> str:
        """The `cancer_type` column ('' when the table has none or the cell is empty)."""
        value = self.fields.get("cancer_type")
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return str(value)

    def with_slides(self, slide_ids: list[str]) -> Case:
        return Case(self.case_id, list(slide_ids), self.split, self.fields)


def normalize_split(name: str) -> str:
    """Lower case, with 'validation'/'valid' read as 'val'."""
    name = str(name).lower()
    return _SPLIT_ALIASES.get(name, name)


def load_cohort(
    path: str | Path,
    *,
    require: Iterable[str] = (),
    splits: Iterable[str] | None = SPLITS,
) -> list[Case]:
    """One `Case` per case_id in first-appearance order, slides grouped, split names normalised.

    `require`: columns beyond case_id/slide_id/split that the caller needs; `splits`: the split names allowed
    (None: any name, as Stage 1's configurable `train_split`/`val_split` allow)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidParameterError(f"cohort table {path} does not exist")
    try:
        df = pd.read_csv(path, dtype={"case_id": str, "slide_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InvalidParameterError(f"cohort table {path} is not a readable CSV: {err}") from err
    missing = [c for c in (*REQUIRED_COLUMNS, *require) if c not in df.columns]
    if missing:
        raise InvalidParameterError(f"cohort table {path} lacks the column(s) {missing}")
    df["split"] = df["split"].astype(str).map(normalize_split)
    if splits is not None:
        bad = set(df["split"]) - set(splits)
        if bad:
            raise InvalidParameterError(f"cohort table {path} has unknown split names {sorted(bad)}")
    cases = []
    for case_id, grp in df.groupby("case_id", sort=False):
        if grp["split"].nunique() != 1:
            raise InvalidParameterError(f"case {case_id} has slides in more than one split")
        first = grp.iloc[0].to_dict()
        cases.append(Case(str(case_id), [str(s) for s in grp["slide_id"]], str(first["split"]), first))
    return cases


def load_reports(path: str | Path | None, *, missing_ok: bool = False) -> dict[str, str]:
    """case_id -> report text from a JSON-lines file of `{case_id, report|text}`.

    `missing_ok`: an absent file means "no reports" (Stage 1's default `<cohort dir>/reports.jsonl`), instead of
    an error (a task that was given a reports file and needs it)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return {}
        raise InvalidParameterError(f"reports file {path} does not exist")
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                text = rec["report"] if "report" in rec else rec["text"]
                out[str(rec["case_id"])] = str(text)
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise InvalidParameterError(f"{path}:{n}: not a {{case_id, report|text}} JSON line ({err})") from err
    return out


def by_split(cases: list[Case]) -> dict[str, list[Case]]:
    out: dict[str, list[Case]] = {s: [] for s in SPLITS}
    for c in cases:
        out.setdefault(c.split, []).append(c)
    return out


def require_splits(splits: dict[str, list[Case]], names: tuple[str, ...] = SPLITS) -> None:
    for name in names:
        if not splits.get(name):
            raise InvalidParameterError(f"the cohort has no '{name}' cases for this task")


class FeatureStore:
    """Loads (and caches in memory) per-slide patch features; a case concatenates its slides."""

    def __init__(self, root: str | Path, cache: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InvalidParameterError(f"features directory {self.root} does not exist")
        self.cache = cache
        self._mem: dict[str, torch.Tensor] = {}

    def find(self, slide_id: str) -> Path | None:
        """The feature file of `slide_id`, or None."""
        for cand in (
            self.root / f"{slide_id}.h5",
            self.root / "h5_files" / f"{slide_id}.h5",
            self.root / f"{slide_id}.pt",
            self.root / "pt_files" / f"{slide_id}.pt",
        ):
            if cand.is_file():
                return cand
        return None

    def path(self, slide_id: str) -> Path:
        found = self.find(slide_id)
        if found is None:
            raise InvalidParameterError(f"no feature file for slide {slide_id} under {self.root}")
        return found

    def slide(self, slide_id: str) -> torch.Tensor:
        if slide_id in self._mem:
            return self._mem[slide_id]
        p = self.path(slide_id)
        try:
            if p.suffix == ".pt":
                feats = torch.load(p, map_location="cpu", weights_only=True).float()
            else:
                with h5py.File(p, "r") as f:
                    feats = torch.from_numpy(np.asarray(f["features"][:], dtype=np.float32))
        except (OSError, KeyError, RuntimeError) as err:
            raise InvalidParameterError(f"cannot read features of slide {slide_id} from {p}: {err}") from err
        if feats.ndim != 2 or feats.shape[0] == 0:
            raise InvalidParameterError(f"features of slide {slide_id} must be a non-empty [N, D] array")
        if self.cache:
            self._mem[slide_id] = feats
        return feats

    def case(self, case: Case) -> torch.Tensor:
        parts = [self.slide(s) for s in case.slide_ids]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)

    def dim(self, case: Case) -> int:
        return int(self.slide(case.slide_ids[0]).shape[1])
