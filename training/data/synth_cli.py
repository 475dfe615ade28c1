"""`mstar synth`: write a synthetic multimodal cohort with known ground truth."""

from __future__ import annotations

import json
import os
import time

import click


@click.command("synth")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--cases", default=40, show_default=True, help="Number of patients.")
@click.option("--seed", default=0, show_default=True, help="Same seed -> byte-identical cohort.")
@click.option("--size", default=2048, show_default=True, help="Level-0 slide width in pixels (height 70-100 %).")
@click.option(
    "--types",
    "types",
    default="LUSC,COAD,HNSC,BRCA",
    show_default=True,
    help="Comma-separated cancer types (subset of the default four).",
)
@click.option("--missing-report", default=0.1, show_default=True, help="Fraction of cases without a report.")
@click.option("--missing-rna", default=0.1, show_default=True, help="Fraction of cases without RNA-Seq.")
@click.option("--two-slides", default=0.15, show_default=True, help="Fraction of patients with two slides.")
@click.option("--workers", default=min(2, os.cpu_count() or 1), show_default=True, help="Rendering processes.")
@click.option(
    "--context",
    is_flag=True,
    help="Context cohort: one pool of tumour cytologies for every type; the type is only in which co-occur.",
)
@click.option("--no-slides", is_flag=True, help="Skip rendering (labels, truth, RNA, reports, survival only).")
@click.option(
    "--montage",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write a PNG montage of slide thumbnails per cancer type.",
)
def synth(
    out_dir: str,
    cases: int,
    seed: int,
    size: int,
    types: str,
    missing_report: float,
    missing_rna: float,
    two_slides: float,
    workers: int,
    context: bool,
    no_slides: bool,
    montage: str | None,
) -> None:
    """Write slides/, cohort.csv, reports.jsonl, rna/, truth/, truth.json, cohort_summary.json to OUT_DIR."""
    from training.data.synth import SynthConfig, generate_cohort, make_montage

    cfg = SynthConfig(
        cases=cases,
        seed=seed,
        size=size,
        cancer_types=tuple(t.strip().upper() for t in types.split(",") if t.strip()),
        missing_report=missing_report,
        missing_rna=missing_rna,
        two_slide_fraction=two_slides,
        workers=workers,
        render_slides=not no_slides,
        context=context,
    )
    t0 = time.perf_counter()
    summary = generate_cohort(out_dir, cfg)
    dt = time.perf_counter() - t0
    if montage:
        make_montage(out_dir, montage)
    click.echo(json.dumps(summary, indent=1))
    click.echo(f"wrote {summary['cases']} cases / {summary['slides']} slides to {out_dir} in {dt:.1f} s")
