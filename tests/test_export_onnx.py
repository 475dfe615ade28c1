"""ONNX export (dynamo) + Triton repository: parity gate, configs that Triton's own schema accepts, the CLIs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from inference_fixtures import PATCH, build_tiny_bundle, real_patches

from service.cli import main
from service.errors import BundleError, InvalidParameterError
from service.inference.bundle import load_bundle
from service.inference.ort_backend import OrtBackend
from training.export.onnx import ExportParityError, check_parity, export_onnx
from training.export.wrappers import SlideAggregator


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(build_tiny_bundle(tmp_path_factory.getbasetemp()))


def _parse(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_configs_are_valid_triton_model_configs(bundle) -> None:
    for spec in bundle.manifest.models:
        mdir = bundle.root / spec.name
        gpu, cpu, py = (
            _parse(p) for p in (mdir / "config.pbtxt", mdir / "configs/cpu.pbtxt", mdir / "configs/cpu_python.pbtxt")
        )
        for cfg in (gpu, cpu, py):
            assert cfg.name == spec.name and cfg.max_batch_size == spec.max_batch_size
            assert list(cfg.version_policy.specific.versions) == [spec.version]
            assert [i.name for i in cfg.input] == [t.name for t in spec.inputs]
            assert [o.name for o in cfg.output] == [t.name for t in spec.outputs]
            assert len(cfg.model_warmup) == 1
        assert gpu.backend == cpu.backend == "onnxruntime" and py.backend == "python"
        assert gpu.instance_group[0].kind == gpu.instance_group[0].KIND_GPU
        assert py.instance_group[0].kind == py.instance_group[0].KIND_CPU
        assert (bundle.root / Path(spec.file).parent / "model.py").is_file()
        if spec.max_batch_size:  # batch-first: dynamic batching with two priority levels and a queue policy
            assert gpu.dynamic_batching.priority_levels == 2
            assert gpu.dynamic_batching.default_queue_policy.max_queue_size > 0
            # the batch axis is implicit: dims are the per-item shape
            assert [len(i.dims) for i in gpu.input] == [len(t.shape) - 1 for t in spec.inputs]
        else:
            assert not gpu.HasField("dynamic_batching")
            assert [len(i.dims) for i in gpu.input] == [len(t.shape) for t in spec.inputs]
    assert list(_parse(bundle.root / "mstar_patch_encoder/config.pbtxt").input[0].dims) == [PATCH, PATCH, 3]
    assert list(_parse(bundle.root / "mstar_aggregator/config.pbtxt").input[0].dims) == [-1, 96]
    assert {s.name for s in bundle.manifest.models if s.max_batch_size} == {"mstar_patch_encoder", "mstar_text_encoder"}
    enc = _parse(bundle.root / "mstar_patch_encoder" / "config.pbtxt")
    acc = enc.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"
    assert acc.parameters["trt_profile_max_shapes"] == f"pixels_u8:256x{PATCH}x{PATCH}x3"


def test_parity_gate_catches_a_wrong_graph(tmp_path: Path) -> None:
    from training.models.transmil import TransMIL

    torch.manual_seed(0)
    a = SlideAggregator(TransMIL(n_features=16, dim=16, heads=2, num_landmarks=4)).eval()
    b = SlideAggregator(TransMIL(n_features=16, dim=16, heads=2, num_landmarks=4)).eval()
    path = export_onnx(
        a,
        (torch.randn(30, 16),),
        tmp_path / "a.onnx",
        input_names=["features"],
        output_names=["embedding", "attention", "tokens"],
        dynamic_axes={0: {0: ("n_patches", 1, 100_000)}},
    )
    rng = np.random.default_rng(0)
    cases = [(rng.standard_normal((n, 16)).astype(np.float32),) for n in (2, 30, 31, 257)]
    ok = check_parity("a", a, path, cases, ["features"], ["embedding", "attention", "tokens"])
    assert ok.ok and ok.max_abs["embedding"] < 1e-4 and ok.min_cosine["tokens"] > 0.9999
    with pytest.raises(ExportParityError, match="disagrees"):
        check_parity("b", b, path, cases, ["features"], ["embedding", "attention", "tokens"])


def test_parity_gate_refuses_non_finite_outputs(tmp_path: Path) -> None:
    """A model whose weights hold NaN passed the gate as a perfect match (max(0.0, nan) is 0.0, and a NaN norm
    read as cosine 1) and was exported: its ONNX logits were all NaN. The gate now refuses non-finite outputs."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 3).eval()
    with torch.no_grad():
        head.weight[0, 0] = float("nan")
    path = export_onnx(
        head,
        (torch.randn(4, 16),),
        tmp_path / "nan.onnx",
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={0: {0: ("n", 1, 1000)}},
    )
    cases = [(np.random.default_rng(0).standard_normal((n, 16)).astype(np.float32),) for n in (1, 5)]
    with pytest.raises(ExportParityError, match="non-finite outputs"):
        check_parity("head", head, path, cases, ["x"], ["logits"])


def test_a_failed_export_leaves_the_previous_bundle_whole_and_a_re_export_drops_stale_models(tmp_path: Path) -> None:
    """Exporting into a folder that holds a good bundle: a failure used to delete its manifest first (the bundle
    could no longer be loaded), and a re-export with fewer models left the old model folders for Triton to load.
    Now the export is staged beside the folder and moved in only when it succeeds."""
    from inference_fixtures import EMBED

    from service.inference.bundle import load_bundle
    from training.export.bundle import build_bundle
    from training.models.patch_encoder import build_patch_encoder
    from training.models.transmil import TransMIL

    torch.manual_seed(0)
    encoder = build_patch_encoder("vit_micro_112")[0].eval()
    aggregator = TransMIL(n_features=EMBED, dim=16, heads=2, num_landmarks=8).eval()
    out = tmp_path / "bundle"
    first = build_bundle(out, encoder=encoder, patch_size=PATCH, embed_dim=EMBED, aggregator=aggregator, triton=False)
    names = sorted(m.name for m in first.bundle.manifest.models)
    manifest = (out / "bundle.json").read_bytes()
    (out / "notes.txt").write_text("not the export's")
    wrong = TransMIL(n_features=EMBED + 8, dim=16, heads=2, num_landmarks=8).eval()  # reads 8 more features
    with pytest.raises(Exception):  # noqa: B017  (whatever the exporter raises; the point is what is left)
        build_bundle(out, encoder=encoder, patch_size=PATCH, embed_dim=EMBED, aggregator=wrong, triton=False)
    assert (out / "bundle.json").read_bytes() == manifest and sorted(
        m.name for m in load_bundle(out).manifest.models
    ) == names
    assert not list(tmp_path.glob(".bundle.export-*"))
    again = build_bundle(out, encoder=encoder, patch_size=PATCH, embed_dim=EMBED, triton=False)  # no aggregator
    assert [m.name for m in again.bundle.manifest.models] == ["mstar_patch_encoder"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["bundle.json", "parity.json", "mstar_patch_encoder", "notes.txt"]
    )
    assert load_bundle(out, verify_checksums=True).manifest.models[0].name == "mstar_patch_encoder"


def test_export_refuses_foreign_run_dir(tmp_path: Path) -> None:
    from training.export.bundle import export_run

    with pytest.raises(InvalidParameterError, match=r"has no export\.pt"):
        export_run(tmp_path, tmp_path / "out")
    torch.save({"weights": 1}, tmp_path / "export.pt")
    with pytest.raises(InvalidParameterError, match="not an mstar-export/1"):
        export_run(tmp_path, tmp_path / "out")
    res = CliRunner().invoke(main, ["export", str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "invalid_parameter" in res.output


def test_import_encoder_wrapped_checkpoint(tmp_path: Path) -> None:
    """A `{'model_state_dict': {'module.…'}}` wrapper loads strictly; a mismatched one is refused."""
    from training.models.patch_encoder import Preprocessing, build_patch_encoder

    torch.manual_seed(1)
    enc, _ = build_patch_encoder("vit_micro_112")
    ckpt = tmp_path / "micro.pth"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in enc.state_dict().items()}}, ckpt)
    res = CliRunner().invoke(
        main,
        ["import-encoder", str(ckpt), "--out", str(tmp_path / "b"), "--arch", "vit_micro_112", "--target-mpp", "0.5"],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    b = load_bundle(tmp_path / "b")
    assert [m.role for m in b.manifest.models] == ["patch_encoder"] and not b.manifest.demo
    assert b.manifest.provenance.source == "mstar import-encoder"
    px = real_patches(3)
    with torch.no_grad():
        ref = enc(Preprocessing(PATCH)(torch.from_numpy(px))).numpy()
    got = OrtBackend(b, device="cpu").embed_patches(px)
    assert np.abs(got - ref).max() < 1e-3

    bad = tmp_path / "bad.pth"
    state = enc.state_dict()
    state.pop("norm.weight")
    torch.save(state, bad)
    with pytest.raises(BundleError, match="does not match"):
        from training.export.import_encoder import import_encoder

        import_encoder(bad, tmp_path / "b2", arch="vit_micro_112")
