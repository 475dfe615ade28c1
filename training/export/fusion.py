"""Export of a slide + RNA head (`mstar train downstream --modalities wsi,rna`) for serving: one ONNX graph
`(features [N, D], rna [G]) -> (logits, wsi_contribution, rna_contribution)` that standardises the RNA inside
(the training mean and SD are graph constants), `rna_genes.json` (the gene list in input order and the training
means the server imputes for missing genes) and the bundle manifest's `rna_fusion` entry. The export passes the
ORT-vs-PyTorch parity gate.

The served graph takes the profile on its training scale with missing genes already imputed
(`service.inference.rna_input.map_profile` + `impute`), so serving and training read RNA the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.atomic import atomic_path
from service.inference.bundle import RnaFusionSpec, sha256_file
from training.checkpoints import load_fusion_head
from training.export.onnx import check_parity, export_onnx

INPUTS = ["features", "rna"]
OUTPUTS = ["logits", "wsi_contribution", "rna_contribution"]


class FusionGraph(nn.Module):
    """The served form of a `FusionHead`: one bag and one profile, the logits and per-modality contributions
    (zeros for a modality the design does not split out: Kronecker fusion, or a missing branch)."""

    def __init__(self, head: nn.Module, mean: np.ndarray, std: np.ndarray, standardise: bool) -> None:
        super().__init__()
        self.head = head
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.standardise = standardise

    def forward(self, features: torch.Tensor, rna: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = (rna - self.mean) / self.std if self.standardise else rna
        out = self.head(features, x.unsqueeze(0))
        zero = torch.zeros_like(out.logits[0])
        contrib = getattr(out, "contributions", {}) or {}
        return out.logits[0], contrib.get("wsi", zero[None])[0], contrib.get("rna", zero[None])[0]


def parity_cases(n_features: int, n_genes: int, mean: np.ndarray, seed: int = 0) -> list[tuple[np.ndarray, ...]]:
    """Fresh random bags of several sizes with profiles around the training mean."""
    rng = np.random.default_rng(seed)
    return [
        (
            rng.normal(size=(n, n_features)).astype(np.float32),
            (mean + rng.normal(size=n_genes)).astype(np.float32),
        )
        for n in (3, 17, 64)
    ]


def export_fusion(head_path: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write `fusion.onnx` and `rna_genes.json` under `out_dir` from a fusion `head.pt`; returns the parity."""
    head, meta = load_fusion_head(head_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mean, std = np.asarray(meta["rna_mean"], np.float32), np.asarray(meta["rna_std"], np.float32)
    graph = FusionGraph(head, mean, std, bool(meta["rna_standardise"])).eval()
    n_features, n_genes = head.config["n_features"], head.config["n_genes"]
    example = (torch.randn(8, n_features), torch.from_numpy(mean.copy()))
    path = export_onnx(
        graph,
        example,
        out / "fusion.onnx",
        input_names=INPUTS,
        output_names=OUTPUTS,
        dynamic_axes={0: {0: ("n_patches", 1, 1_000_000)}},
    )
    parity = check_parity("fusion", graph, path, parity_cases(n_features, n_genes, mean), INPUTS, OUTPUTS)
    genes = {
        "genes": meta["genes"],
        "impute_mean": mean.tolist(),
        "scale": "log1p(TPM)" if meta["rna_standardise"] else "the Stage-1 cohort's scale",
        "modalities": head.config["modalities"],
        "fusion": head.config["fusion"],
        "task": head.config["task"],
        "bin_edges": meta.get("bin_edges"),
        "labels": meta.get("labels"),
    }
    with atomic_path(out / "rna_genes.json") as tmp:
        tmp.write_text(json.dumps(genes))
    spec = RnaFusionSpec(
        file=path.name,
        sha256=sha256_file(path),
        task=head.config["task"],
        fusion=head.config["fusion"],
        modalities=head.config["modalities"],
        genes=meta["genes"],
        impute_mean=mean.tolist(),
        labels=meta.get("labels"),
        bin_edges=meta.get("bin_edges"),
    )
    return {
        "onnx": str(path),
        "max_abs": parity.max_abs,
        "min_cosine": parity.min_cosine,
        "manifest_entry": spec.model_dump(mode="json"),  # `rna_fusion` of bundle.json (file relative to out_dir)
    }


def add_to_bundle(head_path: str | Path, bundle_dir: str | Path) -> dict[str, Any]:
    """Export a fusion head into an existing bundle (`rna_fusion/` inside it) and record it in `bundle.json`.

    The head's patch-feature width must be the bundle's `embed_dim`: the served graph reads the features the
    bundle's own patch encoder produces, so the head must have been trained on them."""
    from service.errors import InvalidParameterError
    from service.inference.bundle import load_bundle, write_manifest

    bundle = load_bundle(bundle_dir)
    head, _ = load_fusion_head(head_path)
    if "wsi" in head.config["modalities"] and head.config["n_features"] != bundle.manifest.embed_dim:
        raise InvalidParameterError(
            f"the head was trained on {head.config['n_features']}-d patch features; the bundle's encoder gives "
            f"{bundle.manifest.embed_dim}-d (train it on features extracted with this bundle)"
        )
    res = export_fusion(head_path, Path(bundle_dir) / "rna_fusion")
    entry = dict(res["manifest_entry"])
    entry["file"] = f"rna_fusion/{entry['file']}"
    manifest = bundle.manifest.model_copy(update={"rna_fusion": RnaFusionSpec(**entry)})
    write_manifest(bundle_dir, manifest)
    load_bundle(bundle_dir)  # the written manifest must load, checksums included
    return res
