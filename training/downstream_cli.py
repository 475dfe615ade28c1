"""`mstar train downstream` (train/evaluate one downstream task) and `mstar eval RUN_DIR` (report)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

TASKS = ("classification", "survival", "report", "zeroshot", "fewshot", "retrieval")


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
@click.option("--seed", type=int, default=None, help="overrides seed")
def downstream_command(
    config_path: str, task: str | None, out_dir: str | None, epochs: int | None, seed: int | None
) -> None:
    """Train a downstream head (or run an evaluation-only task) from YAML; select on val, report test."""
    from training.downstream import DownstreamConfig, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # a path typed on the command line is relative to the shell, not to the YAML file like the config's own paths
    out_dir = str(Path(out_dir).resolve()) if out_dir else None
    cfg = DownstreamConfig.from_yaml(config_path, task=task, out_dir=out_dir, epochs=epochs, seed=seed)
    metrics = run(cfg)
    click.echo(json.dumps({"task": cfg.task, "out_dir": str(cfg.out_dir), "test": _headline(metrics)}, default=float))


@click.command("eval")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def eval_command(run_dir: str) -> None:
    """Write RUN_DIR/report.md, metrics.json and plots/ for every downstream task run under RUN_DIR."""
    from training.evaluate import evaluate_run

    metrics = evaluate_run(run_dir)
    click.echo(f"wrote {run_dir}/report.md for {len(metrics)} task run(s): {', '.join(metrics)}")
