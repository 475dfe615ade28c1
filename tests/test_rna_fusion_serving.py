"""The bundle's optional slide + RNA head: manifest field (old manifests still load), and the service-side
`RnaFusion` (ONNX Runtime, RNA read from request bytes) against the PyTorch head."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from service.errors import InvalidParameterError
from service.inference.bundle import Bundle, BundleError, parse_manifest
from service.inference.fusion import RnaFusion
from training.checkpoints import load_fusion_head
from training.downstream.cli import run
from training.downstream.config import DownstreamConfig
from training.downstream.synth import make_feature_cohort
from training.export.fusion import export_fusion

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion_serving")
    make_feature_cohort(root, n_cases=50, n_classes=2, dim=16, patches=(8, 16), seed=9, rna_genes=20)
    cfg = {
        "task": "survival",
        "cohort": str(root / "cohort.csv"),
        "features_dir": str(root / "features"),
        "rna": str(root / "rna.csv"),
        "modalities": ["wsi", "rna"],
        "dim": 16,
        "n_boot": 10,
        "epochs": 1,
    }
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    run(DownstreamConfig.from_yaml(root / "c.yaml", out_dir=str(root / "run")))
    bundle_dir = root / "bundle"
    res = export_fusion(root / "run" / "head.pt", bundle_dir)
    raw = json.loads((ROOT / "model_repository" / "bundle.json").read_text())
    raw["rna_fusion"] = res["manifest_entry"]
    return root, Bundle(root=bundle_dir, manifest=parse_manifest(raw)), raw


def test_old_manifest_loads_and_bad_fusion_entries_are_refused(exported) -> None:
    _, _, raw = exported
    old = copy.deepcopy(raw)
    del old["rna_fusion"]
    assert parse_manifest(old).rna_fusion is None
    for change in ({"impute_mean": [0.0]}, {"file": "../x.onnx"}, {"bin_edges": None}):
        bad = copy.deepcopy(raw)
        bad["rna_fusion"].update(change)
        with pytest.raises(BundleError, match=r"rna_fusion|bin edges"):
            parse_manifest(bad)


def test_served_fused_risk_matches_pytorch_and_reports_mapping(exported) -> None:
    root, bundle, _ = exported
    fusion = RnaFusion(bundle)
    head, meta = load_fusion_head(root / "run" / "head.pt")
    feats = np.random.default_rng(0).normal(size=(12, 16)).astype(np.float32)
    genes = meta["genes"]
    values = np.asarray(meta["rna_mean"], np.float32) + 0.7
    # one gene left out (imputed), one unknown gene added
    text = "Gene,Value\n" + "".join(f"{g},{v:.6f}\n" for g, v in zip(genes[1:], values[1:], strict=True))
    text += "NOTAMODELGENE,3.0\n"
    got = fusion.predict(feats, text.encode())
    assert (got["genes_missing"], got["genes_unknown"], got["genes_used"]) == (1, 1, len(genes) - 1)
    x = values.copy()
    x[0] = meta["rna_mean"][0]
    x = (x - np.asarray(meta["rna_mean"], np.float32)) / np.asarray(meta["rna_std"], np.float32)
    with torch.no_grad():
        ref = head(torch.from_numpy(feats), torch.from_numpy(x).unsqueeze(0))
    assert got["risk"] == pytest.approx(float(ref.risk[0]), abs=1e-4)
    np.testing.assert_allclose(got["contributions"]["rna"], ref.contributions["rna"][0].numpy(), atol=1e-4)
    assert "0.7" not in json.dumps(got)  # counts only, no profile values echoed


def test_bad_profiles_are_refused_with_a_reason(exported) -> None:
    _, bundle, _ = exported
    fusion = RnaFusion(bundle)
    feats = np.zeros((4, 16), np.float32)
    with pytest.raises(InvalidParameterError, match="not a number"):
        fusion.predict(feats, b"Gene,Value\nGENE0001,abc\n")
    with pytest.raises(InvalidParameterError, match="covers 0 of the model's 20 genes"):
        fusion.predict(feats, b"Gene,Value\nTP53,1.0\n")


def test_pipeline_result_and_options_never_store_the_profile(exported) -> None:
    from service.pipeline import AnalysisOptions, multimodal_result

    _, bundle, _ = exported
    genes = json.loads((bundle.root / "rna_genes.json").read_text())["genes"]
    profile = ("Gene,Value\n" + "".join(f"{g},1.2345\n" for g in genes)).encode()
    res = multimodal_result(bundle, np.ones((5, 16), np.float32), profile, {"survival": {"risk": -2.5}})
    assert res["slide_only_risk"] == {"survival": -2.5} and isinstance(res["risk"], float)
    opts = AnalysisOptions(rna=profile)
    stored = json.dumps(opts.to_json())
    assert "1.2345" not in stored and "rna_profile" in stored and "1.2345" not in repr(opts)


def test_analyze_cli_refuses_bad_rna_before_reading_the_slide(exported, tmp_path) -> None:
    import click

    from service.cli.analyze import _read_rna

    _, bundle, raw = exported
    bad = tmp_path / "bad.csv"
    bad.write_text("Gene,Value\nGENE0001,oops\n")
    with pytest.raises(InvalidParameterError, match="not a number"):
        _read_rna(bad, bundle)
    no_fusion = Bundle(root=bundle.root, manifest=parse_manifest({k: v for k, v in raw.items() if k != "rna_fusion"}))
    with pytest.raises(click.UsageError, match="no slide \\+ RNA head"):
        _read_rna(bad, no_fusion)


def test_export_fusion_command_adds_the_head_to_a_bundle(tmp_path) -> None:
    """`mstar export-fusion RUN --bundle DIR`: the manifest gains `rna_fusion` and still loads with checksums.
    The demo bundle's own model files are not built here (minutes on CPU), so the copy's model entries point at
    stand-in files with their checksums; only the fusion graph is run."""
    from click.testing import CliRunner
    from inference_fixtures import stand_in_vocab

    from service.inference.bundle import load_bundle, sha256_file
    from training.export.cli import export_fusion_cmd

    raw = json.loads((ROOT / "model_repository" / "bundle.json").read_text())
    bundle_dir = tmp_path / "bundle"
    for m in raw["models"]:
        f = bundle_dir / m["file"]
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(m["name"].encode())
        m["sha256"] = sha256_file(f)
    for key in ("tokenizer", "report_vocab"):
        if raw.get(key) and raw[key].get("path"):
            f = bundle_dir / raw[key]["path"]
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("{}")
            if key == "report_vocab":  # one word per decoder logit, as load_bundle checks
                f.write_text(stand_in_vocab(raw))
            if raw[key].get("sha256"):
                raw[key]["sha256"] = sha256_file(f)
    (bundle_dir / "bundle.json").write_text(json.dumps(raw))
    load_bundle(bundle_dir)
    dim = raw["embed_dim"]
    root = tmp_path / "cohort"
    make_feature_cohort(root, n_cases=40, n_classes=2, dim=dim, patches=(6, 10), seed=4, rna_genes=20)
    cfg = {"task": "survival", "cohort": str(root / "cohort.csv"), "features_dir": str(root / "features")}
    cfg.update({"rna": str(root / "rna.csv"), "modalities": ["wsi", "rna"], "dim": 8, "n_boot": 5, "epochs": 1})
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    run(DownstreamConfig.from_yaml(root / "c.yaml", out_dir=str(root / "run")))
    res = CliRunner().invoke(export_fusion_cmd, [str(root / "run"), "--bundle", str(bundle_dir)])
    assert res.exit_code == 0, res.output
    bundle = load_bundle(bundle_dir)
    assert bundle.manifest.rna_fusion is not None and bundle.manifest.rna_fusion.file == "rna_fusion/fusion.onnx"
    got = RnaFusion(bundle).predict(
        np.zeros((3, dim), np.float32), b"Gene,Value\n" + b"".join(f"GENE{g:04d},2.0\n".encode() for g in range(20))
    )
    assert np.isfinite(got["risk"])


@pytest.mark.parametrize("fusion", ["kronecker", "mcat"])
def test_contributions_only_where_the_design_splits_them(exported, tmp_path, fusion) -> None:
    """Kronecker fusion has no per-modality split: its served result says so (None) instead of the graph's
    placeholder zeros, which read as "neither modality mattered"; MCAT's additive output has them."""
    root, _, raw = exported
    cfg = yaml.safe_load((root / "c.yaml").read_text()) | {"fusion": fusion}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run(DownstreamConfig.from_yaml(tmp_path / "c.yaml", out_dir=str(tmp_path / "run")))
    res = export_fusion(tmp_path / "run" / "head.pt", tmp_path / "bundle")
    manifest = parse_manifest({**raw, "rna_fusion": res["manifest_entry"]})
    genes = manifest.rna_fusion.genes
    profile = ("Gene,Value\n" + "".join(f"{g},{0.3 * i}\n" for i, g in enumerate(genes))).encode()
    got = RnaFusion(Bundle(root=tmp_path / "bundle", manifest=manifest)).predict(
        np.random.default_rng(1).normal(size=(9, 16)).astype(np.float32), profile
    )
    assert got["fusion"] == fusion and np.isfinite(got["risk"])
    if fusion == "kronecker":
        assert got["contributions"] is None
    else:
        assert set(got["contributions"]) == {"wsi", "rna"}
        assert max(abs(v) for v in got["contributions"]["rna"]) > 0


def test_a_classification_head_is_set_beside_the_slide_only_classifiers(exported, tmp_path) -> None:
    """A fused classification is compared with the slide-only classifiers, not with survival risks."""
    from service.pipeline import multimodal_result

    root, _, raw = exported
    cfg = yaml.safe_load((root / "c.yaml").read_text()) | {"task": "classification"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run(DownstreamConfig.from_yaml(tmp_path / "c.yaml", out_dir=str(tmp_path / "run")))
    res = export_fusion(tmp_path / "run" / "head.pt", tmp_path / "bundle")
    bundle = Bundle(root=tmp_path / "bundle", manifest=parse_manifest({**raw, "rna_fusion": res["manifest_entry"]}))
    profile = ("Gene,Value\n" + "".join(f"{g},1.0\n" for g in bundle.manifest.rna_fusion.genes)).encode()
    slide_cls = {"subtype": {"label": "a", "probabilities": {"a": 0.7, "b": 0.3}}}
    out = multimodal_result(
        bundle, np.ones((5, 16), np.float32), profile, {"os": {"risk": -2.5}}, slide_classification=slide_cls
    )
    assert set(out["probabilities"]) == set(bundle.manifest.rna_fusion.labels)
    assert sum(out["probabilities"].values()) == pytest.approx(1.0)
    assert out["slide_only_probabilities"] == {"subtype": {"a": 0.7, "b": 0.3}} and "slide_only_risk" not in out
