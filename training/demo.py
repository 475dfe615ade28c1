"""The demo bundle: the whole mSTAR chain, small enough to train on a laptop CPU in minutes.

synthetic cohort -> Stage 0 (a small timm ViT distilled from `tissue_stats_112` colour/texture statistics, standing
in for UNI) -> Stage-0 ViT features -> Stage 1 (slide aggregator + report and RNA towers) -> Stage 2 (the ViT
fine-tuned against the frozen aggregator's re-embedded tokens, with the EMA branch) -> Stage-2 ViT features ->
downstream heads (cancer-type classifier and survival on the Stage-1 aggregator, report generator) -> ONNX export
into a Triton model repository with a bundle manifest flagged `demo: true`, whose patch encoder is the Stage-2 ViT.

A real deployment imports its ViT-L with `mstar import-encoder` and trains the rest on its own cohort.
`mstar analyze` calls `build_demo_bundle` through the `mstar.bundle_builders` entry point the first time it needs
the demo bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from service.errors import InvalidParameterError
from training.export.assemble import fold_standardization

ENCODER = "vit_micro_112"  # the demo ViT (training.models.patch_encoder)
STAGE0_TEACHER = "tissue_stats_112"  # the weight-free features Stage 0 distils the ViT from
PATCH_SIZE = 112
TARGET_MPP = 0.5
STAGE1_CONFIG = Path(__file__).parent / "configs" / "stage1_demo.yaml"
STAGE0_SPLITS = ("train",)  # Stage0Config.splits: the slides whose statistics Stage 0 regresses
STAGE1_SPLITS = ("train", "val")  # Stage 1 trains on train and reports kNN accuracy on val; Stage 2 uses train


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo build; tests shrink them.

    Chosen for the first-use budget of issue 16 (the whole build <= 6 minutes on 2 idle CPU cores, the report
    generator's share ~80 s): slides of 1280 px (was 2048: the cohort and every feature pass scale with the pixels),
    14 Stage-1 epochs (was 20) and 15 head epochs (was 25). Measured per step in CPU seconds, with what each cut
    costs in the logged metrics, in docs/demo.md ("Build time")."""

    cases: int = 160
    slide_size: int = 1280
    seed: int = 7
    stage0_steps: int = 300
    stage1_epochs: int = 14
    stage2_steps: int = 200
    stage2_all_patches: bool = True  # the official Stage 2: the teacher re-embeds every patch of a slide
    head_epochs: int = 15
    report_epochs: int = 60
    # "resampler" (the learned-query model) or "histgen" (the paper's HistGen, the `report.arch` default elsewhere):
    # at demo size HistGen costs 2-3x the resampler's CPU time, about twice the report step's budget, and writes
    # near-generic reports (docs/downstream.md, "Report models: HistGen vs the resampler")
    report_arch: str = "resampler"
    threads: int = 1  # oversubscribed small CPUs spin-wait with more OpenMP threads


# The demo's report generator (the report step): sizes and training settings shared by both architectures, then each
# architecture's own. Tuned on cohort seed 101 (not a reported seed); bench/report_models.py and
# docs/downstream.md ("Report models: HistGen vs the resampler") compare the two on held-out cohort seeds.
REPORT_COMMON = {
    "d_model": 128,
    "heads": 4,
    "d_ff": 256,
    "decoder_layers": 2,
    "min_freq": 2,
    "meteor": False,
    "beam": 1,
    "lr": 1e-3,
    # HistGen's per-epoch StepLR(0.8) stops a 100-report cohort's decoder after ~15 short epochs (it then writes one
    # generic report for every slide); cosine annealing over the run fits this size
    "schedule": "cosine",
    # greedy-decode the val split (model selection) every 10th epoch instead of every epoch: with cosine annealing
    # the best val epoch is late anyway, and decoding costs more than an epoch of training on ~100 reports
    "val_every": 10,
}
REPORT_ARCHS = {
    "histgen": {"arch": "histgen", "region_size": 16, "hat_layers": 2, "n_prototypes": 64, "cmm_size": 256, "topk": 32},
    "resampler": {"arch": "resampler", "n_memory": 16},
}


def report_settings(arch: str) -> dict:
    """The demo's `report` config for `arch` ("histgen" or "resampler")."""
    if arch not in REPORT_ARCHS:
        raise InvalidParameterError(f"unknown demo report architecture {arch!r} (one of {sorted(REPORT_ARCHS)})")
    return REPORT_COMMON | REPORT_ARCHS[arch]


def build_demo_bundle(
    bundle_dir: str | Path,
    *,
    log: Callable[[str], None] = print,
    settings: DemoSettings | None = None,
    workdir: str | Path | None = None,
    keep_workdir: bool = False,
) -> Path:
    """Train every demo model on a fresh synthetic cohort and export the bundle into `bundle_dir`."""
    s = settings or DemoSettings()
    bundle_dir = Path(bundle_dir).resolve()
    # absolute: the Stage-1 config resolves relative paths against its own folder, not the caller's
    work = Path(workdir).resolve() if workdir else Path(tempfile.mkdtemp(prefix="mstar-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    t0, c0 = time.perf_counter(), cpu_seconds()

    def step(msg: str) -> None:
        # wall and CPU (this process and its finished workers): on a shared machine only the CPU figure compares
        log(f"[{time.perf_counter() - t0:6.1f} s, {cpu_seconds() - c0:6.1f} CPU s] {msg}")

    try:
        cohort = _synth(work, s, step)
        # Stage 0 reads the statistics of its training slides only, and Stage 1 the Stage-0 features of its
        # train and val slides: extracting the other splits was a third of those two passes, for nothing
        stats = _extract(work, cohort, STAGE0_TEACHER, "features_stats", step, splits=STAGE0_SPLITS)
        stage0 = _stage0(work, cohort, stats, s, step)
        features0 = _extract(work, cohort, stage0, "features_stage0", step, splits=STAGE1_SPLITS)
        stage1_ckpt = _stage1(work, cohort, features0, s, step)
        stage2 = _stage2(work, cohort, features0, stage1_ckpt, stage0, s, step)
        features = _extract(work, cohort, stage2, "features", step)
        heads, report = _downstream(work, cohort, features, stage1_ckpt, s, step)
        run_dir = _export_checkpoint(work, stage1_ckpt, stage2, heads, report, s)
        step("exporting ONNX models into the Triton model repository ...")
        from training.export.bundle import export_run

        export_run(run_dir, bundle_dir)
        step(f"demo bundle ready in {bundle_dir}")
        return bundle_dir
    finally:
        torch.set_num_threads(threads)
        if not keep_workdir and workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _synth(work: Path, s: DemoSettings, step) -> Path:
    from training.data.synth import SynthConfig, generate_cohort

    out = work / "cohort"
    if not (out / "cohort.csv").is_file():
        step(f"synthetic cohort: {s.cases} cases ...")
        generate_cohort(out, SynthConfig(cases=s.cases, seed=s.seed, size=s.slide_size, workers=2))
    return out


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have ended (the cohort's workers)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _split_manifest(cohort: Path, splits: tuple[str, ...], dest: Path) -> Path:
    """`dest`: the rows of `cohort/cohort.csv` in `splits`, slide paths made absolute (it lives elsewhere)."""
    import csv

    with (cohort / "cohort.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        rows = [r for r in reader if r.get("split") in splits]
    for r in rows:
        r["slide_path"] = str((cohort / r["slide_path"]).resolve())
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fields, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return dest


def _extract(
    work: Path, cohort: Path, encoder: str | Path, name: str, step, splits: tuple[str, ...] | None = None
) -> Path:
    """Features with `encoder` (a config name or a ViT backbone file with its sidecar) of every cohort slide, or of
    the slides in `splits` only."""
    from training.extract import ExtractOptions, extract_cohort

    out = work / name
    label = encoder if isinstance(encoder, str) else f"{Path(encoder).parent.name} ViT"
    which = f", {'/'.join(splits)} slides" if splits else ""
    step(f"patch features ({label}, {PATCH_SIZE} px at {TARGET_MPP} µm/px{which}) ...")
    source = _split_manifest(cohort, splits, work / f"{name}.cohort.csv") if splits else cohort / "cohort.csv"
    res = extract_cohort(
        source,
        encoder,
        out,
        options=ExtractOptions(target_mpp=TARGET_MPP, patch_size=PATCH_SIZE),
    )
    if res["failed"]:
        raise InvalidParameterError(f"demo feature extraction failed on {res['failed']} slide(s): see {out}")
    step(f"  {res['patches']} patches from {res['done']} slides ({res['skipped']} already done)")
    return out


def _stage0(work: Path, cohort: Path, stats: Path, s: DemoSettings, step) -> Path:
    """The Stage-0 ViT (UNI's place in the paper): distilled from the statistics features on the train split."""
    from training.stage0 import Stage0Config, distill_stage0

    step(f"Stage 0: {ENCODER} distilled from {STAGE0_TEACHER} features, {s.stage0_steps} steps ...")
    res = distill_stage0(
        cohort / "cohort.csv",
        stats,
        work / "stage0",
        Stage0Config(encoder=ENCODER, steps=s.stage0_steps, seed=s.seed),
        teacher_name=STAGE0_TEACHER,
    )
    step(f"  feature regression R² {res['r2']:.3f} (last steps)")
    return Path(res["backbone"])


def _stage1(work: Path, cohort: Path, features: Path, s: DemoSettings, step) -> Path:
    from training.config import load_config
    from training.stage1 import train_stage1

    step(f"Stage 1: aggregator + report + RNA contrastive pretraining, {s.stage1_epochs} epochs ...")
    cfg = load_config(
        STAGE1_CONFIG,
        overrides={
            "data.cohort": str(cohort / "cohort.csv"),
            "data.features_dir": str(features),
            "data.reports": None,
            "data.rna": None,
            "out_dir": str(work / "stage1"),
            "optim.epochs": s.stage1_epochs,
            "seed": s.seed,
            "num_threads": s.threads,
        },
    )
    res = train_stage1(cfg, overwrite=True)  # a rebuild replaces the previous build's run
    m = res["metrics"]
    step(f"  val kNN cancer-type accuracy {m.get('knn_acc', float('nan')):.3f}")
    return Path(res["checkpoint"])


def _stage2(work: Path, cohort: Path, features0: Path, stage1: Path, stage0: Path, s: DemoSettings, step) -> Path:
    """Stage 2: the Stage-0 ViT fine-tuned against the frozen Stage-1 aggregator's tokens (plus EMA consistency)."""
    from training.stage2 import Stage2Config, train_stage2

    mode = "every patch of each slide" if s.stage2_all_patches else "256 patches per slide"
    step(f"Stage 2: self-taught ViT against the Stage-1 aggregator ({mode}), {s.stage2_steps} steps ...")
    cfg = Stage2Config.model_validate(
        {
            "data": {
                "cohort": str(cohort / "cohort.csv"),
                "features_dir": str(features0),
                "n_patches": None if s.stage2_all_patches else 256,
                "num_workers": 1,
                "block": 32,
                "open_slides": 4,
            },
            "teacher": {"checkpoint": str(stage1)},
            "student": {"encoder": ENCODER, "init_checkpoint": str(stage0)},
            "optim": {
                "epochs": 1000,
                "batch_size": 64,
                "lr": 1e-4,
                "proj_lr": 1e-3,
                "max_steps": s.stage2_steps,
            },
            "out_dir": str(work / "stage2"),
            "seed": s.seed,
            "amp": False,
            "log_every": 1,
        }
    )
    res = train_stage2(cfg, overwrite=True)  # a rebuild replaces the previous build's run
    last = res["last"]
    (work / "stage2" / "demo_summary.json").write_text(json.dumps(last))
    step(
        f"  teacher-token cosine {last.get('target_cos', float('nan')):.3f}, "
        f"EMA consistency loss {last.get('ema', float('nan')):.4f}"
    )
    return Path(res["backbone"])


def _downstream(work: Path, cohort: Path, features: Path, stage1: Path, s: DemoSettings, step):
    from training.checkpoints import load_head
    from training.downstream.cli import run
    from training.downstream.config import DownstreamConfig

    common = {"cohort": cohort / "cohort.csv", "features_dir": features, "n_boot": 200, "seed": s.seed}
    heads = []
    for name, task, extra in (
        (
            "cancer_type",
            "classification",
            {"aggregator": "transmil_pre", "stage1_checkpoint": stage1, "epochs": s.head_epochs, "lr_pretrained": 2e-4},
        ),
        (
            "survival",
            "survival",
            # the official 2e-5 for the Stage-1 weights: at 2e-4 the survival head overfits within ~5 epochs
            # (docs/downstream.md, "Survival: initialisation and epoch selection")
            {"aggregator": "transmil_pre", "stage1_checkpoint": stage1, "epochs": s.head_epochs},
        ),
    ):
        step(f"downstream {task} head ...")
        cfg = DownstreamConfig(task=task, out_dir=work / "heads" / name, **common, **extra)
        metrics = run(cfg, overwrite=True)  # a rebuild replaces the previous build's run
        step(f"  test: {_headline(metrics)}")
        module, meta = load_head(work / "heads" / name / "head.pt")
        heads.append((name, module, meta))
    step(f"report generator ({s.report_arch}, {s.report_epochs} epochs) ...")
    rcfg = DownstreamConfig(
        task="report",
        out_dir=work / "heads" / "report",
        reports=cohort / "reports.jsonl",
        epochs=s.report_epochs,
        report=report_settings(s.report_arch),
        **common,
    )
    metrics = run(rcfg, overwrite=True)
    step(f"  test: {_headline(metrics)}")
    return heads, work / "heads" / "report" / "head.pt"


def _headline(metrics: dict) -> str:
    """One line of test metrics, whatever the task's layout (scalars, {value, ci} dicts, generated vs baseline)."""
    test = metrics.get("test") or {}
    if "generated" in test:  # report generation: model vs nearest-neighbour retrieval baseline
        g, b = test["generated"], test.get("retrieval_baseline", {})
        return (
            f"BLEU-4 {g['BLEU_4']:.3f} / ROUGE-L {g['ROUGE_L']:.3f} "
            f"(retrieval baseline {b.get('BLEU_4', float('nan')):.3f} / {b.get('ROUGE_L', float('nan')):.3f})"
        )
    parts = []
    for k in ("macro_auc", "balanced_accuracy", "c_index"):
        v = test.get(k)
        if isinstance(v, dict):
            v = v.get("value", v.get("mean"))
        if isinstance(v, int | float):
            parts.append(f"{k} {v:.3f}")
    return ", ".join(parts) or "done"


def _export_checkpoint(work: Path, stage1: Path, stage2: Path, heads, report_path: Path, s: DemoSettings) -> Path:
    from training.checkpoints import load_report_generator, load_stage1
    from training.export.contract import head_row, save_export_checkpoint

    enc = load_stage1(stage1, with_text=True)
    vision = enc.vision
    aggregator = vision.aggregator
    if vision.feature_mean is not None:
        aggregator = fold_standardization(aggregator, vision.feature_mean, vision.feature_std)
    head_rows = [head_row(name, module, meta) for name, module, meta in heads]
    report, report_kwargs, itos = load_report_generator(report_path)
    run_dir = work / "run"
    save_export_checkpoint(
        run_dir / "export.pt",
        encoder_name=ENCODER,
        encoder_state=torch.load(stage2, map_location="cpu", weights_only=True),
        target_mpp=TARGET_MPP,
        aggregator=aggregator,
        heads=head_rows,
        text={"module": enc.text, "proj": enc.proj_text} if enc.text is not None else None,
        report={"module": report, "kwargs": report_kwargs, "itos": itos},
        provenance={
            "run_id": f"demo-seed{s.seed}",
            "notes": f"synthetic cohort, {s.cases} cases",
            "config_hash": _config_hash(s),
            "encoder": _lineage(work, s),
        },
        demo=True,
        name="mstar-demo",
    )
    return run_dir


def _config_hash(s: DemoSettings) -> str:
    """Stable across processes (Python's `hash` of a tuple is, but spelled out so it never depends on it)."""
    import hashlib
    from dataclasses import asdict

    return hashlib.sha256(json.dumps(asdict(s), sort_keys=True).encode()).hexdigest()[:8]


def _lineage(work: Path, s: DemoSettings) -> dict:
    """The manifest's `provenance.encoder`: the ViT config and the stages that made its weights."""
    from training.models.patch_encoder import PATCH_ENCODERS

    stage0 = json.loads((work / "stage0" / "stage0.json").read_text())
    last = json.loads((work / "stage2" / "demo_summary.json").read_text())
    spec = PATCH_ENCODERS[ENCODER]
    return {
        "arch": ENCODER,
        "timm_model": spec.arch,
        "stages": ["stage0", "stage2"],
        "details": {
            "config": {k: v for k, v in spec.kwargs.items() if isinstance(v, int | float | str | bool)},
            "stage0": f"distilled from {STAGE0_TEACHER} features on the train split, {stage0['steps']} steps, "
            f"R² {stage0['r2']:.3f}",
            "stage2": f"self-taught against the Stage-1 aggregator's tokens (EMA weight 0.6), {last['step']} steps, "
            f"teacher-token cosine {last['target_cos']:.3f}",
        },
    }


if __name__ == "__main__":  # pragma: no cover - manual use: python -m training.demo OUT_DIR
    import sys

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    build_demo_bundle(
        sys.argv[1] if len(sys.argv) > 1 else "model_repository", keep_workdir=True, workdir="out/demo-build"
    )
