"""HistGen vs the resampler report generator on the demo's synthetic cohort, over several cohort seeds.

For each cohort seed: a fresh synthetic cohort as `make demo` builds it (`training.demo`) with the demo's
`tissue_stats_112` features (the Stage-0 teacher; not the Stage-2 ViT's, which would add the whole demo chain per
cohort), then the report task once per architecture and training seed (`--train-seeds`, default: the cohort seed)
with the demo's report settings (`training.demo.report_settings`). Prints, per run and as mean ± sd with a t-based
95% CI over runs, test BLEU-4 / ROUGE-L (METEOR with --meteor) of the generated reports and of the
nearest-neighbour retrieval baseline, the training CPU seconds (process time: comparable on a loaded machine, unlike
wall time) and the parameter count.

    python bench/report_models.py --seeds 11 12 13 --work out/bench-report [--jobs 2]
    python bench/report_models.py --seeds 11 --train-seeds 1 2 3 --jobs 2   # one cohort, three training seeds

With `--jobs N` the training runs go to N worker processes (one thread each) while the next seed's cohort is
being built; the architectures of one seed then train side by side under the same load, so their times compare.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/: bench/service.py must not shadow the package

# the report architectures, each trained with the demo's settings (`training.demo.report_settings`)
ARCHS = ("histgen", "resampler")
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _prepare(work: Path, seed: int, cases: int) -> tuple[Path, Path]:
    """The demo's synthetic cohort and its `tissue_stats_112` features (the demo's Stage-0 teacher; the full
    demo chain's Stage-2 ViT features would add ~8 minutes per cohort)."""
    from training.demo import STAGE0_TEACHER, DemoSettings, _extract, _synth

    work.mkdir(parents=True, exist_ok=True)
    cohort = _synth(work, DemoSettings(seed=seed, cases=cases), print)
    return cohort, _extract(work, cohort, STAGE0_TEACHER, "features", print)


def _run(
    work: Path, cohort: Path, features: Path, arch: str, seed: int, epochs: int, meteor: bool, threads: int
) -> dict:
    import torch

    torch.set_num_threads(threads)

    from training.demo import DemoSettings, report_settings
    from training.downstream.cli import run
    from training.downstream.config import DownstreamConfig

    out = work / arch
    cfg = DownstreamConfig(
        task="report",
        cohort=cohort / "cohort.csv",
        features_dir=features,
        reports=cohort / "reports.jsonl",
        out_dir=out,
        epochs=epochs or DemoSettings().report_epochs,
        seed=seed,
        n_boot=200,
        report=report_settings(arch) | {"meteor": meteor},
    )
    t0, c0 = time.perf_counter(), time.process_time()
    run(cfg, overwrite=True)  # a bench rerun replaces its run
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    timing = {"seconds": seconds, "cpu": cpu, "threads": torch.get_num_threads(), "load": os.getloadavg()[0]}
    (out / "bench.json").write_text(json.dumps(timing))
    return _collect(out)


def _collect(out: Path) -> dict:
    """One finished run's figures from its run directory (`metrics.json`, `head.pt`, and `bench.json` when this
    script trained it)."""
    from training.checkpoints import load_report_generator

    m = json.loads((out / "metrics.json").read_text())
    model, _, _ = load_report_generator(out / "head.pt")
    timing = json.loads((out / "bench.json").read_text()) if (out / "bench.json").is_file() else {}
    return {
        "seconds": timing.get("seconds", float("nan")),
        "cpu": timing.get("cpu", float("nan")),
        "load": timing.get("load", float("nan")),
        "params": sum(p.numel() for p in model.parameters()),
        "generated": m["test"]["generated"],
        "baseline": m["test"]["retrieval_baseline"],
        "best_epoch": m.get("best_epoch"),
    }


def _summary(values: list[float], digits: int = 3) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    sd = statistics.stdev(values)
    half = T95.get(len(values) - 1, 1.96) * sd / math.sqrt(len(values))
    return f"{mean:.{digits}f} ± {sd:.{digits}f} [{mean - half:.{digits}f}, {mean + half:.{digits}f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13])
    ap.add_argument("--train-seeds", type=int, nargs="+", help="training seeds per cohort (default: the cohort seed)")
    ap.add_argument("--cases", type=int, default=160)
    ap.add_argument("--epochs", type=int, help="report epochs (default: the demo's)")
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--meteor", action="store_true", help="also METEOR (starts a Java process; slow)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    ap.add_argument("--jobs", type=int, default=1, help="training runs at once")
    ap.add_argument("--work", type=Path, default=Path("out/bench-report"))
    ap.add_argument("--summarize", action="store_true", help="only print the table of the finished runs under --work")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    metrics = ["BLEU_4", "ROUGE_L"] + (["METEOR"] if args.meteor else [])
    rows: dict[str, list[dict]] = {a: [] for a in args.archs}
    if args.summarize:  # the table from finished runs under --work (e.g. runs split over several invocations)
        for arch in args.archs:
            for out in sorted(args.work.glob(f"*/report-seed*/{arch}")):
                if (out / "metrics.json").is_file():
                    rows[arch].append(_collect(out))
                    print(f"{out}: BLEU_4 {rows[arch][-1]['generated']['BLEU_4']:.3f}")
        _table(args, rows, metrics)
        return
    pending: list[tuple[int, str, Future]] = []
    with ProcessPoolExecutor(max(args.jobs, 1), mp_context=multiprocessing.get_context("spawn")) as pool:
        for seed in args.seeds:
            work = args.work / f"seed{seed}"
            cohort, features = _prepare(work, seed, args.cases)
            for train_seed in args.train_seeds or [seed]:
                for arch in args.archs:
                    out = work / f"report-seed{train_seed}"
                    job = (out, cohort, features, arch, train_seed, args.epochs, args.meteor, args.threads)
                    pending.append((f"{seed}/{train_seed}", arch, pool.submit(_run, *job)))
        for seed, arch, fut in pending:
            r = fut.result()
            rows[arch].append(r)
            gen = " ".join(f"{k} {r['generated'][k]:.3f}" for k in metrics)
            base = " ".join(f"{k} {r['baseline'][k]:.3f}" for k in metrics)
            print(
                f"cohort/train seed {seed} {arch:9s} {gen} | retrieval {base} | "
                f"{r['cpu']:.0f} CPU-s, {r['seconds']:.0f} s, "
                f"{r['params']:,} params, best epoch {r['best_epoch']}, load {r['load']:.1f}",
                flush=True,
            )
    _table(args, rows, metrics)


def _table(args: argparse.Namespace, rows: dict[str, list[dict]], metrics: list[str]) -> None:
    runs = {"cohort_seeds": args.seeds, "train_seeds": args.train_seeds, "epochs": args.epochs, "rows": rows}
    (args.work / "results.json").write_text(json.dumps(runs, indent=1))
    counts = ", ".join(f"{arch} {len(rs)}" for arch, rs in rows.items())
    if args.summarize:
        print(f"\nthe finished runs under {args.work}:")
    else:
        seeds = args.train_seeds or "the cohort seed"
        epochs = args.epochs or "the demo's"
        print(f"\ncohort seeds {args.seeds}, training seeds {seeds}, {epochs} epochs:")
    print(f"mean ± sd [t-based 95% CI] over the runs per model ({counts}), test split\n")
    print("| model | " + " | ".join(metrics) + " | train CPU-s | train wall s | params |")
    print("| --- |" + " --- |" * (len(metrics) + 3))
    for arch, rs in rows.items():
        if not rs:
            continue
        cells = [_summary([r["generated"][k] for r in rs]) for k in metrics]
        secs = statistics.fmean(r["seconds"] for r in rs)
        cpu = _summary([r["cpu"] for r in rs], digits=0)
        print(f"| {arch} | " + " | ".join(cells) + f" | {cpu} | {secs:.0f} | {rs[0]['params']:,} |")
    first = max(rows.values(), key=len)
    if not first:
        return
    cells = [_summary([r["baseline"][k] for r in first]) for k in metrics]
    print("| retrieval baseline | " + " | ".join(cells) + " | – | – | – |")
    a, b = rows.get("histgen", []), rows.get("resampler", [])
    if a and len(a) == len(b):  # paired only when every run has its twin
        for k in metrics:
            diff = [x["generated"][k] - y["generated"][k] for x, y in zip(a, b, strict=True)]
            print(f"histgen − resampler {k}: {_summary(diff)} (paired by run)")


if __name__ == "__main__":
    main()
