"""Synthetic multimodal cohort with known ground truth: slides, reports, RNA-Seq, survival.

Every case has latent variables (cancer type, risk, immune, stroma, grade). They drive:
- survival: Weibull proportional hazards, h(t) = λ k t^(k-1) exp(β·risk), independent uniform censoring;
- slides (`synth_tissue`): tissue composition and arrangement per type, tumour/necrosis share and nuclear
  grade with risk, lymphocytes with immune; colour varies per slide independently of everything else;
- RNA (`synth_rna`): lineage markers per type, proliferation/hypoxia with risk, immune/stromal/adipose
  programs;
- reports (`synth_text`): histologic type (sometimes omitted), grade, pT/pN, LVI, margins, necrosis/TIL
  comments. Each modality sees the risk through its own noise, so each alone predicts survival somewhat and
  together better.

Determinism: every random draw comes from `numpy.random.default_rng([seed, case, purpose, ...])`, so results
do not depend on worker count or order; the same seed gives byte-identical CSV/JSON and identical pixels."""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from service.errors import InvalidParameterError
from training.data.synth_rna import GENES, PROGRAMS, expression_profile, gene_baseline
from training.data.synth_text import make_report
from training.data.synth_tissue import (
    ARRANGEMENT,
    CANCER_TYPES,
    CLASSES,
    CONTEXT_ARRANGEMENT,
    CONTEXT_SETS,
    CYTOLOGIES,
    LABEL_MPP,
    SlideLayout,
    SlideRenderer,
    clone_mask,
    label_mask,
    make_layout,
    make_stain,
    proportions,
)

SPLITS = ("train", "val", "test")
# log-hazard offset per type, so type alone carries some prognosis (as in real cohorts)
TYPE_RISK_OFFSET = {"LUSC": 0.25, "COAD": -0.1, "HNSC": 0.0, "BRCA": -0.45}
WEIBULL_SHAPE = 1.3
WEIBULL_MEDIAN_MONTHS = 48.0  # at risk 0
HAZARD_BETA = 1.3
CENSOR_RANGE_MONTHS = (12.0, 120.0)
# label-mask palette (index -> RGB) so truth PNGs are viewable; pixel values stay class indices
PALETTE = {
    0: (255, 255, 255),
    1: (200, 30, 30),
    2: (240, 170, 200),
    3: (40, 40, 160),
    4: (120, 90, 20),
    5: (250, 230, 120),
    6: (170, 230, 250),
}


@dataclass(frozen=True)
class SynthConfig:
    """What `mstar synth` generates. `size` is the level-0 width in pixels (height 70-100 % of it)."""

    cases: int = 40
    seed: int = 0
    size: int = 2048
    cancer_types: tuple[str, ...] = CANCER_TYPES
    missing_report: float = 0.1
    missing_rna: float = 0.1
    two_slide_fraction: float = 0.15
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    workers: int = 2
    render_slides: bool = True
    band_rows: int = 0  # level-0 rows rendered at once; 0 = about 2 Mpx per band (bounded memory)
    # context cohort: every type draws tumour cells from one pool of cytologies under one tissue rule, and the
    # type is only in which cytologies co-occur on the slide (`synth_tissue.CONTEXT_SETS`); off by default
    context: bool = False

    def validate(self) -> None:
        if not 1 <= self.cases <= 100_000:
            raise InvalidParameterError(f"--cases must be 1..100000, got {self.cases}")
        if not 512 <= self.size <= 200_000:
            raise InvalidParameterError(f"--size must be 512..200000 px, got {self.size}")
        for name in ("missing_report", "missing_rna", "two_slide_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise InvalidParameterError(f"{name.replace('_', '-')} must be a fraction in [0, 1], got {v}")
        bad = [t for t in self.cancer_types if t not in CANCER_TYPES]
        if bad or not self.cancer_types or len(set(self.cancer_types)) != len(self.cancer_types):
            raise InvalidParameterError(
                f"cancer types must be distinct names from {', '.join(CANCER_TYPES)}; "
                f"got {', '.join(self.cancer_types)}"
            )
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1) > 1e-6 or min(self.split_fractions) < 0:
            raise InvalidParameterError("split fractions must be three non-negative numbers summing to 1")
        if self.workers < 1:
            raise InvalidParameterError("--workers must be >= 1")


@dataclass
class SlideSpec:
    slide_id: str
    case_id: str
    index: tuple[int, int]  # (case index, slide index) -> RNG keys
    mpp: float
    fmt: str
    width: int
    height: int
    path: str  # relative to the cohort root
    label_path: str
    proportions: dict[str, float] = field(default_factory=dict)
    stain: dict = field(default_factory=dict)
    nuclear_grade: float = 0.0


@dataclass
class CaseSpec:
    case_id: str
    index: int
    cancer_type: str
    risk: float
    immune: float
    stroma: float
    grade: float
    survival_months: float
    event: int
    has_report: bool
    has_rna: bool
    split: str = ""
    slides: list[SlideSpec] = field(default_factory=list)


def _r(x: float, n: int = 6) -> float:
    return round(float(x), n)


def weibull_survival(rng: np.random.Generator, risk: float) -> tuple[float, int]:
    """(observed months, event) under the documented Weibull PH model with uniform censoring."""
    lam = math.log(2) / WEIBULL_MEDIAN_MONTHS**WEIBULL_SHAPE
    t = (-math.log(1.0 - rng.random()) / (lam * math.exp(HAZARD_BETA * risk))) ** (1 / WEIBULL_SHAPE)
    c = rng.uniform(*CENSOR_RANGE_MONTHS)
    return (round(t, 2), 1) if t <= c else (round(c, 2), 0)


def _layout_for(cfg: SynthConfig, case: CaseSpec, s: SlideSpec) -> tuple[SlideLayout, np.random.Generator]:
    rng = np.random.default_rng([cfg.seed, case.index, 3, s.index[1]])
    shape = (max(8, round(s.height * s.mpp / LABEL_MPP)), max(8, round(s.width * s.mpp / LABEL_MPP)))
    z = case.risk - TYPE_RISK_OFFSET[case.cancer_type]  # within-type risk: what the tissue shows
    clones = context_clones(cfg, case) if cfg.context else ()
    lay = make_layout(rng, shape, case.cancer_type, z, case.immune, case.stroma, case.grade, clones)
    return lay, rng


def context_clones(cfg: SynthConfig, case: CaseSpec) -> tuple[int, ...]:
    """The tumour cytologies of a context-cohort case (one choice per case, so its slides agree).

    A type's cases take its sets in turn (by their rank among the type's cases in the shuffled assignment), not
    by coin flips, so every cytology's share within a type stays 1/4 in a finite cohort too: an unbalanced draw
    would let a single patch's cytology hint at the type."""
    sets = CONTEXT_SETS[case.cancer_type]
    rank = int(_type_order(cfg.seed, cfg.cases)[case.index]) // len(cfg.cancer_types)
    return sets[rank % len(sets)]


@functools.lru_cache(maxsize=8)
def _type_order(seed: int, cases: int) -> np.ndarray:
    """The shuffled order that `plan_cohort` deals the types by (case i gets type order[i] % n_types)."""
    return np.random.default_rng([seed, 10]).permutation(cases)


def plan_cohort(cfg: SynthConfig) -> list[CaseSpec]:
    """Latent variables, survival, modality availability and slide geometry for every case (no pixels)."""
    cfg.validate()
    types = list(cfg.cancer_types)
    order = _type_order(cfg.seed, cfg.cases)
    cases: list[CaseSpec] = []
    for i in range(cfg.cases):
        rng = np.random.default_rng([cfg.seed, i, 0])
        ct = types[int(order[i]) % len(types)]  # balanced types, shuffled
        risk = TYPE_RISK_OFFSET[ct] + rng.normal()
        immune, stroma = rng.normal(), rng.normal()
        grade = float(np.clip(2.0 + 0.45 * (risk - TYPE_RISK_OFFSET[ct]) + rng.normal(0, 0.6), 1.0, 3.0))
        months, event = weibull_survival(rng, risk)
        n_slides = 2 if rng.random() < cfg.two_slide_fraction else 1
        has_report = bool(rng.random() >= cfg.missing_report)
        has_rna = bool(rng.random() >= cfg.missing_rna)
        case_id = f"SYN-{i + 1:04d}"
        case = CaseSpec(case_id, i, ct, _r(risk), _r(immune), _r(stroma), _r(grade), months, event, has_report, has_rna)
        for j in range(n_slides):
            mpp = 0.5 if rng.random() < 0.6 else 0.25
            fmt = "svs" if rng.random() < 0.5 else "tiff"
            w = cfg.size
            h = int(round(cfg.size * rng.uniform(0.7, 1.0) / 16) * 16)
            sid = f"{case_id}-S{j + 1}"
            case.slides.append(
                SlideSpec(sid, case_id, (i, j), mpp, fmt, w, h, f"slides/{sid}.{fmt}", f"truth/{sid}_labels.png")
            )
        cases.append(case)
    _assign_splits(cfg, cases)
    return cases


def _assign_splits(cfg: SynthConfig, cases: list[CaseSpec]) -> None:
    """Patient-level, stratified by cancer type (all slides of a case share its split)."""
    rng = np.random.default_rng([cfg.seed, 11])
    for ct in cfg.cancer_types:
        idx = [c.index for c in cases if c.cancer_type == ct]
        perm = [idx[k] for k in rng.permutation(len(idx))]
        n = len(perm)
        # at least one test (and val) patient per type as soon as there are enough to keep one for training
        n_test = max(round(n * cfg.split_fractions[2]), int(n >= 2 and cfg.split_fractions[2] > 0))
        n_val = max(round(n * cfg.split_fractions[1]), int(n >= 3 and cfg.split_fractions[1] > 0))
        for k, ci in enumerate(perm):
            cases[ci].split = "test" if k < n_test else ("val" if k < n_test + n_val else "train")


def _render_job(args: tuple) -> list[tuple[int, int]]:
    """Worker: render one slide from its seeds (pickled layout + stain) and write it."""
    import cv2

    from training.data.synth_wsi import write_slide

    cv2.setNumThreads(1)
    out, spec, layout, stain, key, band_rows = args
    r = SlideRenderer(layout, stain, spec.width, spec.height, spec.mpp, key)
    if band_rows <= 0:
        band_rows = int(np.clip(2_097_152 // spec.width, 256, 2048))
    return write_slide(Path(out) / spec.path, r, spec.fmt, band_rows=band_rows, label_text=spec.slide_id)


def _save_labels(path: Path, labels: np.ndarray) -> None:
    img = Image.fromarray(labels, mode="P")
    pal = [0] * 768
    for k, rgb in PALETTE.items():
        pal[3 * k : 3 * k + 3] = rgb
    img.putpalette(pal)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=False)


def load_labels(path: str | os.PathLike) -> np.ndarray:
    """Class-index mask (see `CLASSES`) from a truth PNG."""
    return np.asarray(Image.open(path))


def _cindex(times: Sequence[float], events: Sequence[int], risk: Sequence[float]) -> float | None:
    """Harrell's C of the true risk; None when no pair is comparable (tiny cohorts)."""
    from sksurv.exceptions import NoComparablePairException
    from sksurv.metrics import concordance_index_censored

    try:
        c = concordance_index_censored(np.asarray(events, bool), np.asarray(times, float), np.asarray(risk, float))
    except (NoComparablePairException, ValueError):  # < 2 cases or no comparable pair
        return None
    return float(c[0])


def generate_cohort(out_dir: str | os.PathLike, cfg: SynthConfig) -> dict:
    """Write the whole cohort under `out_dir`; returns the summary (also written to cohort_summary.json)."""
    cfg.validate()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / "cohort.csv").exists():
        raise InvalidParameterError(f"{out} exists, is not empty and holds no synthetic cohort; refusing to write")
    for sub in ("slides", "truth", "rna"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)
    cases = plan_cohort(cfg)

    jobs = []
    for case in cases:
        for s in case.slides:
            lay, rng = _layout_for(cfg, case, s)
            lab = label_mask(lay)
            s.proportions = proportions(lab)
            _save_labels(out / s.label_path, lab)
            if cfg.context:
                _save_labels(out / _clone_path(s), clone_mask(lay))
            stain = make_stain(rng)
            key = (cfg.seed, case.index, 4, s.index[1])
            SlideRenderer(lay, stain, s.width, s.height, s.mpp, key)  # calibrates stain.gain
            jobs.append((str(out), s, lay, stain, key, cfg.band_rows))
            s.stain = stain.to_json()
            s.nuclear_grade = lay.grade

    levels: list[list[tuple[int, int]]] = []
    if cfg.render_slides:
        if cfg.workers > 1 and len(jobs) > 1:
            import multiprocessing as mp

            # spawn, not fork: a forked child of a process that already runs threads (torch, onnxruntime, a
            # server) can deadlock on a lock held by another thread at fork time.
            with ProcessPoolExecutor(min(cfg.workers, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
                levels = list(ex.map(_render_job, jobs))
        else:
            levels = [_render_job(j) for j in jobs]

    # RNA
    baseline = gene_baseline(cfg.seed)
    rna_cols: list[str] = []
    rna_vals: list[np.ndarray] = []
    programs: dict[str, dict] = {}
    (out / "rna").mkdir(exist_ok=True)
    for case in cases:
        props = _case_props(case)
        rng = np.random.default_rng([cfg.seed, case.index, 1])
        expr, prog = expression_profile(
            rng,
            baseline,
            case.cancer_type,
            {
                "risk": case.risk - TYPE_RISK_OFFSET[case.cancer_type],
                "immune": case.immune,
                "stroma": case.stroma,
                "tumour": props["tumour"],
                "fat": props["fat"],
                "necrosis": props["necrosis"],
            },
        )
        programs[case.case_id] = prog
        if case.has_rna:
            rna_cols.append(case.case_id)
            rna_vals.append(expr)
            with open(out / "rna" / f"{case.case_id}.csv", "w", newline="") as fh:
                fh.write("Gene,Index,Value\n")
                fh.writelines(f"{g},{k},{v:.5f}\n" for k, (g, v) in enumerate(zip(GENES, expr, strict=True)))
    with open(out / "rna" / "expression.csv", "w", newline="") as fh:
        fh.write(",".join(["gene", *rna_cols]) + "\n")
        mat = np.stack(rna_vals, 1) if rna_vals else np.zeros((len(GENES), 0))
        for g, row in zip(GENES, mat, strict=True):
            fh.write(",".join([g, *(f"{v:.5f}" for v in row)]) + "\n")

    # reports
    facts: dict[str, dict] = {}
    with open(out / "reports.jsonl", "w") as fh:
        for case in cases:
            rng = np.random.default_rng([cfg.seed, case.index, 2])
            text, f = make_report(
                rng,
                case.cancer_type,
                case.risk - TYPE_RISK_OFFSET[case.cancer_type],
                case.immune,
                _case_props(case)["necrosis"],
                case.grade,
            )
            facts[case.case_id] = asdict(f)
            if case.has_report:
                fh.write(json.dumps({"case_id": case.case_id, "text": text}) + "\n")

    # cohort.csv (one row per slide)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "case_id",
            "slide_id",
            "slide_path",
            "cancer_type",
            "split",
            "survival_months",
            "event",
            "has_report",
            "has_rna",
            "mpp",
            "format",
        ]
    )
    for case in cases:
        for s in case.slides:
            w.writerow(
                [
                    case.case_id,
                    s.slide_id,
                    s.path if cfg.render_slides else "",
                    case.cancer_type,
                    case.split,
                    f"{case.survival_months:.2f}",
                    case.event,
                    int(case.has_report),
                    int(case.has_rna),
                    s.mpp,
                    s.fmt,
                ]
            )
    (out / "cohort.csv").write_text(buf.getvalue())

    truth = {
        "version": 1,
        "seed": cfg.seed,
        "label_classes": {str(i): c for i, c in enumerate(CLASSES)},
        "label_mpp": LABEL_MPP,
        "label_note": "truth/<slide_id>_labels.png: palette PNG whose pixel values are class indices at "
        "label_mpp µm/px, covering the whole level-0 image (scale = label_mpp / slide mpp).",
        "arrangement": {ct: CONTEXT_ARRANGEMENT if cfg.context else ARRANGEMENT[ct] for ct in cfg.cancer_types},
        "hazard_model": {
            "form": "Weibull proportional hazards h(t)=lambda*k*t^(k-1)*exp(beta*risk)",
            "k": WEIBULL_SHAPE,
            "median_months_at_risk0": WEIBULL_MEDIAN_MONTHS,
            "beta": HAZARD_BETA,
            "censoring": f"independent Uniform{CENSOR_RANGE_MONTHS} months",
            "type_risk_offset": TYPE_RISK_OFFSET,
        },
        "rna_programs": {k: list(v) for k, v in PROGRAMS.items()},
        "cases": {},
        "slides": {},
    }
    if cfg.context:
        truth["context"] = {
            "cytologies": list(CYTOLOGIES),
            "sets_per_type": {ct: [list(g) for g in CONTEXT_SETS[ct]] for ct in cfg.cancer_types},
            "clone_note": "truth/<slide_id>_clones.png: pixel 0 off tumour, else 1 + the tumour cytology index, "
            "at label_mpp µm/px",
        }
    for case in cases:
        truth["cases"][case.case_id] = {
            "cancer_type": case.cancer_type,
            "risk": case.risk,
            "immune": case.immune,
            "stroma": case.stroma,
            "grade": case.grade,
            "survival_months": case.survival_months,
            "event": case.event,
            "split": case.split,
            "has_report": case.has_report,
            "has_rna": case.has_rna,
            "slides": [s.slide_id for s in case.slides],
            "tissue_proportions": _case_props(case),
            "rna_programs": programs[case.case_id],
            "report_facts": facts[case.case_id],
        }
        if cfg.context:
            truth["cases"][case.case_id]["cytologies"] = list(context_clones(cfg, case))
        for k, s in enumerate(case.slides):
            truth["slides"][s.slide_id] = {
                "case_id": case.case_id,
                "path": s.path if cfg.render_slides else None,
                "format": s.fmt,
                "mpp": s.mpp,
                "width": s.width,
                "height": s.height,
                "label_mask": s.label_path,
                "tissue_proportions": s.proportions,
                "nuclear_grade": _r(s.nuclear_grade),
                "stain": s.stain,
                "levels": [list(x) for x in levels[_flat_index(cases, case, k)]] if levels else None,
            }
            if cfg.context:
                truth["slides"][s.slide_id]["clone_mask"] = _clone_path(s)
    (out / "truth.json").write_text(json.dumps(truth, indent=1, sort_keys=False) + "\n")

    times = [c.survival_months for c in cases]
    events = [c.event for c in cases]
    ci = _cindex(times, events, [c.risk for c in cases])
    summary = {
        "cases": len(cases),
        "slides": sum(len(c.slides) for c in cases),
        "seed": cfg.seed,
        "size": cfg.size,
        "cancer_types": {ct: sum(c.cancer_type == ct for c in cases) for ct in cfg.cancer_types},
        "splits": {sp: sum(c.split == sp for c in cases) for sp in SPLITS},
        "event_rate": _r(float(np.mean(events)), 4),
        "median_followup_months": _r(float(np.median(times)), 2),
        "with_report": sum(c.has_report for c in cases),
        "with_rna": sum(c.has_rna for c in cases),
        "patients_with_two_slides": sum(len(c.slides) > 1 for c in cases),
        "mpp_counts": {str(m): sum(s.mpp == m for c in cases for s in c.slides) for m in (0.25, 0.5)},
        "genes": len(GENES),
        "c_index_true_risk": None if ci is None else _r(ci, 4),
        "slides_rendered": cfg.render_slides,
    }
    if cfg.context:
        summary["context"] = True
    (out / "cohort_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _clone_path(s: SlideSpec) -> str:
    return s.label_path.replace("_labels.png", "_clones.png")


def _case_props(case: CaseSpec) -> dict[str, float]:
    """Tissue shares of a case: the mean over its slides."""
    keys = case.slides[0].proportions.keys()
    return {k: _r(float(np.mean([s.proportions[k] for s in case.slides]))) for k in keys}


def _flat_index(cases: list[CaseSpec], case: CaseSpec, k: int) -> int:
    n = 0
    for c in cases:
        if c is case:
            return n + k
        n += len(c.slides)
    raise KeyError(case.case_id)


def make_montage(
    cohort_dir: str | os.PathLike, out_png: str | os.PathLike, per_type: int = 4, thumb: int = 320
) -> Path:
    """A grid of slide thumbnails (rows = cancer types), read back through OpenSlide as a user would."""
    import cv2
    import openslide

    root = Path(cohort_dir)
    if not (root / "cohort.csv").is_file():
        raise InvalidParameterError(f"{root} holds no synthetic cohort (cohort.csv missing)")
    rows: dict[str, list[tuple[str, str]]] = {}
    with open(root / "cohort.csv") as fh:
        for row in csv.DictReader(fh):
            if row["slide_path"]:
                rows.setdefault(row["cancer_type"], []).append((row["slide_id"], row["slide_path"]))
    if not rows:
        raise InvalidParameterError(f"no rendered slides listed in {root / 'cohort.csv'}")
    pad, head, left = 8, 24, 70
    grid = np.full((len(rows) * (thumb + head + pad) + pad, left + per_type * (thumb + pad), 3), 255, np.uint8)
    for r, (ct, items) in enumerate(sorted(rows.items())):
        y = pad + r * (thumb + head + pad)
        cv2.putText(grid, ct, (6, y + head + thumb // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 2)
        for k, (sid, rel) in enumerate(items[:per_type]):
            with openslide.OpenSlide(str(root / rel)) as sl:
                im = np.asarray(sl.get_thumbnail((thumb, thumb)).convert("RGB"))
                mpp = sl.properties.get("openslide.mpp-x", "?")
            x = left + k * (thumb + pad)
            grid[y + head : y + head + im.shape[0], x : x + im.shape[1]] = im
            cv2.putText(
                grid,
                f"{sid} {float(mpp):.2f}um/px",
                (x, y + head - 6),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.42,
                (40, 40, 40),
                1,
            )
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)  # small PNG
    return out
