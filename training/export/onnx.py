"""ONNX export (dynamo exporter) and the ORT-vs-PyTorch parity gate every exported model passes.

Why dynamo only: the legacy TorchScript exporter "succeeds" on Nyström attention but bakes the traced patch count
into the padding arithmetic, so the aggregator is exact only at the traced N. Every export is followed by a parity
check, ONNX Runtime vs PyTorch, on fresh random inputs of several sizes, which refuses (`ExportParityError`) when
max-abs or cosine is out of tolerance.

Why the debug metadata is stripped: the dynamo exporter annotates every node and value with where it came from
(`pkg.torch.onnx.stack_trace` holds absolute source paths, plus FX node text, name scopes and the exported
program's signature), so the same weights exported from two checkouts gave different bytes and the manifest's
sha256 could not be reproduced. None of it affects what ONNX Runtime or Triton compute. For the same reason the
producer version is torch's release without the wheel's build label (`+cpu`, `+cu130`).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from service.errors import MstarError

log = logging.getLogger(__name__)

OPSET = 18
TWO_GB = 2_000_000_000

# tolerances of the ORT-vs-PyTorch parity gate (float32 on both sides)
ATOL = 1e-3
MIN_COSINE = 0.9999


class ExportParityError(MstarError):
    code = "export_parity"
    http_status = 500


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _strip(entity: ir.Model | ir.Graph | ir.Function | ir.Node | ir.Value) -> int:
    n = len(entity.metadata_props) + bool(entity.doc_string)
    entity.metadata_props.clear()
    entity.doc_string = None
    return n


def strip_debug_metadata(model: ir.Model) -> int:
    """Remove every doc string and metadata property (model, graphs and subgraphs, functions, nodes, values) in
    place, so the saved bytes depend only on the computation and weights; returns how many were removed."""
    removed = _strip(model)
    graphs: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    for g in graphs:
        removed += _strip(g)
        values = [*g.inputs, *g.outputs]
        if isinstance(g, ir.Graph):
            values += list(g.initializers.values())
        for node in ir.traversal.RecursiveGraphIterator(g):
            removed += _strip(node)
            values += list(node.outputs)
            for attr in node.attributes.values():  # subgraphs (If / Loop / Scan) carry their own inputs
                for sub in attr.value if attr.type == ir.AttributeType.GRAPHS else [attr.value]:
                    if isinstance(sub, ir.Graph):
                        removed += _strip(sub)
                        values += [*sub.inputs, *sub.outputs, *sub.initializers.values()]
        removed += sum(_strip(v) for v in values if v is not None)
    return removed


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
    Weights are embedded in one file below 2 GB (a Triton version dir then holds a single model.onnx). The file
    is path-free and deterministic: debug metadata is stripped before it is written (see the module docstring)."""
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
        program = torch.onnx.export(
            module,
            example,
            None,  # not saved here: stripped first
            dynamo=True,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=tuple(shapes),
            optimize=True,
            verbose=False,
        )
    strip_debug_metadata(program.model)
    # the public release only: a wheel's build label (2.14.1+cpu / +cu130) traces the same graph on the CPU
    program.model.producer_version = torch.__version__.split("+")[0]
    program.save(str(path), external_data=_nbytes(module) >= TWO_GB)
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
            # NaN compares false everywhere: max(0.0, nan) is 0.0 and a NaN norm read as cosine 1, so a model with
            # NaN weights passed as a perfect match and was exported
            if not (np.isfinite(r).all() and np.isfinite(g).all()):
                raise ExportParityError(
                    f"{name}.{oname}: non-finite outputs (PyTorch {int((~np.isfinite(r)).sum())}, ONNX Runtime "
                    f"{int((~np.isfinite(g)).sum())} of {r.size} values) at input {case[0].shape}: the weights hold "
                    "NaN or inf"
                )
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
