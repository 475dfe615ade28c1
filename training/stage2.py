"""Stage 2: self-taught training of the patch extractor (mSTAR §2).

The frozen Stage-1 aggregator re-embeds each slide's sampled Stage-0 patch features; its output token at a
patch's position (after the final LayerNorm, 512-d) is that patch's target, cached per slide
(`training.data.patches.compute_targets`). The student is the patch encoder, initialised from the Stage-0
weights, plus `proj` (D -> 512):

    loss = sim(proj(student(x)), target) + ema_weight * sim(student(x), ema(x))

`sim` is 1 - cosine by default (MSE by config); `ema` is a copy of the student backbone updated as
`ema = m * ema + (1 - m) * student` after every step, m following a cosine schedule 0.996 -> 1.0. Gradients
flow through the student and `proj` only.

Outputs in `out_dir`: `student_backbone.pt` (a plain timm state dict, the released `mSTAR.pth` key layout: no
`proj`, no EMA) with a `student_backbone.pt.json` sidecar naming its config (so `mstar extract --encoder
student_backbone.pt` needs no `--arch`), `proj.pt` (`{'config', 'model_state_dict': {'proj.weight', 'proj.bias'}}`, what
zero-shot loads), `metrics.csv` (per-step losses and the feature-spread diagnostics), and `last.pt` to resume.
Run several processes with `torchrun --nproc_per_node N $(which mstar) train stage2 --config FILE`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import click
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader, Dataset

from service.atomic import atomic_path
from service.errors import InvalidParameterError
from training import dist as tdist
from training.config import _Strict, load_config, parse_set_options
from training.data.patches import (
    BlockShuffleSampler,
    PatchTargetDataset,
    collate_patches,
    compute_targets,
    load_slide_targets,
)
from training.ema import EMA, momentum_at
from training.models.patch_encoder import PATCH_ENCODERS, build_patch_encoder
from training.repro import loader_generator, seed_everything, seed_worker
from training.runs import resume_checkpoint, run_folder, trim_logs
from training.stage1 import lr_lambda

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------- config


class Stage2DataConfig(_Strict):
    cohort: Path = Field(description="cohort.csv with slide_id, slide_path (relative to the file), split")
    features_dir: Path = Field(description="Stage-0 patch features, <slide_id>.h5 (from `mstar extract`)")
    targets_dir: Path | None = Field(None, description="cached teacher targets; default <out_dir>/targets")
    splits: list[str] = Field(["train"], description="cohort splits used for Stage 2")
    n_patches: int | None = Field(
        None,
        ge=1,
        description="patches per slide sent through the teacher (sampled as Stage 1 does); null: every patch of the "
        "slide, as the official Stage 2 re-embeds them (up to max_all_patches)",
    )
    max_all_patches: int = Field(
        65_536, ge=1, description="all-patches mode: larger slides are sampled to this many (bounds teacher memory)"
    )
    duplicates: Literal["mean", "first"] = Field(
        "mean", description="target of a patch sampled more than once (slides with fewer than n_patches)"
    )
    block: int = Field(8, ge=1, description="raster-adjacent patches read together (shuffled across slides)")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes reading patches")
    open_slides: int = Field(8, ge=1, description="slides kept open per worker")
    cache_mb: int = Field(16, ge=0, description="decoded-tile cache per open slide")
    hflip_vflip: bool = Field(True, description="random flips (keep the target valid)")
    rot90: bool = Field(True, description="random quarter turns (keep the target valid)")
    mpp_override: float | None = Field(None, description="µm/px for slides without one (as used at extraction)")


class TeacherConfig(_Strict):
    checkpoint: Path = Field(description="Stage-1 checkpoint with `vision_encoder.*` (TransMIL) weights")
    num_landmarks: int | None = Field(None, description="default: from the checkpoint config, else dim // 2")


class StudentConfig(_Strict):
    encoder: str = Field("mstar_vit_l16", description="patch-encoder config (training.models.patch_encoder)")
    init_checkpoint: Path | None = Field(
        None, description="Stage-0 weights (e.g. UNI, timm state dict); None = random init (tests only)"
    )
    proj_dim: int | None = Field(None, description="default: the target width (512)")


class Stage2LossConfig(_Strict):
    similarity: Literal["cosine", "mse"] = Field("cosine", description="distillation term (§7.7)")
    ema_weight: float = Field(0.6, ge=0, description="λ of the EMA consistency term (paper)")
    ema_similarity: Literal["cosine", "mse"] = "cosine"


class EMAConfig(_Strict):
    momentum: float = Field(0.996, ge=0, le=1, description="start momentum [ASSUME]")
    final_momentum: float = Field(1.0, ge=0, le=1)
    schedule: Literal["cosine", "constant"] = "cosine"


class Stage2OptimConfig(_Strict):
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(512, ge=1, description="global batch of patches (all ranks)")
    lr: float = Field(1e-5, ge=0, description="student lr [ASSUME, §9]")
    proj_lr: float = Field(1e-4, ge=0, description="lr of the freshly initialised projection [ASSUME]")
    layer_decay: float = Field(0.75, gt=0, le=1, description="layer-wise lr decay of the ViT (1 = off)")
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_frac: float = Field(0.05, ge=0, le=1)
    # a negative clip norm flips the gradient's sign (clip_grad_norm_ scales by max_norm / norm): gradient ascent
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; null: no clipping")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (smoke runs, tests)")


class Stage2Config(_Strict):
    data: Stage2DataConfig
    teacher: TeacherConfig
    student: StudentConfig = StudentConfig()
    loss: Stage2LossConfig = Stage2LossConfig()
    ema: EMAConfig = EMAConfig()
    optim: Stage2OptimConfig = Stage2OptimConfig()
    out_dir: Path = Path("runs/stage2")
    seed: int = 0
    amp: bool = Field(True, description="bf16 autocast, only on CUDA")
    log_every: int = Field(1, ge=1)


# ------------------------------------------------------------------------------------------------- model


class Student(nn.Module):
    """The patch encoder plus `proj`; `forward` returns (backbone features, projected features)."""

    def __init__(self, backbone: nn.Module, dim: int, proj_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.proj = nn.Linear(dim, proj_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone(x)
        return f, self.proj(f)


def similarity_loss(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """1 - cosine (mean over the batch) or mean squared error."""
    a, b = a.float(), b.float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(a, b, dim=-1)).mean()
    return F.mse_loss(a, b)


def param_groups(student: Student, cfg: Stage2OptimConfig) -> list[dict[str, Any]]:
    """Layer-decayed ViT groups (timm), no decay on norms/biases/tokens; `proj` at its own lr."""
    from timm.optim import param_groups_layer_decay

    bb = student.backbone
    skip = bb.no_weight_decay() if hasattr(bb, "no_weight_decay") else set()
    groups = param_groups_layer_decay(
        bb, weight_decay=cfg.weight_decay, no_weight_decay_list=skip, layer_decay=cfg.layer_decay
    )
    for g in groups:
        g["lr"] = cfg.lr * g.get("lr_scale", 1.0)
    groups.append({"params": list(student.proj.parameters()), "lr": cfg.proj_lr, "weight_decay": 0.0})
    return groups


def init_random_stage0(encoder: str, path: str | os.PathLike, seed: int = 0, layer_scale: float | None = 1.0) -> Path:
    """Write a randomly initialised encoder (+ sidecar) as a stand-in Stage-0 for synthetic runs without weights.

    With the released LayerScale init (1e-5) a random ViT's blocks barely touch the residual stream, so every patch
    maps to almost the same CLS feature; `layer_scale` resets the LayerScale gammas (1.0: plain random ViT features,
    which do separate colour and texture). Real runs start from UNI/mSTAR weights instead.
    """
    torch.manual_seed(seed)
    model, _ = build_patch_encoder(encoder)
    if layer_scale is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".gamma"):
                    p.fill_(layer_scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    path.with_name(path.name + ".json").write_text(
        json.dumps({"arch": encoder, "init": f"random(seed={seed})", "layer_scale": layer_scale})
    )
    return path


# ------------------------------------------------------------------------------------------------- data


def cohort_slides(cohort: Path, splits: list[str] | None) -> list[tuple[str, Path]]:
    """(slide_id, absolute slide path) of the cohort rows in `splits` (all rows when None), first one per id."""
    if not cohort.is_file():
        raise InvalidParameterError(f"cohort file not found: {cohort}")
    out: dict[str, Path] = {}
    with cohort.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"slide_id", "slide_path"} - set(reader.fieldnames or [])
        if missing:
            raise InvalidParameterError(f"{cohort}: missing columns {sorted(missing)}")
        for row in reader:
            if splits is not None and row.get("split") not in splits:
                continue
            p = Path(row["slide_path"])
            out.setdefault(row["slide_id"], p if p.is_absolute() else cohort.parent / p)
    return list(out.items())


# ------------------------------------------------------------------------------------------------- training

LOG_COLUMNS = [
    "step",
    "epoch",
    "loss",
    "distill",
    "ema",
    "target_cos",
    "feat_std",
    "ema_feat_std",
    "lr",
    "momentum",
    "seconds",
]


def _save(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _geometry(slides: list[Any]) -> dict[str, float]:
    """The µm/px and field of view the student learnt at (its slides' feature extraction), recorded in its sidecar
    so that `mstar export-runs` serves it at that scale; nothing where the slides disagree."""
    seen = {
        (float(s.attrs["target_mpp"]), float(s.attrs.get("field_um", s.attrs["patch_size"] * s.attrs["target_mpp"])))
        for s in slides
    }
    if len(seen) != 1:
        return {}
    mpp, field = seen.pop()
    return {"target_mpp": mpp, "field_um": field}


def export_student(student: Student, encoder: str, out_dir: Path, extra: dict | None = None) -> dict[str, str]:
    """Write the backbone (timm keys, loads strictly into `encoder`) + sidecar, and `proj` separately."""
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone = {k: v.detach().cpu().clone() for k, v in student.backbone.state_dict().items()}
    bb_path, proj_path = out_dir / "student_backbone.pt", out_dir / "proj.pt"
    _save(bb_path, backbone)
    spec = PATCH_ENCODERS[encoder]
    sidecar = {
        "arch": encoder,
        "embed_dim": spec.embed_dim,
        "preprocessing": spec.preprocessing.to_dict(),
        "proj": proj_path.name,
        **(extra or {}),
    }
    (out_dir / "student_backbone.pt.json").write_text(json.dumps(sidecar, indent=1))
    proj = student.proj
    _save(
        proj_path,
        {
            "config": {
                "in_features": proj.in_features,
                "out_features": proj.out_features,
                "bias": proj.bias is not None,
            },
            "model_state_dict": {f"proj.{k}": v.detach().cpu().clone() for k, v in proj.state_dict().items()},
        },
    )
    return {"backbone": str(bb_path), "proj": str(proj_path)}


def epoch_loader(
    ds: Dataset, sampler: Iterable[int], batch_size: int, num_workers: int, seed: int, epoch: int, pin_memory: bool
) -> DataLoader:
    """One epoch's DataLoader, seeded as Stage 1's: its own generator from (seed, epoch), so creating it draws
    nothing from the global RNG (a resumed run stays on track) and the workers' seeds depend on (seed, epoch)
    only; `seed_worker` derives each worker's NumPy and `random` state from that seed."""
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_patches,
        drop_last=True,
        persistent_workers=False,
        pin_memory=pin_memory,
        worker_init_fn=seed_worker,
        generator=loader_generator(seed, epoch),
    )


# what a resume may change (`runs.check_resume_config`): where things live and how the run is fed, not what it trains
RESUME_FREE = ("out_dir", "log_every", "data.targets_dir", "data.num_workers", "data.open_slides", "data.cache_mb")


def train_stage2(cfg: Stage2Config, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Targets (cached once), then the distillation loop; returns the paths written and the final metrics.

    An out_dir holding a run is refused unless `resume` or `overwrite`, and so is one another run is writing to
    (`runs.run_folder`); a resume is refused when the config differs from the checkpoint's in what it trains."""
    with run_folder(cfg.out_dir, resume=resume, overwrite=overwrite, marker="last.pt"):
        return _train(cfg, resume)


def _train(cfg: Stage2Config, resume: bool) -> dict[str, Any]:
    info = tdist.init_distributed()
    device = torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    seed_everything(cfg.seed)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "last.pt"
    ck = (
        resume_checkpoint(
            ckpt_path, cfg.model_dump(mode="json"), RESUME_FREE, ("student", "ema", "optimizer", "step"), "Stage-2"
        )
        if resume
        else None
    )  # refused before any target is computed
    targets_dir = Path(cfg.data.targets_dir or out_dir / "targets")
    slides = cohort_slides(Path(cfg.data.cohort), cfg.data.splits)
    if info.is_main:
        counts = compute_targets(
            [s for s, _ in slides],
            cfg.data.features_dir,
            cfg.teacher.checkpoint,
            targets_dir,
            n_patches=cfg.data.n_patches,
            seed=cfg.seed,
            duplicates=cfg.data.duplicates,
            num_landmarks=cfg.teacher.num_landmarks,
            device=str(device),
            max_all_patches=cfg.data.max_all_patches,
        )
        log.info("stage2: targets for %d slides (%d patches) in %s", len(counts), sum(counts.values()), targets_dir)
    tdist.barrier()
    ds = PatchTargetDataset(
        load_slide_targets(slides, targets_dir, cfg.data.mpp_override),
        seed=cfg.seed,
        augment_flips=cfg.data.hflip_vflip,
        augment_rot90=cfg.data.rot90,
        open_slides=cfg.data.open_slides,
        cache_mb=cfg.data.cache_mb,
    )
    if cfg.optim.batch_size % info.world_size:
        raise InvalidParameterError(f"batch_size {cfg.optim.batch_size} not divisible by {info.world_size} ranks")
    local_bs = cfg.optim.batch_size // info.world_size
    sampler = BlockShuffleSampler(ds.offsets, cfg.data.block, cfg.seed, info.rank, info.world_size)
    per_epoch = len(sampler) // local_bs
    if per_epoch == 0:
        raise InvalidParameterError(f"{len(ds)} target patches cannot fill one batch of {cfg.optim.batch_size}")
    total = cfg.optim.epochs * per_epoch
    if cfg.optim.max_steps is not None:
        total = min(total, cfg.optim.max_steps)

    backbone, pre = build_patch_encoder(cfg.student.encoder, cfg.student.init_checkpoint)
    dim = PATCH_ENCODERS[cfg.student.encoder].embed_dim
    student = Student(backbone, dim, cfg.student.proj_dim or ds.target_dim).to(device).train()
    if (cfg.student.proj_dim or ds.target_dim) != ds.target_dim and cfg.loss.similarity == "mse":
        raise InvalidParameterError("proj_dim must equal the target width for the MSE distillation loss")
    ema = EMA(student.backbone).to(device)
    opt = torch.optim.AdamW(param_groups(student, cfg.optim), lr=cfg.optim.lr, betas=cfg.optim.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, cfg.optim.warmup_frac))
    step = epoch = 0
    if ck is not None:
        student.load_state_dict(ck["student"])
        ema.module.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step, epoch = ck["step"], ck["epoch"]
    model: nn.Module = student
    if info.enabled:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(student, device_ids=ids)
    log_path = out_dir / "metrics.csv"
    if info.is_main and resume:
        trim_logs(out_dir, step, ("metrics.csv",))  # the steps after the checkpoint run, and are logged, again
    if info.is_main and not (resume and log_path.exists()):
        with log_path.open("w", newline="") as fh:
            csv.writer(fh).writerow(LOG_COLUMNS)
    amp = cfg.amp and device.type == "cuda"
    t0 = time.time()
    last: dict[str, float] = {}
    while step < total:
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        loader = epoch_loader(ds, sampler, local_bs, cfg.data.num_workers, cfg.seed, epoch, device.type == "cuda")
        for images, targets in loader:
            x = pre(images.to(device, non_blocking=True))
            targets = targets.to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                feats, projected = model(x)
                ema_feats = ema(x)
            distill = similarity_loss(projected, targets, cfg.loss.similarity)
            consist = similarity_loss(feats, ema_feats.detach(), cfg.loss.ema_similarity)
            loss = distill + cfg.loss.ema_weight * consist
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:
                nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
            opt.step()
            sched.step()
            m = momentum_at(step, total, cfg.ema.momentum, cfg.ema.final_momentum, cfg.ema.schedule)
            ema.update(student.backbone, m)
            step += 1
            with torch.no_grad():
                f32 = feats.detach().float()
                cos = F.cosine_similarity(projected.detach().float(), targets.float(), dim=-1).mean()
                last = {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss.item(),
                    "distill": distill.item(),
                    "ema": consist.item(),
                    "target_cos": cos.item(),
                    "feat_std": f32.std(0).mean().item(),
                    "ema_feat_std": ema_feats.float().std(0).mean().item(),
                    "lr": opt.param_groups[-1]["lr"],
                    "momentum": m,
                    "seconds": round(time.time() - t0, 2),
                }
            if not all(math.isfinite(last[k]) for k in ("loss", "distill", "ema")):
                raise InvalidParameterError(f"stage2: non-finite loss at step {step}: {last}")
            if info.is_main and step % cfg.log_every == 0:
                with log_path.open("a", newline="") as fh:
                    csv.writer(fh).writerow([last[c] for c in LOG_COLUMNS])
            if step >= total:
                break
        else:
            epoch += 1
        if info.is_main:
            _save(
                ckpt_path,
                {
                    "student": student.state_dict(),
                    "ema": ema.module.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "step": step,
                    "epoch": epoch,
                    "config": cfg.model_dump(mode="json"),
                },
            )
    ds.close()
    paths: dict[str, str] = {}
    if info.is_main:
        extra = {"stage": 2, "steps": step, "teacher": str(cfg.teacher.checkpoint), **_geometry(ds.slides)}
        paths = export_student(student, cfg.student.encoder, out_dir, extra)
    tdist.barrier()
    tdist.cleanup()
    return {"step": step, "epoch": epoch, "last": last, "out_dir": str(out_dir), **paths}


@click.command("stage2")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--resume", is_flag=True, help="continue from <out_dir>/last.pt")
@click.option("--overwrite", is_flag=True, help="replace the run <out_dir> already holds (refused without this)")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    callback=parse_set_options,
    help="override a config field, e.g. optim.max_steps=10 (value parsed as JSON when it can be)",
)
def stage2_command(config_path: str, resume: bool, overwrite: bool, overrides: dict[str, Any]) -> None:
    """Stage-2 self-taught patch-extractor training from a YAML/TOML config."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_config(config_path, Stage2Config, overrides)
    result = train_stage2(cfg, resume=resume, overwrite=overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(json.dumps(result, indent=1))
