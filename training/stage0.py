"""Stage 0 for runs without pretrained weights: a small ViT distilled from a weight-free feature encoder.

In mSTAR the Stage-0 patch encoder is UNI (ViT-L, self-supervised on 100M patches): Stage 1 trains on its
features and Stage 2 starts its student from its weights. No such weights can be downloaded here, and a randomly
initialised ViT carries little tissue signal, so the demo makes its own Stage-0 ViT: the ViT (plus a linear
`proj`) regresses the standardised per-patch features of a teacher feature file set (`tissue_stats_112`: colour and
texture statistics of the same patch) on the training slides. The result is a ViT whose features carry what the
statistics carry, in the released timm key layout, so everything downstream (Stage 1, Stage 2, export) runs on a
real vision transformer. Distillation rather than self-supervision: it converges in a CPU minute on a few thousand
patches, where DINO-style objectives need far more steps to leave a random encoder behind.

Targets are written in the Stage-2 target layout (`training.data.patches.write_targets`), so patches stream from
the slides through the same `PatchTargetDataset` Stage 2 uses.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from service.errors import InvalidParameterError
from service.slides.h5io import read_h5
from training.data.patches import (
    BlockShuffleSampler,
    PatchTargetDataset,
    collate_patches,
    load_slide_targets,
    write_targets,
)
from training.models.patch_encoder import PATCH_ENCODERS, build_patch_encoder
from training.repro import loader_generator, seed_everything, seed_worker
from training.stage1 import lr_lambda
from training.stage2 import Student, cohort_slides, export_student, similarity_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage0Config:
    """Sizes of the distillation run (defaults: the demo's)."""

    encoder: str = "vit_micro_112"
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    block: int = 32  # raster-adjacent patches per read (one slide open per block, on a small CPU)
    num_workers: int = 1
    splits: tuple[str, ...] = ("train",)
    seed: int = 0


def write_feature_targets(
    slides: list[tuple[str, Path]], features_dir: Path, targets_dir: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Standardise the teacher features with the statistics of `slides` and write one target file per slide.

    Returns (mean, std): the standardisation, recorded in the Stage-0 sidecar."""
    loaded = []
    for sid, _ in slides:
        src = features_dir / f"{sid}.h5"
        if src.is_file():
            loaded.append((sid, *read_h5(src), src))
    if not loaded:
        raise InvalidParameterError(f"stage 0: no teacher feature file in {features_dir} for the chosen slides")
    allf = np.concatenate([f for _, _, f, _, _ in loaded]).astype(np.float64)
    mean, std = allf.mean(0), allf.std(0)
    std = np.where(std < 1e-6, 1.0, std)
    targets_dir.mkdir(parents=True, exist_ok=True)
    for sid, coords, feats, attrs, src in loaded:
        keep = {k: v for k, v in attrs.items() if not isinstance(v, np.ndarray) or v.size < 64}
        keep["features_file"] = str(src.resolve())
        z = ((feats - mean) / std).astype(np.float32)
        write_targets(targets_dir / f"{sid}.h5", coords, np.arange(len(coords)), z, keep)
    return mean.astype(np.float32), std.astype(np.float32)


def distill_stage0(
    cohort: str | Path,
    teacher_features: str | Path,
    out_dir: str | Path,
    cfg: Stage0Config | None = None,
    *,
    teacher_name: str = "tissue_stats_112",
) -> dict[str, Any]:
    """Train `cfg.encoder` to regress the standardised teacher features of each patch; write the backbone
    (`student_backbone.pt` + sidecar naming its arch, loadable by `mstar extract --encoder FILE`)."""
    cfg = cfg or Stage0Config()
    if cfg.encoder not in PATCH_ENCODERS or PATCH_ENCODERS[cfg.encoder].arch == "tissue_stats":
        raise InvalidParameterError(f"stage 0 trains a timm ViT config, not {cfg.encoder!r}")
    seed_everything(cfg.seed)
    out = Path(out_dir)
    slides = cohort_slides(Path(cohort), list(cfg.splits))
    mean, std = write_feature_targets(slides, Path(teacher_features), out / "targets")
    ds = PatchTargetDataset(load_slide_targets(slides, out / "targets"), seed=cfg.seed, open_slides=4)
    sampler = BlockShuffleSampler(ds.offsets, cfg.block, cfg.seed)
    if len(sampler) < cfg.batch_size:
        raise InvalidParameterError(f"stage 0: {len(ds)} patches cannot fill one batch of {cfg.batch_size}")

    backbone, pre = build_patch_encoder(cfg.encoder)
    with torch.no_grad():  # LayerScale at 1: trained from scratch, the released 1e-5 would mute every block
        for name, p in backbone.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(1.0)
    student = Student(backbone, PATCH_ENCODERS[cfg.encoder].embed_dim, ds.target_dim).train()
    decay = [p for n, p in student.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    rest = [p for n, p in student.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=cfg.lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.steps, cfg.warmup_frac))
    step, epoch, t0 = 0, 0, time.time()
    rows: list[list[float]] = []
    while step < cfg.steps:
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        loader = DataLoader(
            ds,
            batch_size=cfg.batch_size,
            sampler=sampler,
            num_workers=cfg.num_workers,
            collate_fn=collate_patches,
            drop_last=True,
            worker_init_fn=seed_worker,
            generator=loader_generator(cfg.seed, epoch),
        )
        for images, targets in loader:
            _, pred = student(pre(images))
            mse = similarity_loss(pred, targets, "mse")
            opt.zero_grad(set_to_none=True)
            mse.backward()
            nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            with torch.no_grad():
                r2 = 1.0 - mse.item() / max(1e-8, targets.var(0, unbiased=False).mean().item())
            if not math.isfinite(mse.item()):
                raise InvalidParameterError(f"stage 0: non-finite loss at step {step}")
            rows.append([step, epoch, mse.item(), r2, opt.param_groups[0]["lr"], round(time.time() - t0, 2)])
            if step >= cfg.steps:
                break
        else:
            epoch += 1
    ds.close()
    with (out / "metrics.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "epoch", "mse", "r2", "lr", "seconds"])
        w.writerows(rows)
    tail = rows[-min(20, len(rows)) :]
    result = {"steps": step, "mse": float(np.mean([r[2] for r in tail])), "r2": float(np.mean([r[3] for r in tail]))}
    extra = {
        "stage": 0,
        "init": f"distilled from {teacher_name} features (training.stage0)",
        "teacher": teacher_name,
        "teacher_mean": mean.tolist(),
        "teacher_std": std.tolist(),
        "stage0": {**asdict(cfg), **result},
    }
    paths = export_student(student.eval(), cfg.encoder, out, extra)
    (out / "stage0.json").write_text(json.dumps({**result, **paths}, indent=1))
    return {**result, **paths}
