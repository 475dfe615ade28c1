"""The slide + RNA head of a bundle (`manifest.rna_fusion`) on ONNX Runtime: a request's RNA profile (bytes in any
format `rna_input.read_profile` reads) and the slide's patch features -> the fused prediction next to what the
profile mapping did. The profile's values are never logged or returned; only counts of genes are."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import BundleError, InvalidParameterError
from service.inference.bundle import Bundle
from service.inference.rna_input import impute, map_profile, read_profile

# Designs whose logits are a sum of one term per modality (`training.models.fusion`): only their contributions
# mean anything. Kronecker fusion has no such split; its graph's contribution outputs are placeholder zeros.
ADDITIVE_FUSIONS = ("gated_concat", "mcat")


def _risk(logits: np.ndarray) -> float:
    """risk = -sum S(t) of the discrete-time hazards (as the survival heads)."""
    hazards = 1.0 / (1.0 + np.exp(-logits))
    return float(-np.cumprod(1.0 - hazards).sum())


@dataclass
class RnaFusion:
    """An ORT session over the bundle's fusion graph, with the gene list it expects."""

    bundle: Bundle

    def __post_init__(self) -> None:
        import onnxruntime as ort

        spec = self.bundle.manifest.rna_fusion
        if spec is None:
            raise InvalidParameterError("this model bundle has no slide + RNA head; send the request without RNA")
        self.spec = spec
        # opened for each job: checked each time (a file replaced under a running worker was served unverified)
        path = self.bundle.check_unchanged(spec.file, spec.sha256, "rna_fusion head")
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own untyped errors for bad files
            raise BundleError(f"rna_fusion head {spec.file}: onnxruntime cannot load it: {err}") from None
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        width = inputs.get("rna", [None])[-1]
        if "rna" not in inputs or (isinstance(width, int) and width != len(spec.genes)):
            raise BundleError(
                f"rna_fusion head {spec.file} takes inputs {inputs}, the manifest lists {len(spec.genes)} genes"
            )

    def predict(self, features: np.ndarray, rna: bytes | str, min_coverage: float = 0.5) -> dict[str, Any]:
        """The fused output for one slide's features [N, D] and one profile; raises `InvalidParameterError` for a
        profile that cannot be read or covers too few of the model's genes."""
        mapped = map_profile(read_profile(rna), self.spec.genes, min_coverage)
        values = impute(mapped.values, np.asarray(self.spec.impute_mean, np.float32))
        logits, wsi, rna_part = self.session.run(
            ["logits", "wsi_contribution", "rna_contribution"],
            {"features": np.ascontiguousarray(features, np.float32), "rna": values},
        )
        out: dict[str, Any] = {
            "modalities": self.spec.modalities,
            "fusion": self.spec.fusion,
            "genes_used": len(self.spec.genes) - len(mapped.missing),
            "genes_missing": len(mapped.missing),
            "genes_unknown": len(mapped.unknown),
            "contributions": {"wsi": wsi.tolist(), "rna": rna_part.tolist()}
            if self.spec.fusion in ADDITIVE_FUSIONS
            else None,  # not zeros, which would read as "neither modality mattered"
        }
        if self.spec.task == "survival":
            hazards = 1.0 / (1.0 + np.exp(-logits))
            out.update({"risk": _risk(logits), "survival": np.cumprod(1.0 - hazards).tolist()})
        else:
            p = np.exp(logits - logits.max())
            out.update({"probabilities": dict(zip(self.spec.labels or [], (p / p.sum()).tolist(), strict=True))})
        return out
