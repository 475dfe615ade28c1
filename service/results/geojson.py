"""Results as QuPath GeoJSON: tissue (and the region of interest) as annotations, patches as detections.

QuPath's conventions (what "File > Import objects" reads and "Export objects as GeoJSON" writes): a
FeatureCollection of Features whose `properties` carry `objectType` ("annotation" | "detection"), an optional
`classification` {name, color [r, g, b]} and `measurements` {name: number}. Coordinates are level-0 pixels with
y pointing down, which is QuPath's image space, so the file lands on the slide as it is.

Per patch: the aggregator's attention (raw and min-max normalised per slide, the heatmap's scale), each MIL
head's attention and, for classifier heads, the probability of every class for that patch alone; the patch is
classified as its most probable class for the first classifier head, so QuPath colours patches by class.
The tissue annotation carries the slide-level results (class probabilities, survival risk) as measurements.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from service.results.patch_scores import PatchScores

TISSUE_CLASS = {"name": "Tissue", "color": [80, 160, 80]}
REGION_CLASS = {"name": "Region*", "color": [0, 120, 255]}
# Okabe-Ito: distinguishable for colour-blind readers, and on H&E.
PALETTE = [
    [230, 159, 0],
    [86, 180, 233],
    [0, 158, 115],
    [240, 228, 66],
    [0, 114, 178],
    [213, 94, 0],
    [204, 121, 167],
    [0, 0, 0],
]


def _feature(
    geometry: dict,
    object_type: str,
    *,
    name: str | None = None,
    classification: dict | None = None,
    measurements: dict[str, float] | None = None,
    locked: bool = False,
) -> dict:
    props: dict[str, Any] = {"objectType": object_type}
    if name:
        props["name"] = name
    if classification:
        props["classification"] = classification
    if locked:
        props["isLocked"] = True
    if measurements:
        props["measurements"] = measurements
    return {"type": "Feature", "id": str(uuid.uuid4()), "geometry": geometry, "properties": props}


def _square(x: int, y: int, s: int) -> dict:
    return {"type": "Polygon", "coordinates": [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]}


def _num(v: float) -> float:
    return round(float(v), 6)


def slide_measurements(result: dict) -> dict[str, float]:
    """Slide-level numbers from result.json, named as on the patches (`head: label`)."""
    out: dict[str, float] = {}
    for head, v in (result.get("classification") or {}).items():
        for label, p in (v.get("probabilities") or {}).items():
            out[f"{head}: {label} probability (slide)"] = _num(p)
    for head, v in (result.get("survival") or {}).items():
        risk = v.get("risk")
        if isinstance(risk, int | float):
            out[f"{head}: risk (slide)"] = _num(risk)
    return out


def label_colors(labels: list[str]) -> dict[str, list[int]]:
    return {lab: PALETTE[i % len(PALETTE)] for i, lab in enumerate(labels)}


def build(result: dict, scores: PatchScores) -> dict:
    """The FeatureCollection for one analysis."""
    features = []
    if scores.region is not None:
        features.append(
            _feature(scores.region, "annotation", name="Region of interest", classification=REGION_CLASS, locked=True)
        )
    if scores.tissue is not None:
        features.append(
            _feature(
                scores.tissue,
                "annotation",
                name="Tissue",
                classification=TISSUE_CLASS,
                measurements=slide_measurements(result),
                locked=True,
            )
        )
    n = len(scores.coords)
    cols: dict[str, np.ndarray] = {}
    if scores.attention is not None and n:
        att = scores.attention.astype(np.float64)
        lo, hi = float(att.min()), float(att.max())
        cols["Attention"] = att
        cols["Attention (normalised)"] = (att - lo) / (hi - lo) if hi > lo else np.zeros_like(att)
    classifier = next((h for h in scores.heads if h.probabilities is not None), None)
    for h in scores.heads:
        if h.attention is not None:
            cols[f"{h.name}: attention"] = h.attention
        if h.probabilities is not None:
            for j, lab in enumerate(h.labels or []):
                cols[f"{h.name}: {lab} probability"] = h.probabilities[:, j]
    colors = label_colors(classifier.labels or []) if classifier is not None else {}
    size = scores.patch_size_level0
    names = list(cols)
    table = np.stack([cols[k] for k in names], axis=1) if names else np.zeros((n, 0))
    for i, (x, y) in enumerate(scores.coords.tolist()):
        cls = None
        if classifier is not None:
            lab = classifier.labels[int(np.argmax(classifier.probabilities[i]))]
            cls = {"name": lab, "color": colors[lab]}
        meas = {k: _num(v) for k, v in zip(names, table[i], strict=True)}
        meas["Patch index"] = i
        features.append(_feature(_square(x, y, size), "detection", classification=cls, measurements=meas))
    slide = result.get("slide") or {}
    return {
        "type": "FeatureCollection",
        "features": features,
        # A foreign member (RFC 7946 §6.1): QuPath ignores it; scripts can check units and provenance.
        "mstar": {
            "units": "level-0 pixels, y down",
            "slide_sha256": slide.get("sha256"),
            "level0": (result.get("tiling") or {}).get("level0"),
            "patch_size_level0": size,
            "step_level0": int(scores.attrs.get("step_size_level0", size)),
            "bundle": (result.get("bundle") or {}).get("name"),
            "notice": result.get("notice"),
        },
    }


def build_from_dir(result_dir: str | Path) -> dict:
    """The FeatureCollection of a result folder (`result.json` + `patch_scores.h5`)."""
    from service.errors import MstarError
    from service.results import patch_scores

    d = Path(result_dir)
    if not (d / "result.json").is_file():
        raise MstarError(f"{d}: no result.json (not a result folder)")
    if not (d / patch_scores.FILE_NAME).is_file():
        raise MstarError(f"{d}: no {patch_scores.FILE_NAME}; re-run the analysis with a model bundle")
    return build(json.loads((d / "result.json").read_text()), patch_scores.read(d / patch_scores.FILE_NAME))


def write(path: str | Path, collection: dict) -> Path:
    from service.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(collection, separators=(",", ":")))
    return path
