"""A tiny but real bundle shared by the inference, export and Triton tests (built once per pytest session).

Built the way a training run would be exported: `save_export_checkpoint` then `mstar export RUN_DIR`, so the
fixture itself exercises the CLI. Models are the project's own (timm ViT micro config, TransMIL, MIL heads)
with fixed seeds, so `tiny_models()` rebuilds the exact PyTorch modules for parity checks.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

import numpy as np

PATCH = 112
EMBED = 96
SLIDE_DIM = 64
LABELS = ["luad", "lusc", "normal"]
BIN_EDGES = [0.0, 12.0, 24.0, 48.0, 120.0]
TILES = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiles"
REPORTS = [
    "invasive ductal carcinoma, grade 2, with focal necrosis.",
    "benign lung parenchyma; no tumour is seen.",
    "squamous cell carcinoma, keratinising, moderately differentiated.",
    "adenocarcinoma of the lung, acinar pattern, pleura not involved.",
] * 4


def tiny_models(root: Path) -> dict:
    """The PyTorch modules of the tiny bundle (fixed seeds; the tiny BERT is written under `root`)."""
    import torch

    from training.models.heads import MILHead
    from training.models.patch_encoder import build_patch_encoder
    from training.models.report_arch import build_report_model
    from training.models.report_decoder import Vocabulary
    from training.models.text_encoder import TextEncoder, build_tiny_bert
    from training.models.transmil import TransMIL

    torch.manual_seed(0)
    encoder, _ = build_patch_encoder("vit_micro_112")
    aggregator = TransMIL(n_features=EMBED, dim=SLIDE_DIM, heads=2, num_landmarks=16).eval()
    subtype = MILHead("abmil", EMBED, len(LABELS), dim=32).eval()
    survival = MILHead(
        "transmil",
        EMBED,
        len(BIN_EDGES) - 1,
        task="survival",
        dim=32,
        transmil_kwargs={"heads": 2, "num_landmarks": 8},
    ).eval()
    vocab = Vocabulary.build(REPORTS, min_freq=1)
    report_kwargs = {  # HistGen, the default report architecture: 7 patches per region, so 150 patches -> 22
        "arch": "histgen",
        "n_features": EMBED,
        "vocab_size": len(vocab),
        "d_model": 32,
        "decoder_layers": 1,
        "heads": 2,
        "d_ff": 32,
        "max_len": 24,
        "region_size": 8,
        "hat_layers": 2,
        "n_prototypes": 16,
        "cmm_size": 32,
        "topk": 8,
    }
    torch.manual_seed(1)
    report = build_report_model(report_kwargs).eval()
    bert_dir = root / "tinybert"
    if not (bert_dir / "config.json").is_file():
        build_tiny_bert(bert_dir, REPORTS, vocab_size=200, hidden=32, layers=1, heads=2, max_length=64)
    text = TextEncoder(bert_dir, max_length=64).eval()
    torch.manual_seed(2)
    proj = torch.nn.Linear(text.hidden_size, SLIDE_DIM)
    return {
        "encoder": encoder.eval(),
        "aggregator": aggregator,
        "subtype": subtype,
        "survival": survival,
        "report": report,
        "report_kwargs": report_kwargs,
        "vocab": vocab,
        "text": text,
        "text_proj": proj,
    }


def build_tiny_bundle(root: Path) -> Path:
    """`root/bundle` (built once; later callers in the same session reuse it, under a file lock)."""
    from click.testing import CliRunner

    from service.cli import main
    from training.export.contract import save_export_checkpoint

    out = root / "bundle"
    with open(root / ".tiny_bundle.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "bundle.json").is_file():
            return out
        m = tiny_models(root)
        run = root / "run-tiny"
        save_export_checkpoint(
            run / "export.pt",
            encoder_name="vit_micro_112",
            encoder_state=m["encoder"].state_dict(),
            target_mpp=0.5,
            aggregator=m["aggregator"],
            heads=[
                {
                    "name": "subtype",
                    "module": m["subtype"],
                    "task": "classification",
                    "n_outputs": 3,
                    "dim": 32,
                    "labels": LABELS,
                },
                {
                    "name": "survival",
                    "module": m["survival"],
                    "task": "survival",
                    "n_outputs": 4,
                    "dim": 32,
                    "transmil_kwargs": {"heads": 2, "num_landmarks": 8},
                    "bin_edges": BIN_EDGES,
                },
            ],
            text={"module": m["text"], "proj": m["text_proj"]},
            report={"module": m["report"], "kwargs": m["report_kwargs"], "itos": m["vocab"].itos},
            provenance={"run_id": "tiny", "config_hash": "0" * 16},
            demo=True,
            name="tiny",
        )
        res = CliRunner().invoke(main, ["export", str(run), "--out", str(out)], catch_exceptions=False)
        assert res.exit_code == 0, res.output
    return out


def real_patches(n: int, size: int = PATCH) -> np.ndarray:
    """`n` uint8 RGB patches cut from the real H&E tiles in shared/data/tiles."""
    from PIL import Image

    tiles = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(TILES.glob("*")) if p.suffix in (".png", ".tif")]
    out = []
    i = 0
    while len(out) < n:
        t = tiles[i % len(tiles)]
        y = (i * 37) % max(1, t.shape[0] - size)
        x = (i * 53) % max(1, t.shape[1] - size)
        out.append(t[y : y + size, x : x + size])
        i += 1
    return np.stack(out).astype(np.uint8)


def stand_in_vocab(manifest: dict) -> str:
    """A report vocabulary with one word per logit of the manifest's report decoder (what `load_bundle` checks),
    for tests whose bundles carry stand-in files instead of real weights."""
    import json

    dec = next(m for m in manifest["models"] if m["role"] == "report_decoder")
    words = [f"w{i}" for i in range(dec["outputs"][0]["shape"][-1])]
    return json.dumps({"itos": words, "pad": 0, "bos": 1, "eos": 2, "unk": 3})
