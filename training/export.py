"""Export trained models to ONNX (dynamo exporter) and assemble a servable bundle (Triton repo + manifest).

Why dynamo only: the legacy TorchScript exporter "succeeds" on Nyström attention but bakes the traced patch
count into the padding arithmetic, so the aggregator is exact only at the traced N. Every export here is
followed by a parity check, ONNX Runtime vs PyTorch, on fresh random inputs of several sizes, and refuses
(`ExportParityError`) when max-abs or cosine is out of tolerance.

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
import shutil
import subprocess
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.errors import BundleError, MstarError
from service.inference.bundle import (
    Bundle,
    BundleManifest,
    ModelSpec,
    Preprocessing,
    Provenance,
    TensorSpec,
    TokenizerSpec,
    VocabSpec,
    load_bundle,
    sha256_file,
    write_manifest,
)

log = logging.getLogger(__name__)

OPSET = 18
TWO_GB = 2_000_000_000

# tolerances of the ORT-vs-PyTorch parity gate (float32 on both sides)
ATOL = 1e-3
MIN_COSINE = 0.9999


class ExportParityError(MstarError):
    code = "export_parity"
    http_status = 500


# -- wrappers: the exact graphs that are served ------------------------------------------------------
class U8PatchEncoder(nn.Module):
    """uint8 NHWC patches in, embeddings out: transpose, /255 and mean/std inside the graph."""

    def __init__(self, encoder: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0))

    def forward(self, pixels_u8: torch.Tensor) -> torch.Tensor:
        x = pixels_u8.permute(0, 3, 1, 2).to(torch.float32)
        return self.encoder((x - self.mean) * self.inv_std)


def _field(out: Any, name: str) -> torch.Tensor:
    val = out[name] if isinstance(out, dict) else getattr(out, name)
    if val is None:
        raise BundleError(f"model output has no {name!r}")
    return val


class SlideAggregator(nn.Module):
    """One bag [N, D] -> (embedding [E], attention [N], tokens [N, E]) from a TransMIL-style output."""

    def __init__(self, aggregator: nn.Module) -> None:
        super().__init__()
        self.aggregator = aggregator

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.aggregator(features.unsqueeze(0))
        return _field(out, "embedding")[0], _field(out, "attention")[0], _field(out, "tokens")[0]


class BagHead(nn.Module):
    """One bag [N, D] -> (logits [C], attention [N]) from a `MILHead` (ABMIL or TransMIL)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(features.unsqueeze(0))
        return _field(out, "logits")[0], _field(out, "attention")[0]


class TextTower(nn.Module):
    """Token ids -> prompt embedding in the slide space: BERT CLS then the Stage-1 `proj_text`."""

    def __init__(self, text_encoder: nn.Module, proj: nn.Module | None) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.proj = proj if proj is not None else nn.Identity()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.text_encoder(input_ids, attention_mask))


class ReportMemory(nn.Module):
    """Report generator, once per slide: one bag [N, D] -> memory [M, d]."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.generator.encode(features.unsqueeze(0))[0]


class ReportStep(nn.Module):
    """Report generator, once per token: prefix [B, T] + memory [B, M, d] -> next-token logits [B, V].

    Same computation as `ReportGenerator.step` for unpadded prefixes (greedy/beam decoding never pads), without
    its data-dependent `if pad.any()` branch, which would not export."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.g = generator

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        g = self.g
        t = tokens.shape[1]
        pos = torch.arange(t, device=tokens.device).unsqueeze(0)
        x = g.embed(tokens) + g.pos(pos)
        causal = torch.triu(torch.full((t, t), float("-inf"), device=tokens.device), diagonal=1)
        h = g.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True)  # no data-dependent mask check
        return g.out(g.out_norm(h[:, -1:]))[:, 0]


# -- ONNX export + parity ------------------------------------------------------------------------------
def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def export_onnx(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: str | Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[int, dict[int, tuple[str, int, int]]],
    opset: int = OPSET,
) -> Path:
    """Dynamo export of `module(*example)`. `dynamic_axes`: input index -> {axis: (name, min, max)}.
    Weights are embedded in one file below 2 GB (a Triton version dir then holds a single model.onnx)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dims: dict[str, torch.export.Dim] = {}
    shapes = []
    for i in range(len(example)):
        axes = {}
        for ax, (name, lo, hi) in dynamic_axes.get(i, {}).items():
            axes[ax] = dims.setdefault(name, torch.export.Dim(name, min=lo, max=hi))
        shapes.append(axes or None)
    module = module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=tuple(shapes),
            external_data=_nbytes(module) >= TWO_GB,
            optimize=True,
            verbose=False,
        )
    return path


@dataclass
class ParityResult:
    model: str
    sizes: list[list[int]]
    max_abs: dict[str, float] = field(default_factory=dict)
    min_cosine: dict[str, float] = field(default_factory=dict)
    ok: bool = True


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(a.shape[0], -1) if a.ndim > 1 else a[None]
    b = b.reshape(b.shape[0], -1) if b.ndim > 1 else b[None]
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)
    return float(cos.min())


def check_parity(
    name: str,
    module: nn.Module,
    onnx_path: str | Path,
    cases: list[tuple[np.ndarray, ...]],
    input_names: list[str],
    output_names: list[str],
    *,
    atol: float = ATOL,
    min_cosine: float = MIN_COSINE,
    raise_on_fail: bool = True,
) -> ParityResult:
    """Run each case through PyTorch and ONNX Runtime (CPU EP); max-abs and worst row cosine per output."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    res = ParityResult(model=name, sizes=[list(c[0].shape) for c in cases])
    module = module.eval()
    for case in cases:
        with torch.no_grad():
            ref = module(*[torch.from_numpy(a) for a in case])
        ref = ref if isinstance(ref, tuple | list) else (ref,)
        got = sess.run(output_names, dict(zip(input_names, case, strict=True)))
        for oname, r, g in zip(output_names, ref, got, strict=True):
            r = r.detach().float().numpy()
            if r.shape != g.shape:
                raise ExportParityError(f"{name}.{oname}: ONNX shape {g.shape} != PyTorch {r.shape} at {case[0].shape}")
            diff = float(np.abs(r - g).max())
            cos = _cosine_rows(r, g)
            res.max_abs[oname] = max(res.max_abs.get(oname, 0.0), diff)
            res.min_cosine[oname] = min(res.min_cosine.get(oname, 1.0), cos)
    res.ok = all(v <= atol for v in res.max_abs.values()) and all(v >= min_cosine for v in res.min_cosine.values())
    if not res.ok and raise_on_fail:
        raise ExportParityError(
            f"{name}: ONNX Runtime disagrees with PyTorch (max abs {res.max_abs}, "
            f"min cosine {res.min_cosine}; "
            f"tolerance {atol} / {min_cosine})"
        )
    return res


# -- per-model exports ---------------------------------------------------------------------------------
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
    `memory` [M, d]) and `mstar_report_decoder` (`tokens` int64 [B, T] + `memory` [B, M, d] -> `logits` [B, V])."""
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
        mem = mem_mod(torch.randn(20, in_dim))
    m, d = int(mem.shape[0]), int(mem.shape[1])
    vocab = int(generator.out.out_features)
    max_len = int(getattr(generator, "max_len", 100))
    dec_path = _model_file(root, "mstar_report_decoder", version)
    ex = (torch.randint(4, vocab, (2, 5), dtype=torch.int64), torch.randn(2, m, d))
    export_onnx(
        step_mod,
        ex,
        dec_path,
        input_names=["tokens", "memory"],
        output_names=["logits"],
        dynamic_axes={0: {0: ("batch", 1, 64), 1: ("prefix", 1, max_len + 2)}, 1: {0: ("batch", 1, 64)}},
    )
    cases = [
        (rng.integers(1, vocab, (b, t), dtype=np.int64), rng.standard_normal((b, m, d)).astype(np.float32))
        for b, t in ((1, 1), (1, min(9, max_len)), (3, max_len + 1))
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


def build_bundle(
    out: str | Path,
    *,
    encoder: nn.Module,
    patch_size: int,
    embed_dim: int,
    target_mpp: float = 0.5,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    aggregator: nn.Module | None = None,
    slide_dim: int | None = None,
    heads: Sequence[HeadSpec] = (),
    text_encoder: nn.Module | None = None,
    text_proj: nn.Module | None = None,
    tokenizer_dir: str | Path | None = None,
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
    root.mkdir(parents=True, exist_ok=True)
    for stale in ("bundle.json", "parity.json", "report_vocab.json"):  # a re-export never mixes old and new
        (root / stale).unlink(missing_ok=True)
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
            patch_size=patch_size, target_mpp=target_mpp, mean=tuple(mean), std=tuple(std), uint8_input=True
        ),
        models=specs,
        tokenizer=tok_spec,
        report_vocab=vocab_spec,
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
        from training.triton_repo import write_repository

        write_repository(bundle)
    (root / "parity.json").write_text(json.dumps([asdict(p) for p in parity], indent=2) + "\n")
    return ExportReport(bundle=bundle, parity=parity)
