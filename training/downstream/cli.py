"""Entry points of the downstream tasks: `run` (a config -> its task) and the commands `mstar train downstream`
(train/evaluate one task) and `mstar eval RUN_DIR` (report)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from service.errors import InvalidParameterError
from training.downstream.common import seed_everything
from training.downstream.config import DownstreamConfig
from training.downstream.fewshot import run_fewshot
from training.downstream.mil import train_classification
from training.downstream.multimodal import (
    is_multimodal,
    train_multimodal_classification,
    train_multimodal_survival,
)
from training.downstream.report import train_report
from training.downstream.retrieval import run_retrieval
from training.downstream.survival import train_survival
from training.downstream.zeroshot import run_zeroshot
from training.runs import run_folder

TASKS = ("classification", "survival", "report", "zeroshot", "fewshot", "retrieval")
_RUNNERS = {
    "classification": train_classification,
    "survival": train_survival,
    "report": train_report,
    "zeroshot": run_zeroshot,
    "fewshot": run_fewshot,
    "retrieval": run_retrieval,
}


def run(cfg: DownstreamConfig, overwrite: bool = False) -> dict:
    """Seed, run `cfg.task`, write its run directory (`training.downstream.common`), return its metrics.

    An out_dir that holds a finished run (`head.pt`) is refused unless `overwrite`, and so is one another run is
    writing to (`runs.run_folder`): a rerun replaced the head and metrics a report had been written from."""
    with run_folder(cfg.out_dir, resume=False, overwrite=overwrite, marker="head.pt", resumable=False):
        return _run(cfg)


def _run(cfg: DownstreamConfig) -> dict:
    seed_everything(cfg.seed)
    runner = _RUNNERS.get(cfg.task)
    if is_multimodal(cfg):
        runner = train_multimodal_survival if cfg.task == "survival" else train_multimodal_classification
    elif cfg.modalities != ["wsi"]:
        raise InvalidParameterError(f"modalities {cfg.modalities} apply to classification and survival only")
    if runner is None:
        raise InvalidParameterError(f"unknown task {cfg.task}")
    return runner(cfg)


def _headline(metrics: dict) -> dict:
    """The numbers worth printing after a run (test split)."""
    task, test = metrics["task"], metrics.get("test", {})
    if task == "classification":
        return {k: round(test[k]["value"], 4) for k in ("macro_auc", "balanced_accuracy", "weighted_f1")}
    if task == "survival":
        out = {"c_index": round(test["c_index"]["value"], 4)}
        summ = metrics.get("cohort_summary") or {}
        out.update({k: v for k, v in summ.items() if "c_index" in k.lower()})
        return out
    if task == "report":
        return {m: {k: round(v, 4) for k, v in test[m].items()} for m in ("generated", "retrieval_baseline")}
    if task == "zeroshot":
        return {m: round(v["accuracy"]["value"], 4) for m, v in test.items()}
    if task == "fewshot":  # balanced accuracy per k, per embedding / method
        return {
            f"{src}/{m}": {k: round(v["balanced_accuracy_mean"], 3) for k, v in by_k.items()}
            for src, methods in test.items()
            for m, by_k in methods.items()
        }
    return test


@click.command("downstream")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--task", type=click.Choice(TASKS), default=None, help="overrides the config's task")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="overrides out_dir")
@click.option("--epochs", type=int, default=None, help="overrides epochs")
@click.option("--overwrite", is_flag=True, help="replace the run out_dir already holds (refused without this)")
@click.option("--seed", type=int, default=None, help="overrides seed")
@click.option("--modalities", default=None, help="wsi, rna or wsi,rna (classification and survival; overrides)")
@click.option("--rna", "rna_path", type=click.Path(exists=True), default=None, help="RNA matrix or profile folder")
@click.option(
    "--fusion",
    type=click.Choice(["gated_concat", "kronecker", "mcat"]),
    default=None,
    help="slide + RNA design: Porpoise gated concat or Kronecker, or MCAT co-attention (overrides)",
)
def downstream_command(
    config_path: str,
    task: str | None,
    out_dir: str | None,
    epochs: int | None,
    overwrite: bool,
    seed: int | None,
    modalities: str | None,
    rna_path: str | None,
    fusion: str | None,
) -> None:
    """Train a downstream head (or run an evaluation-only task) from YAML; select on val, report test."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # a path typed on the command line is relative to the shell, not to the YAML file like the config's own paths
    out_dir = str(Path(out_dir).resolve()) if out_dir else None
    mods = [m.strip() for m in modalities.split(",") if m.strip()] if modalities else None
    rna = str(Path(rna_path).resolve()) if rna_path else None
    cfg = DownstreamConfig.from_yaml(
        config_path, task=task, out_dir=out_dir, epochs=epochs, seed=seed, modalities=mods, rna=rna, fusion=fusion
    )
    metrics = run(cfg, overwrite=overwrite)
    click.echo(json.dumps({"task": cfg.task, "out_dir": str(cfg.out_dir), "test": _headline(metrics)}, default=float))


@click.command("eval")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def eval_command(run_dir: str) -> None:
    """Write RUN_DIR/report.md, metrics.json and plots/ for every downstream task run under RUN_DIR."""
    from training.evaluate import evaluate_run

    metrics = evaluate_run(run_dir)
    click.echo(f"wrote {run_dir}/report.md for {len(metrics)} task run(s): {', '.join(metrics)}")
