"""Context cohorts (`SynthConfig.context`, `mstar synth --context`): a patch alone cannot tell the cancer type,
the slide's context can. Proved on the ground truth: a linear probe on the tissue/cytology content of single
patches stays at chance, an oracle statistic of which cytologies co-occur on the slide recovers the type."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from training.data.synth import SynthConfig, generate_cohort, load_labels
from training.data.synth_tissue import CANCER_TYPES, CONTEXT_SETS, LABEL_MPP

sklearn_lm = pytest.importorskip("sklearn.linear_model")
sklearn_ms = pytest.importorskip("sklearn.model_selection")

PATCH_UM = 56.0  # the demo's patch: 112 px at 0.5 µm/px


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def truth_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 context patients without pixels: labels and cytology masks are the ground truth of what is drawn."""
    root = tmp_path_factory.mktemp("synth_context")
    generate_cohort(root, SynthConfig(cases=200, seed=21, size=1024, render_slides=False, context=True))
    return root


def _patch_and_slide_features(root: Path) -> tuple[np.ndarray, np.ndarray, list, np.ndarray, np.ndarray, list]:
    """Per patch: tissue-class and cytology shares; per slide: which cytologies are present (> 5 % of tumour)."""
    truth = json.loads((root / "truth.json").read_text())
    p = round(PATCH_UM / LABEL_MPP)
    xp, yp, gp, xs, ys, gs = [], [], [], [], [], []
    for sl in truth["slides"].values():
        lab, clo = load_labels(root / sl["label_mask"]), load_labels(root / sl["clone_mask"])
        ct = CANCER_TYPES.index(truth["cases"][sl["case_id"]]["cancer_type"])
        for r in range(0, lab.shape[0] - p + 1, p):
            for c in range(0, lab.shape[1] - p + 1, p):
                lb, cl = lab[r : r + p, c : c + p], clo[r : r + p, c : c + p]
                if (lb > 0).mean() < 0.5:  # the demo's tissue filter keeps mostly-tissue patches
                    continue
                xp.append([(lb == k).mean() for k in range(1, 7)] + [(cl == k).mean() for k in range(1, 5)])
                yp.append(ct)
                gp.append(sl["case_id"])
        shares = np.bincount(clo.ravel(), minlength=5)[1:].astype(float)
        present = shares / max(shares.sum(), 1.0) > 0.05
        pairs = [present[a] and present[b] for a in range(4) for b in range(a + 1, 4)]
        xs.append([*present, *pairs])
        ys.append(ct)
        gs.append(sl["case_id"])
    return np.array(xp, float), np.array(yp), gp, np.array(xs, float), np.array(ys), gs


def test_patch_content_cannot_tell_the_type_but_slide_context_can(truth_only: Path) -> None:
    xp, yp, gp, xs, ys, gs = _patch_and_slide_features(truth_only)
    cv = sklearn_ms.GroupKFold(4)  # patient-grouped: no patient in both train and test folds
    probe = sklearn_lm.LogisticRegression(max_iter=2000)
    patch_bacc = sklearn_ms.cross_val_score(probe, xp, yp, groups=gp, cv=cv, scoring="balanced_accuracy").mean()
    oracle = sklearn_lm.LogisticRegression(max_iter=2000, C=10.0)
    slide_bacc = sklearn_ms.cross_val_score(oracle, xs, ys, groups=gs, cv=cv, scoring="balanced_accuracy").mean()
    assert len(yp) > 4000 and len(ys) > 200
    assert patch_bacc < 0.25 + 0.05, patch_bacc  # chance for four types
    assert slide_bacc > 0.9, slide_bacc
    # and the shares that a patch sees are the same in every type: each cytology is 1/4 of the tumour
    tum = xp[:, 6:].sum(1) > 0
    for t in range(4):
        shares = xp[tum & (yp == t), 6:].sum(0) / xp[tum & (yp == t), 6:].sum()
        assert np.all(np.abs(shares - 0.25) < 0.08), (CANCER_TYPES[t], shares)


def test_truth_records_the_cytologies_and_survival_follows_the_type(truth_only: Path) -> None:
    truth = json.loads((truth_only / "truth.json").read_text())
    assert truth["context"]["sets_per_type"]["LUSC"] == [[0, 1, 2, 3]]
    risks: dict[str, list[float]] = {ct: [] for ct in CANCER_TYPES}
    for case in truth["cases"].values():
        assert tuple(case["cytologies"]) in CONTEXT_SETS[case["cancer_type"]]
        risks[case["cancer_type"]].append(case["risk"])
    # the type's hazard offset (LUSC highest, BRCA lowest) is only visible through context in these cohorts
    assert np.mean(risks["LUSC"]) > np.mean(risks["BRCA"])
    assert json.loads((truth_only / "cohort_summary.json").read_text())["context"] is True


def test_context_cohort_is_deterministic_and_on_the_cli(tmp_path: Path) -> None:
    from service.cli import main

    a, b = tmp_path / "a", tmp_path / "b"
    generate_cohort(a, SynthConfig(cases=3, seed=4, size=512, workers=1, band_rows=256, context=True))
    res = CliRunner().invoke(
        main, ["synth", str(b), "--cases", "3", "--size", "512", "--seed", "4", "--workers", "2", "--context"]
    )
    assert res.exit_code == 0, res.output
    da, db = _digest(a), _digest(b)
    assert da == db  # slides, truth masks, cytology masks, CSV/JSON byte-identical whatever workers and bands
    assert any(k.endswith("_clones.png") for k in da) and any(k.startswith("slides/") for k in da)
    # the option is off by default and then writes no cytology masks
    c = tmp_path / "c"
    generate_cohort(c, SynthConfig(cases=2, seed=4, size=512, render_slides=False))
    assert not list((c / "truth").glob("*_clones.png"))
    assert "context" not in json.loads((c / "truth.json").read_text())


def test_rendered_tumour_draws_each_territory_cytology() -> None:
    """The pixels follow the cytology truth: level-0 tumour labels agree with `_clones.png`, and the nuclei drawn
    in a territory have that cytology's shape (COAD-like columnar, BRCA-like round)."""
    from training.data.synth import _layout_for, plan_cohort
    from training.data.synth_tissue import CHUNK, CLONE0, SlideRenderer, clone_mask, make_stain

    cfg = SynthConfig(cases=8, seed=6, size=768, render_slides=False, context=True)
    ratios: dict[int, list[float]] = {k: [] for k in range(4)}
    agree = total = 0
    for case in plan_cohort(cfg):
        s = case.slides[0]
        lay, rng = _layout_for(cfg, case, s)
        r = SlideRenderer(lay, make_stain(rng), s.width, s.height, s.mpp, (cfg.seed, case.index, 4, 0))
        truth = clone_mask(lay)
        lab0 = lay.labels(r.fields_rows(0, s.height), detail=True)
        ys, xs = np.nonzero(lab0 >= CLONE0)
        ty = np.minimum((ys * s.mpp / LABEL_MPP).astype(int), truth.shape[0] - 1)
        tx = np.minimum((xs * s.mpp / LABEL_MPP).astype(int), truth.shape[1] - 1)
        agree += int((truth[ty, tx] == lab0[ys, xs] - CLONE0 + 1).sum())
        total += len(ys)
        assert set(np.unique(lab0[lab0 >= CLONE0]) - CLONE0) <= set(lay.clones)
        for c in range(s.height // CHUNK + 1):
            for _x, _y, a, b, _ang, _inten, _ves, cls in r._nuclei(c):
                if cls >= CLONE0 and a >= 4:
                    ratios[cls - CLONE0].append(b / a)
    assert total > 10_000 and agree / total > 0.9  # bilinear level-0 vs nearest low-res at territory edges: 0.96
    coad, brca = np.mean(ratios[1]), np.mean(ratios[3])  # cytology indices follow CANCER_TYPES
    assert coad < 0.55 < 0.75 < brca, (coad, brca)
