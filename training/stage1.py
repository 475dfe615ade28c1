"""Stage 1: multimodal slide-level pretraining (slide aggregator + report encoder + RNA encoder).

Run on one process (`mstar train stage1 --config FILE`) or several (`torchrun --nproc_per_node N $(which mstar)
train stage1 --config FILE`). Global batches are built once per epoch from the seed; rank r takes the r-th
contiguous slice, and embeddings are gathered with gradients before the loss, so N ranks compute the loss of the
joined batch. Checkpoints (`<out_dir>/last.pt`) hold the model, optimizer, scheduler, RNG state and the position
inside the epoch, so `--resume` continues mid-epoch with the same next batch and loss.
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
from typing import Any

import click
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from service.atomic import atomic_path
from service.errors import InvalidParameterError
from training import dist as tdist
from training.checkpoints import stage1_record
from training.cohort import load_cohort, load_reports, normalize_split
from training.config import Stage1Config, load_config, parse_set_options
from training.data.features import Stage1Dataset, cancer_type_batches, collate, fit_bin_edges, load_expression
from training.losses import LossWeights, mstar_loss
from training.models.gene_encoder import GeneEncoder, read_gene2vec
from training.models.mstar import MStar
from training.models.text_encoder import TextEncoder, build_tiny_bert
from training.models.transmil import TransMIL
from training.repro import loader_generator, seed_everything, seed_worker
from training.runs import resume_checkpoint, run_folder, trim_logs

log = logging.getLogger(__name__)

# what a resume may change (`runs.check_resume_config`): where the run lives and how it is run, not what it trains
RESUME_FREE = ("out_dir", "num_threads", "tensorboard", "checkpoint_every", "data.num_workers")
LOG_COLUMNS = [
    "step",
    "epoch",
    "loss",
    "contrastive",
    "slide_report",
    "slide_rna",
    "report_rna",
    "triplet",
    "logit_scale",
    "lr",
    "seconds",
]


def build_model(
    cfg: Stage1Config,
    n_features: int,
    genes: list[str],
    with_text: bool = True,
    with_rna: bool = True,
    text_model_dir: str | Path | None = None,
) -> MStar:
    """The Stage-1 model for `n_features`-d patch features and the cohort's gene vocabulary."""
    a = cfg.model.aggregator
    vision = TransMIL(
        n_features=n_features,
        dim=a.dim,
        heads=a.heads,
        dim_head=a.dim_head,
        num_landmarks=a.num_landmarks,
        pinv_iterations=a.pinv_iterations,
        fc_dropout=a.fc_dropout,
        attn_dropout=a.attn_dropout,
    )
    text = None
    if cfg.model.text.enabled and with_text:
        text = TextEncoder(text_model_dir or cfg.model.text.model_dir, cfg.model.text.max_length)
        text.requires_grad_(not cfg.model.text.freeze)
    gene = None
    g = cfg.model.gene
    if g.enabled and with_rna and genes:
        table = None
        if g.gene2vec is not None:
            table, found = read_gene2vec(g.gene2vec, genes, g.dim)
            log.info("Gene2Vec: %d of %d cohort genes found in %s", found, len(genes), g.gene2vec)
        gene = GeneEncoder(
            len(genes),
            n_bins=g.n_bins,
            dim=g.dim,
            depth=g.depth,
            heads=g.heads,
            dim_head=g.dim_head,
            gene_table=table,
            freeze_gene_table=g.freeze_gene2vec,
        )
    return MStar(vision, text, gene, cfg.model.init_temperature, cfg.model.learn_temperature)


def param_groups(model: MStar, cfg: Stage1Config) -> list[dict[str, Any]]:
    """AdamW groups: language model at its own lr; no weight decay on biases, norms, tokens, temperature."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_text = name.startswith("text_encoder.")
        no_decay = p.ndim < 2 or name.endswith("cls_token") or "cls_pos" in name
        groups.setdefault((is_text, no_decay), []).append(p)
    out = []
    for (is_text, no_decay), params in groups.items():
        lr = cfg.model.text.lr if is_text else cfg.optim.lr
        out.append({"params": params, "lr": lr, "weight_decay": 0.0 if no_decay else cfg.optim.weight_decay})
    return out


def lr_lambda(total: int, warmup_frac: float):
    warm = max(1, int(total * warmup_frac))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def step_loss(
    model: nn.Module, batch: dict, weights: LossWeights, device: torch.device, amp: bool = False
) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward the rank-local batch, gather embeddings across ranks (with gradients) and compute the loss."""
    core: MStar = model.module if hasattr(model, "module") else model
    kwargs: dict[str, torch.Tensor] = {"features": batch["features"].to(device)}
    if core.text_encoder is not None:
        tok = core.text_encoder.tokenize(batch["text"])
        kwargs["input_ids"] = tok["input_ids"].to(device)
        kwargs["attention_mask"] = tok["attention_mask"].to(device)
    if core.gene_encoder is not None:
        kwargs["rna_bins"] = batch["rna_bins"].to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        emb = model(**kwargs)
    slide = tdist.gather_with_grad(emb.slide.float())
    report = tdist.gather_with_grad(emb.report.float()) if emb.report is not None else None
    rna = tdist.gather_with_grad(emb.rna.float()) if emb.rna is not None else None
    has_report = tdist.gather_no_grad(batch["has_report"].to(device))
    has_rna = tdist.gather_no_grad(batch["has_rna"].to(device))
    labels = tdist.gather_no_grad(batch["label"].to(device))
    return mstar_loss(slide, report, rna, has_report, has_rna, labels, core.logit_scale, weights)


# ---------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def embed_dataset(model: MStar, ds: Stage1Dataset, device: torch.device, batch_size: int = 8) -> dict:
    """Slide/report/RNA embeddings (L2-normalised) of every patient, deterministic patch sampling (epoch 0)."""
    was_training = model.training
    model.eval()
    ds.set_epoch(0)
    loader = DataLoader(
        ds, batch_size=batch_size, shuffle=False, collate_fn=collate, generator=torch.Generator().manual_seed(0)
    )
    out: dict[str, list] = {"slide": [], "report": [], "rna": [], "has_report": [], "has_rna": [], "label": []}
    for batch in loader:
        kwargs: dict[str, torch.Tensor] = {"features": batch["features"].to(device)}
        if model.text_encoder is not None:
            tok = model.text_encoder.tokenize(batch["text"])
            kwargs.update({k: v.to(device) for k, v in tok.items()})
        if model.gene_encoder is not None:
            kwargs["rna_bins"] = batch["rna_bins"].to(device)
        emb = model(**kwargs)
        out["slide"].append(F.normalize(emb.slide.float(), dim=-1).cpu())
        if emb.report is not None:
            out["report"].append(F.normalize(emb.report.float(), dim=-1).cpu())
        if emb.rna is not None:
            out["rna"].append(F.normalize(emb.rna.float(), dim=-1).cpu())
        for k in ("has_report", "has_rna", "label"):
            out[k].append(batch[k])
    model.train(was_training)
    return {k: torch.cat(v) if v else None for k, v in out.items()}


def recall_at_k(queries: torch.Tensor, keys: torch.Tensor, ks: Iterable[int]) -> dict[int, float]:
    """Query i's match is key i; fraction of queries whose match ranks within the top k by cosine."""
    sim = queries @ keys.t()
    rank = (sim > sim.diag()[:, None]).sum(1)  # number of keys scoring strictly higher than the match
    rank[~torch.isfinite(sim.diag())] = sim.shape[1]  # a NaN match outranks nothing (NaN > x is false): a miss
    return {k: float((rank < k).float().mean()) for k in ks}


def knn_accuracy(query: torch.Tensor, q_labels: torch.Tensor, ref: torch.Tensor, r_labels: torch.Tensor, k: int):
    """Majority vote of the k most cosine-similar reference embeddings (ties broken by summed similarity)."""
    sim = query @ ref.t()
    k = min(k, ref.shape[0])
    top_sim, top_idx = sim.topk(k, dim=1)
    n_cls = int(max(q_labels.max(), r_labels.max())) + 1
    votes = torch.zeros(query.shape[0], n_cls).scatter_add_(1, r_labels[top_idx], torch.ones_like(top_sim))
    votes += 1e-3 * torch.zeros_like(votes).scatter_add_(1, r_labels[top_idx], top_sim)
    return float((votes.argmax(1) == q_labels).float().mean())


def evaluate(model: MStar, train_ds: Stage1Dataset, val_ds: Stage1Dataset, cfg: Stage1Config, device) -> dict:
    """Cross-modal retrieval Recall@K on val and cancer-type kNN accuracy (val queries, train references)."""
    val = embed_dataset(model, val_ds, device)
    ref = embed_dataset(model, train_ds, device)
    ks = cfg.eval.recall_at
    metrics: dict[str, float] = {"n_val": float(len(val_ds))}
    metrics["knn_acc"] = knn_accuracy(val["slide"], val["label"], ref["slide"], ref["label"], cfg.eval.knn_k)
    pairs = []
    if val["report"] is not None:
        m = val["has_report"]
        pairs += [
            ("slide2report", val["slide"][m], val["report"][m]),
            ("report2slide", val["report"][m], val["slide"][m]),
        ]
    if val["rna"] is not None:
        m = val["has_rna"]
        pairs.append(("slide2rna", val["slide"][m], val["rna"][m]))
    for name, q, key in pairs:
        if q.shape[0] < 2:
            continue
        metrics[f"n_{name}"] = float(q.shape[0])
        for k, r in recall_at_k(q, key, ks).items():
            metrics[f"{name}_R@{k}"] = r
    return metrics


# ------------------------------------------------------------------------------------------------ training


class _CsvLog:
    def __init__(self, path: Path, columns: list[str], append: bool) -> None:
        self.path, self.columns = path, columns
        if not (append and path.exists()):
            with path.open("w", newline="") as fh:
                csv.writer(fh).writerow(columns)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as fh:
            csv.writer(fh).writerow([row.get(c, "") for c in self.columns])


def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def prepare_data(cfg: Stage1Config) -> tuple[Stage1Dataset, Stage1Dataset, list[str], list[str], np.ndarray | None]:
    cases = load_cohort(cfg.data.cohort, require=("cancer_type",), splits=None)
    reports = load_reports(cfg.data.reports, missing_ok=True)
    genes, expression = load_expression(cfg.data.rna)
    label_names = sorted({c.cancer_type for c in cases})
    train_cases = [c for c in cases if c.split == normalize_split(cfg.data.train_split)]
    val_cases = [c for c in cases if c.split == normalize_split(cfg.data.val_split)]
    edges = (
        fit_bin_edges(train_cases, expression, cfg.model.gene.n_bins) if cfg.model.gene.binning == "quantile" else None
    )
    common = dict(
        features_dir=cfg.data.features_dir,
        reports=reports,
        genes=genes,
        expression=expression,
        label_names=label_names,
        n_patches=cfg.data.n_patches,
        n_bins=cfg.model.gene.n_bins,
        bin_edges=edges,
        seed=cfg.seed,
    )
    train_ds = Stage1Dataset(train_cases, **common)
    val_ds = Stage1Dataset(val_cases, **common)
    if len(train_ds) == 0:
        raise InvalidParameterError(
            f"no training cases with feature files (split {cfg.data.train_split!r}, {cfg.data.features_dir})"
        )
    if cfg.data.standardize:
        val_ds.feature_mean, val_ds.feature_std = train_ds.fit_standardization()
    return train_ds, val_ds, label_names, genes, edges


def tiny_text_model(cfg: Stage1Config, train_ds: Stage1Dataset, info: tdist.DistInfo) -> Path | None:
    """Build (rank 0, once) the configured tiny BERT from the training reports; None when not configured."""
    tiny = cfg.model.text.tiny_bert
    if tiny is None or cfg.model.text.model_dir is not None:
        return None
    path = Path(cfg.out_dir) / "tiny_bert"
    if info.is_main and not (path / "config.json").is_file():
        texts = [train_ds.reports[c.case_id] for c in train_ds.cases if c.case_id in train_ds.reports]
        if not texts:
            raise InvalidParameterError("text.tiny_bert needs training reports to learn a vocabulary from")
        build_tiny_bert(
            path,
            texts,
            vocab_size=tiny.vocab_size,
            hidden=tiny.hidden,
            layers=tiny.layers,
            heads=tiny.heads,
            max_length=cfg.model.text.max_length,
            seed=cfg.seed,
        )
    tdist.barrier()
    return path


def train_stage1(
    cfg: Stage1Config, resume: bool = False, stop_after: int | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Train; returns the last validation metrics and the paths written.

    `stop_after` ends the run after that global step as an interruption would (checkpoint written, schedule
    unchanged), which the resume test uses. An out_dir holding a run is refused unless `resume` or `overwrite`,
    and so is one another run is writing to (`runs.run_folder`).
    """
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        with run_folder(cfg.out_dir, resume=resume, overwrite=overwrite, marker="last.pt"):
            return _train(cfg, resume, stop_after)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: Stage1Config, resume: bool, stop_after: int | None) -> dict[str, Any]:
    info = tdist.init_distributed()
    if cfg.optim.batch_size % info.world_size:
        raise InvalidParameterError(f"batch_size {cfg.optim.batch_size} not divisible by {info.world_size} ranks")
    device = torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    seed_everything(cfg.seed)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "last.pt"
    ckpt = (
        resume_checkpoint(
            ckpt_path,
            cfg.model_dump(mode="json"),
            RESUME_FREE,
            ("model_state_dict", "optimizer", "scheduler", "step"),
            "Stage-1",
        )
        if resume
        else None
    )  # refused before any data is read
    train_ds, val_ds, label_names, genes, edges = prepare_data(cfg)
    text_dir = tiny_text_model(cfg, train_ds, info)
    seed_everything(cfg.seed)  # model init independent of whether the tiny BERT was just built
    model = build_model(cfg, train_ds.n_features, genes, bool(train_ds.reports), text_model_dir=text_dir).to(device)
    if info.is_main:
        log.info(
            "stage1: %d train / %d val patients, %d types, %d genes, %d params",
            len(train_ds),
            len(val_ds),
            len(label_names),
            len(genes),
            sum(p.numel() for p in model.parameters()),
        )
    labels = train_ds.labels
    per_epoch = len(cancer_type_batches(labels, cfg.optim.batch_size, cfg.optim.per_class, cfg.seed, 0))
    if per_epoch == 0:
        raise InvalidParameterError(
            f"{len(train_ds)} training patients cannot fill one batch of {cfg.optim.batch_size} "
            f"with {cfg.optim.per_class} per cancer type"
        )
    total = cfg.optim.epochs * per_epoch
    if cfg.optim.max_steps is not None:
        total = min(total, cfg.optim.max_steps)
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=cfg.optim.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, cfg.optim.warmup_frac))
    step, epoch, step_in_epoch = 0, 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model_state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        step, epoch, step_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["step_in_epoch"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if torch.cuda.is_available() and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        if info.is_main:
            trim_logs(out_dir, step, ("metrics.csv", "val_metrics.jsonl"))
        log.info("resumed at step %d (epoch %d, batch %d)", step, epoch, step_in_epoch)
    ddp: nn.Module = model
    if info.enabled:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    weights = LossWeights(**cfg.loss.model_dump())
    steps_log = _CsvLog(out_dir / "metrics.csv", LOG_COLUMNS, append=resume) if info.is_main else None
    val_log_path = out_dir / "val_metrics.jsonl"
    if info.is_main and not resume and val_log_path.exists():
        val_log_path.unlink()
    writer = None
    if cfg.tensorboard and info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tb"))

    def checkpoint(next_epoch: int, next_step_in_epoch: int) -> None:
        if not info.is_main:
            return
        _save_checkpoint(
            ckpt_path,
            {
                **stage1_record(model),
                "model_state_dict": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "step": step,
                "epoch": next_epoch,
                "step_in_epoch": next_step_in_epoch,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                },
                "config": cfg.model_dump(mode="json"),
                "label_names": label_names,
                "genes": genes,
                "bin_edges": edges,
                "n_features": train_ds.n_features,
                "feature_mean": train_ds.feature_mean,
                "feature_std": train_ds.feature_std,
                "text_model_dir": model.text_encoder.model_dir if model.text_encoder is not None else None,
            },
        )

    metrics: dict[str, float] = {}
    local_bs = cfg.optim.batch_size // info.world_size
    ddp.train()
    t0 = time.time()
    while epoch < cfg.optim.epochs and step < total:
        batches = cancer_type_batches(labels, cfg.optim.batch_size, cfg.optim.per_class, cfg.seed, epoch)
        mine = [b[info.rank * local_bs : (info.rank + 1) * local_bs] for b in batches][step_in_epoch:]
        train_ds.set_epoch(epoch)
        # own generator: creating the loader must not consume the global RNG (dropout), or resume would drift
        loader = DataLoader(
            train_ds,
            batch_sampler=mine,
            collate_fn=collate,
            num_workers=cfg.data.num_workers,
            worker_init_fn=seed_worker,
            generator=loader_generator(cfg.seed, epoch),
        )
        for batch in loader:
            loss, logs = step_loss(ddp, batch, weights, device, amp=cfg.amp)
            if not bool(torch.isfinite(torch.as_tensor(loss)).all()):  # NaN trained on silently and scored R@k = 1
                raise InvalidParameterError(
                    f"stage1: non-finite loss at step {step + 1} ({logs}): this batch's features, reports or RNA "
                    "hold NaN or inf, or training diverged (lower optim.lr)"
                )
            opt.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
                if cfg.optim.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                opt.step()
            sched.step()
            step += 1
            step_in_epoch += 1
            if steps_log is not None:
                row = {
                    **logs,
                    "step": step,
                    "epoch": epoch,
                    "lr": opt.param_groups[0]["lr"],
                    "seconds": time.time() - t0,
                }
                steps_log.write(row)
                if writer is not None:
                    for k, v in logs.items():
                        writer.add_scalar(f"train/{k}", v, step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint(epoch, step_in_epoch)
            if step >= total or (stop_after is not None and step >= stop_after):
                break
        if step_in_epoch >= len(batches):
            epoch, step_in_epoch = epoch + 1, 0
            if info.is_main and (epoch % cfg.eval.every_epochs == 0 or epoch == cfg.optim.epochs) and len(val_ds):
                metrics = evaluate(model, train_ds, val_ds, cfg, device)
                metrics.update(epoch=epoch, step=step)
                with val_log_path.open("a") as fh:
                    fh.write(json.dumps(metrics) + "\n")
                log.info("epoch %d: %s", epoch, json.dumps(metrics))
                if writer is not None:
                    for k, v in metrics.items():
                        writer.add_scalar(f"val/{k}", v, step)
        checkpoint(epoch, step_in_epoch)
        tdist.barrier()
        if stop_after is not None and step >= stop_after:
            break
    if writer is not None:
        writer.close()
    if info.is_main and (out_dir / "metrics.csv").exists():
        plot_curves(out_dir)
    tdist.cleanup()
    return {"step": step, "epoch": epoch, "metrics": metrics, "checkpoint": str(ckpt_path), "out_dir": str(out_dir)}


def plot_curves(out_dir: str | Path, path: str | Path | None = None) -> Path:
    """Loss curves (per step, smoothed per epoch) and validation metrics per epoch -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    with (out_dir / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    val_path = out_dir / "val_metrics.jsonl"
    val = [json.loads(line) for line in val_path.read_text().splitlines()] if val_path.exists() else []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = [int(r["step"]) for r in rows]
    for key in ("loss", "slide_report", "slide_rna", "report_rna", "triplet"):
        pts = [(s, float(r[key])) for s, r in zip(steps, rows, strict=True) if r.get(key)]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        window = max(1, len(ys) // 30)
        smooth = np.convolve(ys, np.ones(window) / window, mode="valid")
        axes[0].plot(xs[window - 1 :], smooth, label=key)
    axes[0].set(xlabel="step", ylabel="loss (moving average)", title="Stage-1 training losses")
    axes[0].legend()
    for key in ("knn_acc", "slide2report_R@5", "report2slide_R@5", "slide2rna_R@5"):
        pts = [(v["epoch"], v[key]) for v in val if key in v]
        if pts:
            xs, ys = zip(*pts, strict=True)
            axes[1].plot(xs, ys, marker="o", ms=3, label=key)
    if val and "n_slide2report" in val[-1]:
        axes[1].axhline(5 / val[-1]["n_slide2report"], ls="--", c="grey", label="R@5 chance (slide->report)")
    axes[1].set(xlabel="epoch", ylim=(0, 1.02), title="validation")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path) if path else out_dir / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@click.command("stage1")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--resume", is_flag=True, help="continue from <out_dir>/last.pt (mid-epoch)")
@click.option("--overwrite", is_flag=True, help="replace the run <out_dir> already holds (refused without this)")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    callback=parse_set_options,
    help="override a config field, e.g. optim.epochs=3 (value parsed as JSON when it can be)",
)
def stage1_command(config_path: str, resume: bool, overwrite: bool, overrides: dict[str, Any]) -> None:
    """Stage-1 multimodal pretraining from a YAML/TOML config."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_config(config_path, Stage1Config, overrides)
    result = train_stage1(cfg, resume=resume, overwrite=overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(json.dumps(result, indent=2))


if __name__ == "__main__":
    stage1_command()
