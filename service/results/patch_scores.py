"""Per-patch scores of one analysis (`patch_scores.h5`), written next to `features.h5`.

What a viewer, a QuPath export or a re-rendered heatmap needs, so none of them re-runs a model:

- `coords` int64 [N, 2] level-0 top-left, the same rows as `features.h5` (same geometry attributes);
- `attention` float32 [N]: the slide aggregator's attention;
- `heads/<name>/attention` [N]: each MIL head's own attention over the same patches;
- `heads/<name>/probabilities` [N, C] for classifier heads (attribute `labels`): the head applied to each patch
  alone (a bag of one), i.e. what the head says about that patch; skipped above `MAX_INSTANCE_PATCHES`;
- `tissue` (string): the tissue outline as a GeoJSON MultiPolygon in level-0 pixels (clipped to the region of
  interest, when there was one) and, when there was one, `region` (string): that region.

Written atomically, like every result file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from service.atomic import atomic_path
from service.errors import ResultDamagedError

if TYPE_CHECKING:
    from service.inference.backend import BundleBackend
    from service.slides.grid import TileGrid
    from service.slides.tissue import TissueMask

FILE_NAME = "patch_scores.h5"
MAX_INSTANCE_PATCHES = 20_000  # one head call per patch: bounded so a giant slide does not double its run time


@dataclass
class HeadScores:
    name: str
    role: str
    attention: np.ndarray | None = None  # [N]
    probabilities: np.ndarray | None = None  # [N, C]
    labels: list[str] | None = None


@dataclass
class PatchScores:
    coords: np.ndarray  # int64 [N, 2]
    attrs: dict[str, Any]  # geometry (patch_size_level0, level0_width, ...)
    attention: np.ndarray | None = None
    heads: list[HeadScores] = field(default_factory=list)
    tissue: dict | None = None  # GeoJSON geometry, level-0 px
    region: dict | None = None  # GeoJSON geometry, level-0 px

    @property
    def patch_size_level0(self) -> int:
        return int(self.attrs["patch_size_level0"])


def tissue_outline(mask: TissueMask, region: Any = None, *, min_area_px: float = 4.0) -> dict | None:
    """The tissue mask's outline as a GeoJSON (Multi)Polygon in level-0 pixels, holes kept, clipped to `region`.

    Traced with OpenCV on the mask and scaled up; simplified by half a mask pixel so the outline stays faithful
    to the mask while the file stays small."""
    import cv2
    import shapely
    from shapely.geometry import Polygon, mapping

    m = np.ascontiguousarray(mask.mask.astype(np.uint8))
    if not m.any():
        return None
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return None
    sx, sy = mask.scale
    scale = np.array([1.0 / sx, 1.0 / sy])
    hier = hierarchy[0]
    polys = []
    for i, c in enumerate(contours):
        if hier[i][3] != -1 or len(c) < 3:  # holes are attached to their outer contour below
            continue
        shell = c[:, 0, :] * scale
        holes = []
        child = hier[i][2]
        while child != -1:
            if len(contours[child]) >= 3:
                holes.append(contours[child][:, 0, :] * scale)
            child = hier[child][0]
        poly = shapely.make_valid(Polygon(shell, holes))
        if poly.area * sx * sy >= min_area_px:
            polys.append(poly)
    if not polys:
        return None
    outline = shapely.union_all(polys).simplify(0.5 / min(sx, sy))
    if region is not None:
        outline = outline.intersection(region)
    if outline.is_empty:
        return None
    return mapping(outline)


def instance_probabilities(backend: BundleBackend, head: str, feats: np.ndarray) -> np.ndarray:
    """[N, C] softmax of the head run on each patch alone (a bag of one patch)."""
    from service.inference.backend import softmax

    spec = backend.bundle.model(head)
    out_name = spec.outputs[0].name
    rows = [
        np.asarray(backend.run_head(head, feats[i : i + 1])[out_name], np.float64).reshape(-1)
        for i in range(len(feats))
    ]
    return softmax(np.stack(rows)).astype(np.float32)


def compute(
    backend: BundleBackend,
    grid: TileGrid,
    feats: np.ndarray,
    aggregator_attention: np.ndarray | None,
    attrs: dict[str, Any],
) -> PatchScores:
    """Every per-patch score the bundle can give for these features (see the module docstring)."""
    from shapely.geometry import mapping

    scores = PatchScores(coords=np.asarray(grid.coords, np.int64), attrs=attrs)
    if aggregator_attention is not None:
        scores.attention = np.asarray(aggregator_attention, np.float32).reshape(-1)
    for spec in backend.bundle.heads:
        if spec.consumes != "patch_features":
            continue
        hs = HeadScores(spec.name, spec.role)
        out = backend.run_head(spec.name, feats)
        att = out.get("attention")
        if att is not None and np.asarray(att).size == len(feats):
            hs.attention = np.asarray(att, np.float32).reshape(-1)
        if spec.role == "classifier" and len(feats) <= MAX_INSTANCE_PATCHES:
            hs.probabilities = instance_probabilities(backend, spec.name, feats)
            hs.labels = list(spec.labels or [str(i) for i in range(hs.probabilities.shape[1])])
        scores.heads.append(hs)
    if grid.mask is not None:
        scores.tissue = tissue_outline(grid.mask, grid.region)
    if grid.region is not None:
        scores.region = mapping(grid.region)
    return scores


def write(path: str | Path, scores: PatchScores) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("coords", data=scores.coords)
        for k, v in scores.attrs.items():
            ds.attrs[k] = v
        if scores.attention is not None:
            f.create_dataset("attention", data=scores.attention)
        for hs in scores.heads:
            g = f.create_group(f"heads/{hs.name}")
            g.attrs["role"] = hs.role
            if hs.attention is not None:
                g.create_dataset("attention", data=hs.attention)
            if hs.probabilities is not None:
                p = g.create_dataset("probabilities", data=hs.probabilities)
                p.attrs["labels"] = json.dumps(hs.labels)
        if scores.tissue is not None:
            f.create_dataset("tissue", data=json.dumps(scores.tissue))
        if scores.region is not None:
            f.create_dataset("region", data=json.dumps(scores.region))
    return path


def read(path: str | Path) -> PatchScores:
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            coords = np.asarray(f["coords"][...], np.int64)
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f["coords"].attrs.items()}
            scores = PatchScores(coords=coords, attrs=attrs)
            if "attention" in f:
                scores.attention = np.asarray(f["attention"][...], np.float32)
            for name, g in f["heads"].items() if "heads" in f else []:
                hs = HeadScores(name, str(g.attrs.get("role", "")))
                if "attention" in g:
                    hs.attention = np.asarray(g["attention"][...], np.float32)
                if "probabilities" in g:
                    hs.probabilities = np.asarray(g["probabilities"][...], np.float32)
                    hs.labels = json.loads(g["probabilities"].attrs["labels"])
                scores.heads.append(hs)
            for key in ("tissue", "region"):
                if key in f:
                    setattr(scores, key, json.loads(f[key][()]))
    except FileNotFoundError:
        raise ResultDamagedError(f"{path.name} (the per-patch scores) is missing") from None
    except (OSError, KeyError, ValueError) as err:  # h5py's messages name the file's full (storage) path
        raise ResultDamagedError(
            f"the job's {path.name} is not a readable patch score file ({type(err).__name__})"
        ) from None
    n = len(coords)
    for arr in [scores.attention] + [a for h in scores.heads for a in (h.attention, h.probabilities)]:
        if arr is not None and arr.shape[0] != n:
            raise ResultDamagedError(f"{path.name} has {arr.shape[0]} score rows for {n} patches")
    return scores
