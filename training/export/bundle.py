"""Assemble a servable bundle: export each model to ONNX (parity-checked), write the Triton repository and the
manifest `bundle.json`, and re-load it with the service's validator; `export_run` does it for a run's `export.pt`.

Models (each optional except the patch encoder; the manifest lists what exists):
- patch encoder: `pixels_u8` uint8 [B, S, S, 3] -> `embedding` float32 [B, D]; /255 + mean/std inside the
  graph (the wire carries uint8, 4x fewer bytes), no resize (the pipeline cuts exactly S x S patches);
- aggregator (TransMIL): `features` [N, D] -> `embedding` [E], `attention` [N], `tokens` [N, E];
- heads (`MILHead`, ABMIL/TransMIL classification or survival over patch features): `features` [N, D] ->
  `logits` [C], `attention` [N];
- text encoder (zero-shot prompts at request time): `input_ids`, `attention_mask` int64 [B, L] ->
  `text_embedding` [B, E] in the slide-embedding space (BERT CLS -> `proj_text`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.errors import BundleError
from service.inference.bundle import (
    Bundle,
    BundleManifest,
    ModelSpec,
    Preprocessing,
    Provenance,
    TensorSpec,
    TokenizerSpec,
    VocabSpec,
    ZeroShotSpec,
    load_bundle,
    sha256_file,
    write_manifest,
)
from training.export.contract import load_export_checkpoint, zeroshot_from_run
from training.export.onnx import ParityResult, check_parity, export_onnx
from training.export.triton import write_repository
from training.export.wrappers import BagHead, ReportMemory, ReportStep, SlideAggregator, TextTower, U8PatchEncoder

log = logging.getLogger(__name__)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _spec(name: str, role: str, root: Path, file: Path, inputs, outputs, **kw) -> ModelSpec:
    return ModelSpec(
        name=name,
        role=role,
        file=file.relative_to(root).as_posix(),
        sha256=sha256_file(file),
        inputs=[TensorSpec(name=n, dtype=d, shape=s) for n, d, s in inputs],
        outputs=[TensorSpec(name=n, dtype=d, shape=s) for n, d, s in outputs],
        **kw,
    )


def _model_file(root: Path, name: str, version: int) -> Path:
    return root / name / str(version) / "model.onnx"


def export_patch_encoder(
    encoder: nn.Module,
    root: Path,
    *,
    patch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    embed_dim: int,
    name: str = "mstar_patch_encoder",
    version: int = 1,
    max_batch_size: int = 256,
    parity_batches: Sequence[int] = (1, 3, 8),
    seed: int = 0,
) -> tuple[ModelSpec, ParityResult]:
    wrapped = U8PatchEncoder(encoder, mean, std).eval()
    path = _model_file(root, name, version)
    s = patch_size
    example = (torch.randint(0, 256, (2, s, s, 3), dtype=torch.uint8),)
    export_onnx(
        wrapped,
        example,
        path,
        input_names=["pixels_u8"],
        output_names=["embedding"],
        dynamic_axes={0: {0: ("batch", 1, 4096)}},
    )
    rng = _rng(seed)
    cases = [(rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),) for b in parity_batches]
    parity = check_parity(name, wrapped, path, cases, ["pixels_u8"], ["embedding"])
    spec = _spec(
        name,
        "patch_encoder",
        root,
        path,
        [("pixels_u8", "uint8", ["batch", s, s, 3])],
        [("embedding", "float32", ["batch", embed_dim])],
        version=version,
        max_batch_size=max_batch_size,
        consumes="pixels",
        description=type(encoder).__name__,
    )
    return spec, parity


def export_aggregator(
    aggregator: nn.Module,
    root: Path,
    *,
    in_dim: int,
    out_dim: int,
    name: str = "mstar_aggregator",
    version: int = 1,
    parity_n: Sequence[int] = (1, 7, 100, 333),
    seed: int = 1,
) -> tuple[ModelSpec, ParityResult]:
    wrapped = SlideAggregator(aggregator).eval()
    path = _model_file(root, name, version)
    export_onnx(
        wrapped,
        (torch.randn(150, in_dim),),
        path,
        input_names=["features"],
        output_names=["embedding", "attention", "tokens"],
        dynamic_axes={0: {0: ("n_patches", 1, 1_000_000)}},
    )
    rng = _rng(seed)
    cases = [(rng.standard_normal((n, in_dim)).astype(np.float32),) for n in parity_n]
    parity = check_parity(name, wrapped, path, cases, ["features"], ["embedding", "attention", "tokens"])
    spec = _spec(
        name,
        "aggregator",
        root,
        path,
        [("features", "float32", ["n_patches", in_dim])],
        [
            ("embedding", "float32", [out_dim]),
            ("attention", "float32", ["n_patches"]),
            ("tokens", "float32", ["n_patches", out_dim]),
        ],
        version=version,
        consumes="patch_features",
        description=type(aggregator).__name__,
    )
    return spec, parity


def export_head(
    head: nn.Module,
    root: Path,
    *,
    name: str,
    in_dim: int,
    n_outputs: int,
    role: str,
    labels: Sequence[str] | None = None,
    bin_edges: Sequence[float] | None = None,
    version: int = 1,
    parity_n: Sequence[int] = (1, 9, 120),
    seed: int = 2,
) -> tuple[ModelSpec, ParityResult]:
    """A MIL head over one bag of patch features (classification logits or survival hazard logits)."""
    wrapped = BagHead(head).eval()
    path = _model_file(root, name, version)
    export_onnx(
        wrapped,
        (torch.randn(64, in_dim),),
        path,
        input_names=["features"],
        output_names=["logits", "attention"],
        dynamic_axes={0: {0: ("n_patches", 1, 1_000_000)}},
    )
    rng = _rng(seed)
    cases = [(rng.standard_normal((n, in_dim)).astype(np.float32),) for n in parity_n]
    parity = check_parity(name, wrapped, path, cases, ["features"], ["logits", "attention"])
    spec = _spec(
        name,
        role,
        root,
        path,
        [("features", "float32", ["n_patches", in_dim])],
        [("logits", "float32", [n_outputs]), ("attention", "float32", ["n_patches"])],
        version=version,
        consumes="patch_features",
        labels=list(labels) if labels else None,
        bin_edges=[float(b) for b in bin_edges] if bin_edges is not None else None,
        description=type(getattr(head, "mil", head)).__name__,
    )
    return spec, parity


def export_text_encoder(
    text_encoder: nn.Module,
    proj: nn.Module | None,
    root: Path,
    *,
    out_dim: int,
    vocab_size: int,
    max_length: int,
    name: str = "mstar_text_encoder",
    version: int = 1,
    seed: int = 3,
) -> tuple[ModelSpec, ParityResult]:
    wrapped = TextTower(text_encoder, proj).eval()
    path = _model_file(root, name, version)
    ids = torch.randint(5, vocab_size, (2, 16), dtype=torch.int64)
    export_onnx(
        wrapped,
        (ids, torch.ones_like(ids)),
        path,
        input_names=["input_ids", "attention_mask"],
        output_names=["text_embedding"],
        dynamic_axes={
            0: {0: ("batch", 1, 1024), 1: ("seq", 2, max_length)},
            1: {0: ("batch", 1, 1024), 1: ("seq", 2, max_length)},
        },
    )
    rng = _rng(seed)
    cases = []
    for b, seq in ((1, 5), (3, 12), (4, 40)):
        ids_np = rng.integers(5, vocab_size, (b, seq), dtype=np.int64)
        mask = np.ones((b, seq), dtype=np.int64)
        mask[0, seq // 2 :] = 0  # a padded prompt
        cases.append((ids_np, mask))
    parity = check_parity(name, wrapped, path, cases, ["input_ids", "attention_mask"], ["text_embedding"])
    spec = _spec(
        name,
        "text_encoder",
        root,
        path,
        [("input_ids", "int64", ["batch", "seq"]), ("attention_mask", "int64", ["batch", "seq"])],
        [("text_embedding", "float32", ["batch", out_dim])],
        version=version,
        max_batch_size=64,
        consumes="text",
        description="BERT CLS + proj_text",
    )
    return spec, parity


def export_report_generator(
    generator: nn.Module,
    root: Path,
    *,
    in_dim: int,
    version: int = 1,
    seed: int = 4,
) -> tuple[list[ModelSpec], list[ParityResult]]:
    """Two graphs, so the service runs the decoding loop itself: `mstar_report_encoder` (features [N, D] ->
    `memory` [M, d]) and `mstar_report_decoder` (`tokens` int64 [B, T] + `memory` [B, M, d] -> `logits` [B, V]).

    M is fixed for the resampler; for HistGen it is the slide's number of regions, a dynamic axis `n_regions`
    of both graphs (the service passes the encoder's memory on as it is, so one loop serves both)."""
    mem_mod, step_mod = ReportMemory(generator).eval(), ReportStep(generator).eval()
    enc_path = _model_file(root, "mstar_report_encoder", version)
    export_onnx(
        mem_mod,
        (torch.randn(90, in_dim),),
        enc_path,
        input_names=["features"],
        output_names=["memory"],
        dynamic_axes={0: {0: ("n_patches", 1, 1_000_000)}},
    )
    rng = _rng(seed)
    cases = [(rng.standard_normal((n, in_dim)).astype(np.float32),) for n in (1, 13, 200)]
    p_enc = check_parity("mstar_report_encoder", mem_mod, enc_path, cases, ["features"], ["memory"])
    with torch.no_grad():
        mem_small, mem = mem_mod(torch.randn(1, in_dim)), mem_mod(torch.randn(2000, in_dim))
    dynamic_memory = mem_small.shape[0] != mem.shape[0]
    m_small, d = int(mem_small.shape[0]), int(mem.shape[1])
    m: int | str = "n_regions" if dynamic_memory else int(mem.shape[0])
    m_ex = int(mem.shape[0]) if dynamic_memory else m
    vocab = int(generator.out.out_features)
    max_len = int(getattr(generator, "max_len", 100))
    dec_path = _model_file(root, "mstar_report_decoder", version)
    ex = (torch.randint(4, vocab, (2, 5), dtype=torch.int64), torch.randn(2, m_ex, d))
    mem_axes = {0: ("batch", 1, 64)} | ({1: ("n_regions", 1, 1_000_000)} if dynamic_memory else {})
    export_onnx(
        step_mod,
        ex,
        dec_path,
        input_names=["tokens", "memory"],
        output_names=["logits"],
        dynamic_axes={0: {0: ("batch", 1, 64), 1: ("prefix", 1, max_len + 2)}, 1: mem_axes},
    )
    m_cases = (m_small, m_ex, m_small + 2) if dynamic_memory else (m_ex, m_ex, m_ex)
    cases = [
        (rng.integers(1, vocab, (b, t), dtype=np.int64), rng.standard_normal((b, mm, d)).astype(np.float32))
        for (b, t), mm in zip(((1, 1), (1, min(9, max_len)), (3, max_len + 1)), m_cases, strict=True)
    ]
    p_dec = check_parity("mstar_report_decoder", step_mod, dec_path, cases, ["tokens", "memory"], ["logits"])
    specs = [
        _spec(
            "mstar_report_encoder",
            "report_encoder",
            root,
            enc_path,
            [("features", "float32", ["n_patches", in_dim])],
            [("memory", "float32", [m, d])],
            version=version,
            consumes="patch_features",
            description="report generator: slide memory",
        ),
        _spec(
            "mstar_report_decoder",
            "report_decoder",
            root,
            dec_path,
            [("tokens", "int64", ["batch", "prefix"]), ("memory", "float32", ["batch", m, d])],
            [("logits", "float32", ["batch", vocab])],
            version=version,
            consumes="memory",
            description="report generator: next-token step",
        ),
    ]
    return specs, [p_enc, p_dec]


# -- bundle assembly -----------------------------------------------------------------------------------
@dataclass
class HeadSpec:
    """A trained head to export: `task` classification (needs labels) or survival (needs bin edges)."""

    name: str
    module: nn.Module
    task: str
    n_outputs: int
    labels: list[str] | None = None
    bin_edges: list[float] | None = None


@dataclass
class ExportReport:
    bundle: Bundle
    parity: list[ParityResult]

    def summary(self) -> dict:
        return {
            "bundle": str(self.bundle.root),
            "models": [m.name for m in self.bundle.manifest.models],
            "parity": [asdict(p) for p in self.parity],
        }


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd or Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def config_hash(config: dict | None) -> str | None:
    if not config:
        return None
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _zeroshot_spec(given: ZeroShotSpec | dict | None) -> ZeroShotSpec:
    """The zero-shot method to record: the one given (validated), else the official defaults."""
    if given is None or isinstance(given, ZeroShotSpec):
        return given or ZeroShotSpec()
    try:
        return ZeroShotSpec(**given)
    except ValueError as err:
        raise BundleError(f"invalid zero-shot method {given}: {err}") from err


def build_bundle(out: str | Path, **models: Any) -> ExportReport:
    """Export every given model (`_build_into`'s arguments) into a staging folder beside `out`, then move the
    result into `out`. A failed export leaves `out`'s previous bundle as it was: it used to delete the manifest
    first, so a good bundle could no longer be loaded. Model folders the previous manifest listed and this one
    does not are removed: a re-export left them behind, and Triton (`--model-control-mode=none`) loads every
    folder. Nothing else in `out` is touched."""
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise BundleError(f"--out {root} is a file, not a folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    stage = root.parent / f".{root.name}.export-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        report = _build_into(stage, **models)
        _move_in(stage, root)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return ExportReport(bundle=load_bundle(root), parity=report.parity)


def _listed(root: Path) -> set[str]:
    """Top-level names a bundle's manifest accounts for: its files' first path parts and its own files."""
    try:
        manifest = json.loads((root / "bundle.json").read_text())
    except (OSError, ValueError):
        return set()
    names = {"bundle.json", "parity.json", "report_vocab.json"}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("file", "path") and isinstance(value, str) and value and not Path(value).is_absolute():
                    names.add(Path(value).parts[0])
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(manifest)
    return {n for n in names if n not in ("", ".", "..")}


def _move_in(stage: Path, root: Path) -> None:
    """Replace `root`'s previous bundle with the staged one: the old manifest goes first and the new one comes
    last, so no moment has a manifest describing files of both."""
    root.mkdir(parents=True, exist_ok=True)
    fresh, previous = {p.name for p in stage.iterdir()}, _listed(root)
    (root / "bundle.json").unlink(missing_ok=True)
    for name in (previous | fresh) - {"bundle.json"}:
        old = root / name
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()
    for name in sorted(fresh - {"bundle.json"}):
        os.replace(stage / name, root / name)
    os.replace(stage / "bundle.json", root / "bundle.json")


def _build_into(
    out: str | Path,
    *,
    encoder: nn.Module,
    patch_size: int,
    embed_dim: int,
    target_mpp: float = 0.5,
    field_um: float | None = None,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    aggregator: nn.Module | None = None,
    slide_dim: int | None = None,
    heads: Sequence[HeadSpec] = (),
    text_encoder: nn.Module | None = None,
    text_proj: nn.Module | None = None,
    tokenizer_dir: str | Path | None = None,
    zeroshot: ZeroShotSpec | dict | None = None,
    report_generator: nn.Module | None = None,
    report_vocab: Sequence[str] | None = None,
    name: str = "mstar",
    demo: bool = False,
    provenance: dict | None = None,
    encoder_max_batch: int = 256,
    encoder_parity_batches: Sequence[int] = (1, 3, 8),
    triton: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Export every given model into `out` (a Triton repository), write `bundle.json`, then re-load it
    with the service's validator so what is written is what a worker will accept."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)  # a fresh staging folder (`build_bundle`): nothing old to mix in
    say = progress or (lambda msg: log.info(msg))
    specs: list[ModelSpec] = []
    parity: list[ParityResult] = []

    def add(result: tuple[ModelSpec, ParityResult]) -> None:
        specs.append(result[0])
        parity.append(result[1])
        p = result[1]
        say(
            f"exported {p.model}: parity max abs {max(p.max_abs.values()):.2e}, "
            f"min cosine {min(p.min_cosine.values()):.7f} at sizes {[s[0] for s in p.sizes]}"
        )

    say("exporting patch encoder")
    add(
        export_patch_encoder(
            encoder,
            root,
            patch_size=patch_size,
            mean=mean,
            std=std,
            embed_dim=embed_dim,
            max_batch_size=encoder_max_batch,
            parity_batches=encoder_parity_batches,
        )
    )
    if aggregator is not None:
        say("exporting aggregator")
        add(export_aggregator(aggregator, root, in_dim=embed_dim, out_dim=slide_dim or aggregator.dim))
    for h in heads:
        say(f"exporting head {h.name}")
        role = {"classification": "classifier", "survival": "survival"}.get(h.task, "head")
        add(
            export_head(
                h.module,
                root,
                name=h.name,
                in_dim=embed_dim,
                n_outputs=h.n_outputs,
                role=role,
                labels=h.labels,
                bin_edges=h.bin_edges,
            )
        )
    tok_spec = None
    if text_encoder is not None:
        if tokenizer_dir is None:
            raise BundleError("a text encoder needs its tokenizer directory")
        # inside the model's directory: Triton would take a top-level folder for a model (non-numeric
        # sub-folders of a model, like `configs/`, are ignored)
        tok_dst = root / "mstar_text_encoder" / "tokenizer"
        shutil.rmtree(tok_dst, ignore_errors=True)
        shutil.copytree(tokenizer_dir, tok_dst, ignore=shutil.ignore_patterns("*.bin", "*.safetensors", "*.onnx"))
        tok_file = tok_dst / "tokenizer.json"
        if not tok_file.is_file():
            raise BundleError(f"{tokenizer_dir} has no tokenizer.json (a fast tokenizer is needed at serving time)")
        max_len = int(getattr(text_encoder, "max_length", 128))
        vocab = int(text_encoder.bert.config.vocab_size) if hasattr(text_encoder, "bert") else 1000
        say("exporting text encoder")
        add(
            export_text_encoder(
                text_encoder,
                text_proj,
                root,
                out_dim=slide_dim or embed_dim,
                vocab_size=vocab,
                max_length=max_len,
            )
        )
        tok_spec = TokenizerSpec(
            path=tok_file.relative_to(root).as_posix(), sha256=sha256_file(tok_file), max_length=max_len
        )
    vocab_spec = None
    if report_generator is not None:
        if not report_vocab:
            raise BundleError("a report generator needs its vocabulary (itos list)")
        say("exporting report generator")
        rspecs, rpar = export_report_generator(report_generator, root, in_dim=embed_dim)
        specs.extend(rspecs)
        parity.extend(rpar)
        vfile = root / "report_vocab.json"
        vfile.write_text(json.dumps({"itos": list(report_vocab), "pad": 0, "bos": 1, "eos": 2, "unk": 3}))
        vocab_spec = VocabSpec(
            path=vfile.name, sha256=sha256_file(vfile), max_len=int(getattr(report_generator, "max_len", 100))
        )
    prov = dict(provenance or {})
    manifest = BundleManifest(
        schema_version=1,
        name=name,
        demo=demo,
        embed_dim=embed_dim,
        slide_dim=slide_dim if aggregator is not None else None,
        preprocessing=Preprocessing(
            patch_size=patch_size,
            target_mpp=target_mpp,
            field_um=field_um,
            mean=tuple(mean),
            std=tuple(std),
            uint8_input=True,
        ),
        models=specs,
        tokenizer=tok_spec,
        report_vocab=vocab_spec,
        zeroshot=_zeroshot_spec(zeroshot) if text_encoder is not None else None,
        provenance=Provenance(
            source=prov.pop("source", "mstar export"),
            created=datetime.now(UTC),
            git_commit=prov.pop("git_commit", None) or git_commit(),
            **prov,
        ),
    )
    write_manifest(root, manifest)
    bundle = load_bundle(root)
    if triton:
        write_repository(bundle)
    (root / "parity.json").write_text(json.dumps([asdict(p) for p in parity], indent=2) + "\n")
    return ExportReport(bundle=bundle, parity=parity)


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    zeroshot_run: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Rebuild the models of a training run from `RUN_DIR/export.pt` and export them into a bundle.

    The zero-shot method served is, first, the one `zeroshot_run` (a zero-shot run directory) selected on
    validation, else the one `export.pt` records, else the official defaults. Provenance names the checkpoint by
    file name and sha256, not by its absolute path, so two checkouts write the same manifest."""
    c = load_export_checkpoint(run_dir)
    prov = dict(c.provenance)
    prov.setdefault("run_id", Path(run_dir).resolve().name)
    prov.setdefault("checkpoint", c.path.name)
    prov.setdefault("checkpoint_sha256", sha256_file(c.path))
    zeroshot = c.zeroshot
    if zeroshot_run is not None:
        if c.text_encoder is None:
            raise BundleError(f"{run_dir} has no text encoder: a zero-shot method ({zeroshot_run}) cannot be served")
        zeroshot = zeroshot_from_run(zeroshot_run)
        prov["notes"] = "; ".join(
            filter(None, [prov.get("notes"), f"zero-shot method selected on validation by {Path(zeroshot_run).name}"])
        )
    return build_bundle(
        out,
        encoder=c.encoder,
        patch_size=c.preprocessing.size,
        embed_dim=c.embed_dim,
        target_mpp=c.target_mpp,
        field_um=c.field_um,
        mean=c.preprocessing.mean,
        std=c.preprocessing.std,
        aggregator=c.aggregator,
        slide_dim=c.aggregator.dim if c.aggregator is not None else None,
        heads=[HeadSpec(h.name, h.module, h.task, h.n_outputs, h.labels, h.bin_edges) for h in c.heads],
        text_encoder=c.text_encoder,
        text_proj=c.text_proj,
        tokenizer_dir=c.tokenizer_dir,
        zeroshot=zeroshot,
        report_generator=c.report,
        report_vocab=c.report_itos,
        name=c.name,
        demo=c.demo,
        provenance=prov,
        progress=progress,
    )
