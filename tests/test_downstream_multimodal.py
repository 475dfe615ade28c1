"""Slide + RNA-Seq downstream tasks on a small synthetic cohort: fused and unimodal runs, every RNA source,
the Stage-1 gene encoder as the RNA branch, the complete-case rule, and the errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from fit_spy import assert_one_validation_pass, spy_on_fit_mil

from service.errors import InvalidParameterError
from training.checkpoints import load_fusion_head
from training.cohort import load_cohort
from training.downstream.cli import downstream_command, run
from training.downstream.config import DownstreamConfig
from training.downstream.synth import make_feature_cohort
from training.models.fusion import FusionHead
from training.models.gene_encoder import GeneEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm")
    make_feature_cohort(root, n_cases=70, n_classes=2, dim=16, patches=(8, 16), seed=5, rna_genes=30, rna_missing=0.15)
    return root


def _cfg(cohort, tmp_path, **kw) -> DownstreamConfig:
    raw = {
        "cohort": str(cohort / "cohort.csv"),
        "features_dir": str(cohort / "features"),
        "rna": str(cohort / "rna.csv"),
        "dim": 16,
        "n_boot": 20,
        "epochs": 2,
        "lr": 1e-3,
        "task": "survival",
        "modalities": ["wsi", "rna"],
        **kw,
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "mm.yaml"
    path.write_text(yaml.safe_dump(raw))
    return DownstreamConfig.from_yaml(path, out_dir=str(tmp_path / "run"))


def test_fused_survival_is_complete_case_and_reports_contributions(cohort, tmp_path) -> None:
    m = run(_cfg(cohort, tmp_path))
    cases = load_cohort(cohort / "cohort.csv")
    without = sum(1 for c in cases if str(c.fields["has_rna"]) == "0")
    assert without > 0 and m["n_excluded_no_rna"] == without
    assert m["n_cases"] == len(cases) - without and m["n_genes"] == 30
    assert 0.0 <= m["test"]["c_index"]["ci_low"] <= m["test"]["c_index"]["ci_high"] <= 1.0
    assert "true_risk_c_index_test_cases" in m
    preds = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert set(preds["test"]["contributions"]) == {"wsi", "rna"}
    ckpt = torch.load(tmp_path / "run" / "head.pt", weights_only=False)
    assert ckpt["model"] == "fusion" and len(ckpt["meta"]["genes"]) == 30 and len(ckpt["meta"]["rna_mean"]) == 30
    # the gated-concat contributions add up to the logits exactly
    model = FusionHead(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    out = model(torch.randn(10, 16), torch.randn(1, 30))
    total = sum(out.contributions.values()) + model.bias
    torch.testing.assert_close(total, out.logits)


@pytest.mark.parametrize("task", ["classification", "survival"])
def test_fused_heads_run_validation_once_per_epoch(cohort, tmp_path, monkeypatch, task) -> None:
    """The slide + RNA heads score and take the validation loss from one pass, like the slide-only ones."""
    import training.downstream.multimodal as multimodal

    calls = spy_on_fit_mil(monkeypatch, multimodal)
    run(_cfg(cohort, tmp_path, task=task))
    assert len(calls) == 1 and calls[0]["val"] > 0
    assert_one_validation_pass(calls)


def test_mcat_co_attention_trains_and_splits_its_logits(cohort, tmp_path) -> None:
    """MCAT-style fusion: gene-group tokens attend over the patches; additive output, so exact contributions."""
    from training.models.mcat import gene_groups

    m = run(_cfg(cohort, tmp_path, fusion="mcat", mcat_groups=4))
    assert m["fusion"] == "mcat" and 0.0 <= m["test"]["c_index"]["value"] <= 1.0
    preds = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert set(preds["test"]["contributions"]) == {"wsi", "rna"}
    head, _ = load_fusion_head(tmp_path / "run" / "head.pt")
    assert head.config["n_groups"] == 4 and sorted(len(g) for g in head.mcat.groups) == [7, 7, 8, 8]
    out = head(torch.randn(9, 16), torch.randn(1, 30))
    torch.testing.assert_close(sum(out.contributions.values()) + head.bias, out.logits)
    assert out.attention.shape == (1, 9) and torch.allclose(out.attention.sum(), torch.tensor(1.0))
    assert sorted(i for g in gene_groups(30, 7) for i in g) == list(range(30))
    for bad in ({"modalities": ["rna"]}, {"rna_encoder": "stage1", "stage1_checkpoint": str(tmp_path / "x.pt")}):
        with pytest.raises(InvalidParameterError, match=r"mcat|does not exist|stage1"):
            run(_cfg(cohort, tmp_path / "bad", fusion="mcat", **bad))


def test_mcat_takes_signature_groups(cohort, tmp_path) -> None:
    """MCAT's signatures.csv layout (a column per group): the head's groups are those genes' indices in its gene
    list (any order, ids normalised), a group with no gene of the list is left out, and the head exports with
    ORT-vs-PyTorch parity."""
    from training.export.fusion import export_fusion

    genes = [line.split(",", 1)[0] for line in (cohort / "rna.csv").read_text().splitlines()[1:]]  # genes x cases
    sig = tmp_path / "signatures.csv"
    rows = [
        ("Tumor Suppressor Genes", "Oncogenes", "Cytokines"),
        (genes[5].lower(), genes[0], "NOTAGENE"),
        (genes[2], genes[29], ""),
        (genes[17], "", ""),
    ]
    sig.write_text("\n".join(",".join(r) for r in rows) + "\n")
    run(_cfg(cohort, tmp_path, fusion="mcat", mcat_signatures=str(sig), epochs=1))
    head, meta = load_fusion_head(tmp_path / "run" / "head.pt")
    pos = {g: i for i, g in enumerate(meta["genes"])}
    want = [sorted(pos[genes[i]] for i in (5, 2, 17)), sorted(pos[genes[i]] for i in (0, 29))]
    assert head.config["groups"] == want and head.mcat.groups == want
    res = export_fusion(tmp_path / "run" / "head.pt", tmp_path / "bundle")
    assert max(res["max_abs"].values()) < 1e-3
    sig.write_text("A,B\nTP53,EGFR\n")
    with pytest.raises(InvalidParameterError, match="no group names a gene of the head's gene list"):
        run(_cfg(cohort, tmp_path / "bad", fusion="mcat", mcat_signatures=str(sig), epochs=1))


def test_unimodal_baselines_see_the_same_cases(cohort, tmp_path) -> None:
    n = {}
    for mods in (["wsi"], ["rna"]):
        m = run(_cfg(cohort, tmp_path / mods[0], modalities=mods))
        n[mods[0]] = (m["n_cases"], m["test"]["c_index"]["n"])
    assert n["wsi"] == n["rna"]


def test_classification_with_kronecker_fusion(cohort, tmp_path) -> None:
    m = run(_cfg(cohort, tmp_path, task="classification", fusion="kronecker"))
    assert 0.0 <= m["test"]["macro_auc"]["value"] <= 1.0
    with pytest.raises(InvalidParameterError, match="kronecker fusion needs both"):
        run(_cfg(cohort, tmp_path / "rna_only", task="classification", fusion="kronecker", modalities=["rna"]))


def test_folder_of_per_case_profiles_equals_the_matrix(cohort, tmp_path) -> None:
    folder = tmp_path / "profiles"
    folder.mkdir()
    with open(cohort / "rna.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    (folder / "expression.csv").write_text((cohort / "rna.csv").read_text())  # a matrix beside: not a case
    for j, case in enumerate(rows[0][1:], start=1):
        (folder / f"{case}.csv").write_text("Gene,Value\n" + "".join(f"{r[0]},{r[j]}\n" for r in rows[1:]))
    a = run(_cfg(cohort, tmp_path / "a", modalities=["rna"]))
    b = run(_cfg(cohort, tmp_path / "b", modalities=["rna"], rna=str(folder)))
    assert a["n_cases"] == b["n_cases"]
    assert a["test"]["c_index"]["value"] == pytest.approx(b["test"]["c_index"]["value"])


def _stage1_checkpoint(cohort, tmp_path) -> dict:
    """A Stage-1 checkpoint with only an RNA tower (the parts `load_stage1_gene` reads), random weights."""
    with open(cohort / "rna.csv", newline="") as fh:
        genes = [r[0] for r in list(csv.reader(fh))[1:]]
    enc = GeneEncoder(len(genes), n_bins=3, dim=16, depth=1, heads=2, dim_head=8)
    proj = torch.nn.Linear(16, 24)
    state = {f"gene_encoder.{k}": v for k, v in enc.state_dict().items()}
    state.update({f"proj_gene.{k}": v for k, v in proj.state_dict().items()})
    ckpt = tmp_path / "stage1.pt"
    torch.save(
        {
            "model_state_dict": state,
            "genes": genes,
            "bin_edges": np.tile([1.0, 3.0, 5.0], (len(genes), 1)).astype(np.float32),
            "config": {"model": {"gene": {"n_bins": 3, "dim": 16, "depth": 1, "heads": 2, "dim_head": 8}}},
            "aggregator_config": {"dim": 24},
        },
        ckpt,
    )
    return {"rna_encoder": "stage1", "stage1_checkpoint": str(ckpt)}


def test_stage1_gene_encoder_as_rna_branch(cohort, tmp_path) -> None:
    m = run(_cfg(cohort, tmp_path, **_stage1_checkpoint(cohort, tmp_path)))
    assert m["rna_encoder"] == "stage1" and m["n_genes"] == 30
    head = torch.load(tmp_path / "run" / "head.pt", weights_only=False)
    assert not head["meta"]["rna_standardise"] and head["meta"]["rna_bin_edges"] is not None
    torch.save({"model_state_dict": {}, "genes": []}, tmp_path / "empty.pt")
    with pytest.raises(InvalidParameterError, match="no Stage-1 gene encoder"):
        run(_cfg(cohort, tmp_path / "empty", rna_encoder="stage1", stage1_checkpoint=str(tmp_path / "empty.pt")))


def test_cli_modalities_flag_and_errors(cohort, tmp_path) -> None:
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "task": "survival",
                "cohort": str(cohort / "cohort.csv"),
                "features_dir": str(cohort / "features"),
                "dim": 16,
                "n_boot": 10,
                "epochs": 1,
            }
        )
    )
    res = CliRunner().invoke(
        downstream_command,
        [
            "--config",
            str(cfg_path),
            "--modalities",
            "wsi,rna",
            "--rna",
            str(cohort / "rna.csv"),
            "--out",
            str(tmp_path / "cli"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "c_index" in json.loads(res.output.strip().splitlines()[-1])["test"]
    bad = tmp_path / "bad.csv"
    bad.write_text("gene,case-0000\nTP53,abc\n")
    with pytest.raises(InvalidParameterError, match="not a number"):
        run(_cfg(cohort, tmp_path, rna=str(bad)))
    with pytest.raises(InvalidParameterError, match="does not exist"):
        run(_cfg(cohort, tmp_path, rna=str(tmp_path / "nope.csv")))
    with pytest.raises(InvalidParameterError, match="no column 'os_days'"):
        run(_cfg(cohort, tmp_path, time_column="os_days"))
    with pytest.raises(InvalidParameterError, match="classification and survival only"):
        run(_cfg(cohort, tmp_path, task="retrieval", rna=None))


@pytest.mark.parametrize(
    ("fusion", "task", "stage1"),
    [
        ("gated_concat", "survival", False),
        ("kronecker", "classification", False),
        ("gated_concat", "survival", True),
        ("mcat", "survival", False),
        ("mcat", "classification", False),
    ],
)
def test_fusion_export_matches_pytorch(cohort, tmp_path, fusion, task, stage1) -> None:
    """ONNX Runtime vs PyTorch on the served graph (the parity gate of `export_fusion` raises beyond 1e-3)."""
    from training.checkpoints import load_fusion_head
    from training.export.fusion import export_fusion

    kw: dict = {"fusion": fusion, "task": task, "epochs": 1}
    if stage1:
        kw.update(_stage1_checkpoint(cohort, tmp_path))
    run(_cfg(cohort, tmp_path, **kw))
    res = export_fusion(tmp_path / "run" / "head.pt", tmp_path / "bundle")
    assert max(res["max_abs"].values()) < 1e-3
    genes = json.loads((tmp_path / "bundle" / "rna_genes.json").read_text())
    assert len(genes["genes"]) == 30 and genes["fusion"] == fusion
    head, _ = load_fusion_head(tmp_path / "run" / "head.pt")
    assert head.config["rna_branch"] is not None if stage1 else head.config["rna_branch"] is None
