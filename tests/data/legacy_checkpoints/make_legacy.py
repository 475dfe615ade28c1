"""How the files beside this script were made: checkpoints in the formats of before issue 14 (commit d3a8d9d),
written by that commit's own code. It imports modules that no longer exist; to re-make the files, run it on a
checkout of that commit: `PYTHONPATH=<checkout> python make_legacy.py OUT_DIR WORK_DIR`.
tests/test_checkpoints.py loads them with today's code and compares with `expected.npz`.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from training.downstream_synth import make_feature_cohort
from training.export_cli import save_export_checkpoint

from training.config import Stage1Config
from training.downstream import DownstreamConfig, head_export_row, load_head, load_report_generator, run
from training.models.heads import MILHead, load_stage1_vision
from training.models.mstar import MStar
from training.models.transmil import TransMIL

D = 8  # feature width of the Stage-1 and downstream files
E = 41  # export.pt: heads and aggregator read the 41-d tissue_stats_112 features


def main(out: Path, work: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = Stage1Config(
        data={"cohort": str(work / "cohort.csv"), "features_dir": str(work)},
        model={
            "aggregator": {"dim": 16, "heads": 2, "num_landmarks": 4},
            "text": {"enabled": False},
            "gene": {"enabled": False},
        },
    )
    a = cfg.model.aggregator
    vision = TransMIL(
        n_features=D,
        dim=a.dim,
        heads=a.heads,
        dim_head=a.dim_head,
        num_landmarks=a.num_landmarks,
        pinv_iterations=a.pinv_iterations,
    )
    model = MStar(vision, None, None, cfg.model.init_temperature, cfg.model.learn_temperature)
    mean = np.linspace(-1, 1, D).astype(np.float32)
    std = np.linspace(0.5, 2, D).astype(np.float32)
    stage1 = {
        "model_state_dict": model.state_dict(),
        "config": cfg.model_dump(mode="json"),
        "label_names": ["A", "B"],
        "genes": [],
        "bin_edges": None,
        "n_features": D,
        "feature_mean": mean,
        "feature_std": std,
        "text_model_dir": None,
        "epoch": 1,
        "step": 1,
    }
    torch.save(stage1, out / "stage1.pt")

    cohort = make_feature_cohort(work / "fc", n_cases=60, n_classes=2, dim=D, patches=(8, 12), seed=3)
    common = dict(cohort=cohort, features_dir=cohort.parent / "features", epochs=1, n_boot=10, seed=0)
    run(DownstreamConfig(task="classification", aggregator="abmil", dim=16, out_dir=work / "abmil", **common))
    run(
        DownstreamConfig(
            task="survival",
            aggregator="transmil_pre",
            stage1_checkpoint=out / "stage1.pt",
            n_bins=3,
            out_dir=work / "tpre",
            **common,
        )
    )
    report = {"d_model": 16, "n_memory": 4, "heads": 2, "d_ff": 16, "decoder_layers": 1}
    report |= {"min_freq": 1, "meteor": False, "beam": 1, "max_len": 12}
    reports = cohort.parent / "reports.jsonl"
    run(DownstreamConfig(task="report", reports=reports, out_dir=work / "report", report=report, **common))
    for name in ("abmil", "tpre", "report"):
        ck = torch.load(work / name / "head.pt", weights_only=False)
        ck["meta"]["config"] = {k: (str(v) if "/" in str(v) else v) for k, v in ck["meta"]["config"].items()}
        torch.save(ck, out / f"head_{name}.pt")
    m1, _ = load_head(out / "head_abmil.pt")
    m2, _ = load_head(out / "head_tpre.pt")

    agg = TransMIL(n_features=E, dim=16, heads=2, num_landmarks=4)
    e1 = MILHead("abmil", E, 2, dim=16)
    e2 = MILHead("transmil", E, 3, task="survival", dim=16, transmil_kwargs={"heads": 2, "num_landmarks": 4})
    sizes2 = {"task": "survival", "n_outputs": 3, "dim": 16, "kind": "transmil"}
    sizes2 |= {"heads": 2, "num_landmarks": 4, "pinv_iterations": 6, "dim_head": 8}
    rows = [
        head_export_row(
            "cls",
            e1,
            {"mil": {"task": "classification", "n_outputs": 2, "dim": 16, "kind": "abmil"}, "labels": ["A", "B"]},
        ),
        head_export_row("surv", e2, {"mil": sizes2, "bin_edges": [0.0, 5.0, 10.0, 1e9]}),
    ]
    save_export_checkpoint(
        out / "export.pt",
        encoder_name="tissue_stats_112",
        aggregator=agg,
        heads=rows,
        provenance={"run_id": "legacy"},
        name="legacy",
    )

    # expected outputs on fixed bags: the new loaders must rebuild the same models
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(10, D)).astype(np.float32))
    torch.manual_seed(0)
    with torch.no_grad():
        exp = {
            "stage1_embedding": load_stage1_vision(out / "stage1.pt")(x.unsqueeze(0)).embedding.numpy(),
            "abmil_logits": m1(x).logits.numpy(),
            "tpre_risk": m2(x).risk.numpy(),
            "x": x.numpy(),
        }
        x41 = torch.from_numpy(np.random.default_rng(1).normal(size=(10, E)).astype(np.float32))
        exp["x41"] = x41.numpy()
        exp["export_agg_embedding"] = agg.eval()(x41.unsqueeze(0)).embedding.numpy()
        exp["export_surv_risk"] = e2.eval()(x41).risk.numpy()
        rg, _, _ = load_report_generator(out / "head_report.pt")
        exp["report_ids"] = np.array(rg.greedy_batch(x.unsqueeze(0), torch.zeros(1, 10, dtype=torch.bool))[0])
    np.savez(out / "expected.npz", **exp)
    for p in sorted(out.iterdir()):
        print(p.name, p.stat().st_size)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
