"""Cohort tables, per-slide feature files and reports, as the downstream tasks read them.

A case (patient) may have several slides: their patch features are concatenated, as mSTAR's downstream code
does with ';'-joined slide lists. Feature files follow the house contract: HDF5 with `features` [N, D]
float32 and `coords` [N, 2], found as `<features_dir>/<slide_id>.h5` (or `h5_files/<slide_id>.h5`, or
`<slide_id>.pt`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from service.errors import InvalidParameterError

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"validation": "val", "valid": "val"}


@dataclass
class Case:
    case_id: str
    slide_ids: list[str]
    split: str
    fields: dict = field(default_factory=dict)


def load_cases(cohort_csv: str | Path) -> list[Case]:
    """One `Case` per case_id (slides grouped), split names normalised to train/val/test."""
    path = Path(cohort_csv)
    if not path.is_file():
        raise InvalidParameterError(f"cohort table {path} does not exist")
    df = pd.read_csv(path, dtype={"case_id": str, "slide_id": str})
    for col in ("case_id", "slide_id", "split"):
        if col not in df.columns:
            raise InvalidParameterError(f"cohort table {path} lacks the column '{col}'")
    df["split"] = df["split"].astype(str).str.lower().map(lambda s: _SPLIT_ALIASES.get(s, s))
    bad = set(df["split"]) - set(SPLITS)
    if bad:
        raise InvalidParameterError(f"cohort table {path} has unknown split names {sorted(bad)}")
    cases = []
    for case_id, grp in df.groupby("case_id", sort=False):
        if grp["split"].nunique() != 1:
            raise InvalidParameterError(f"case {case_id} has slides in more than one split")
        first = grp.iloc[0].to_dict()
        cases.append(Case(str(case_id), [str(s) for s in grp["slide_id"]], str(first["split"]), first))
    return cases


def load_reports(path: str | Path | None) -> dict[str, str]:
    """case_id -> report text from a JSON-lines file of {case_id, report|text}."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise InvalidParameterError(f"reports file {path} does not exist")
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out[str(rec["case_id"])] = str(rec.get("report", rec.get("text")))
            except (json.JSONDecodeError, KeyError) as err:
                raise InvalidParameterError(f"{path}:{n}: not a {{case_id, report}} JSON line ({err})") from err
    return out


class FeatureStore:
    """Loads (and caches in memory) per-slide patch features; cases concatenate their slides."""

    def __init__(self, root: str | Path, cache: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InvalidParameterError(f"features directory {self.root} does not exist")
        self.cache = cache
        self._mem: dict[str, torch.Tensor] = {}

    def path(self, slide_id: str) -> Path:
        for cand in (
            self.root / f"{slide_id}.h5",
            self.root / "h5_files" / f"{slide_id}.h5",
            self.root / f"{slide_id}.pt",
            self.root / "pt_files" / f"{slide_id}.pt",
        ):
            if cand.is_file():
                return cand
        raise InvalidParameterError(f"no feature file for slide {slide_id} under {self.root}")

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


def by_split(cases: list[Case]) -> dict[str, list[Case]]:
    out: dict[str, list[Case]] = {s: [] for s in SPLITS}
    for c in cases:
        out[c.split].append(c)
    return out


def require_splits(splits: dict[str, list[Case]], names: tuple[str, ...] = SPLITS) -> None:
    for name in names:
        if not splits[name]:
            raise InvalidParameterError(f"the cohort has no '{name}' cases for this task")
