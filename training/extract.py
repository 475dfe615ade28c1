"""Patch-feature extraction at scale: `mstar extract` and the Python API behind it.

For every slide of a cohort manifest (`cohort.csv` with `slide_id, slide_path`) or a folder of slides:
tile it (`build_grid`), embed the patches (`service.embedding.embed_grid`, the one loop the service uses too: a
reader thread pool fills a bounded queue of batches while the model runs on the previous one, so decoding and
inference overlap) and write the contract HDF5 `DIR/<slide_id>.h5` (`features` + `coords` + geometry and encoder
attributes), optionally also the official layout (`pt_files/<slide_id>.pt` [N, D] + `h5_files/<slide_id>.h5` coords).

Resume: every file is written to a temporary sibling and renamed into place, and the contract HDF5 is renamed
last, so a slide counts as done only when all its files are complete; a killed run leaves at most `.tmp` files,
which the next run ignores and overwrites. Failures are logged with the error code and message
(`extract_log.jsonl`, one record per slide and attempt, and `failures.csv` for the last run) and the run goes on.
Several devices: one process per device, slides dealt round-robin, each process with its own progress bar.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from torch import nn

from service.atomic import atomic_path
from service.errors import InvalidParameterError, MstarError
from training.models.patch_encoder import PATCH_ENCODERS, Preprocessing, build_patch_encoder, grid_mpp

log = logging.getLogger(__name__)

SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".dcm", ".ome.tif"}


# ------------------------------------------------------------------------------------------------- encoder


@dataclass
class Encoder:
    """A patch encoder ready for extraction: the module, its preprocessing and what to record about it."""

    model: nn.Module
    preprocessing: Preprocessing
    name: str
    embed_dim: int
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    field_um: float | None = None  # the field of view it was trained on (PatchEncoderSpec.field_um)

    def attrs(self) -> dict[str, Any]:
        """HDF5 attributes naming the encoder, so a feature file says which model made it."""
        out: dict[str, Any] = {
            "encoder": self.name,
            "encoder_config": json.dumps(self.config, sort_keys=True),
            "preprocessing": json.dumps(self.preprocessing.to_dict(), sort_keys=True),
            "embed_dim": int(self.embed_dim),
        }
        if self.checkpoint:
            out["encoder_checkpoint"] = self.checkpoint
            out["encoder_sha256"] = self.checkpoint_sha256 or ""
        return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def load_encoder(
    name_or_checkpoint: str | os.PathLike, *, arch: str | None = None, seed: int = 0, device: str = "cpu"
) -> Encoder:
    """A named config (`vit_micro_112`, `mstar_vit_l16`, ...) or a timm state-dict file.

    A checkpoint's configuration comes from `arch`, else from a sidecar `<file>.json` with `{"arch": ...}`
    (what `mstar train stage2` writes next to the student), else `mstar_vit_l16` (released mSTAR/UNI files).
    A name without checkpoint is randomly initialised from `seed`, so two runs build identical weights.
    """
    text = str(name_or_checkpoint)
    path = Path(text)
    checkpoint: Path | None = None
    if text in PATCH_ENCODERS and not path.is_file():
        name = text
    else:
        if not path.is_file():
            raise InvalidParameterError(
                f"--encoder {text!r} is neither a known config ({', '.join(sorted(PATCH_ENCODERS))}) nor a file"
            )
        checkpoint = path
        sidecar = path.with_suffix(path.suffix + ".json")
        meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        name = arch or meta.get("arch") or "mstar_vit_l16"
    torch.manual_seed(seed)
    model, pre = build_patch_encoder(name, checkpoint)
    spec = PATCH_ENCODERS[name]
    config = {"name": name, "arch": spec.arch, **spec.kwargs}
    if checkpoint is None:
        config["init"] = f"random(seed={seed})"
    return Encoder(
        model=model.to(device).eval(),
        preprocessing=pre,
        name=name,
        embed_dim=spec.embed_dim,
        checkpoint=str(checkpoint.resolve()) if checkpoint else None,
        checkpoint_sha256=_sha256(checkpoint) if checkpoint else None,
        config=config,
        field_um=spec.field_um,
    )


@torch.inference_mode()
def embed_batch(encoder: Encoder, patches: np.ndarray, device: str | torch.device = "cpu") -> np.ndarray:
    """uint8 `[B, S, S, 3]` -> float32 `[B, D]`; preprocessing runs on the device."""
    x = torch.from_numpy(np.ascontiguousarray(patches)).to(device, non_blocking=True)
    return encoder.model(encoder.preprocessing(x)).float().cpu().numpy()


# ------------------------------------------------------------------------------------------------- slides


@dataclass(frozen=True)
class SlideJob:
    slide_id: str
    path: Path
    mpp_override: float | None = None


def find_slides(source: str | os.PathLike, mpp_override: float | None = None) -> list[SlideJob]:
    """Slides of a cohort manifest (`slide_id`, `slide_path` relative to the manifest; optional `mpp_override`
    column) or of a folder (slide files, and sub-folders of DICOM files as one slide each), sorted by id."""
    src = Path(source)
    jobs: list[SlideJob] = []
    if src.is_file():
        with src.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = {"slide_id", "slide_path"} - set(reader.fieldnames or [])
            if missing:
                raise InvalidParameterError(f"{src}: cohort manifest lacks columns {sorted(missing)}")
            seen: set[str] = set()
            for row in reader:
                sid = row["slide_id"].strip()
                if not sid or sid in seen:
                    continue
                seen.add(sid)
                p = Path(row["slide_path"])
                p = p if p.is_absolute() else src.parent / p
                row_mpp = row.get("mpp_override") or None
                jobs.append(SlideJob(sid, p, float(row_mpp) if row_mpp else mpp_override))
        return jobs
    if not src.is_dir():
        raise InvalidParameterError(f"{src} is neither a cohort manifest nor a folder of slides")
    for p in sorted(src.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            if any(c.suffix.lower() == ".dcm" for c in p.iterdir()):
                jobs.append(SlideJob(p.name, p, mpp_override))
        elif p.suffix.lower() in SLIDE_SUFFIXES:
            jobs.append(SlideJob(p.name.split(".")[0], p, mpp_override))
    ids = [j.slide_id for j in jobs]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:  # two files with the same stem: keep the full file name as the id
        jobs = [SlideJob(j.path.name if j.slide_id in dup else j.slide_id, j.path, j.mpp_override) for j in jobs]
    return jobs


def outputs_for(out_dir: Path, slide_id: str, pt: bool) -> list[Path]:
    """The files that make a slide complete; the contract HDF5 (written last) comes last."""
    files = [out_dir / "pt_files" / f"{slide_id}.pt", out_dir / "h5_files" / f"{slide_id}.h5"] if pt else []
    return [*files, out_dir / f"{slide_id}.h5"]


def is_done(out_dir: Path, slide_id: str, pt: bool = False) -> bool:
    return all(p.is_file() for p in outputs_for(out_dir, slide_id, pt))


def _bar_updater(bar: Any):
    """`embed_grid`'s progress(done, total) as increments of a tqdm-like bar (None without a bar)."""
    if bar is None:
        return None
    last = [0]

    def update(done: int, _total: int) -> None:
        bar.update(done - last[0])
        last[0] = done

    return update


def extract_slide(
    reader_or_path: Any,
    encoder: Encoder,
    out_path: str | os.PathLike,
    *,
    target_mpp: float = 0.5,
    patch_size: int = 224,
    field_um: float | None = None,
    tissue_threshold: float = 0.25,
    batch_size: int = 64,
    workers: int = 2,
    device: str = "cpu",
    mpp_override: float | None = None,
    slide_id: str | None = None,
    pt_dir: str | os.PathLike | None = None,
    progress: Any = None,
    grid: Any = None,
) -> dict[str, Any]:
    """Tile one slide, embed every tissue patch and write `out_path` (contract HDF5) atomically.

    `reader_or_path` is an open `SlideReader` (left open) or a path (opened with `mpp_override`). With `pt_dir`,
    also writes `pt_dir/pt_files/<id>.pt` and `pt_dir/h5_files/<id>.h5` first. `progress` (a tqdm bar) is
    advanced by patches; `grid` reuses a `TileGrid` already built for this reader. With `field_um` each patch
    covers that many µm (cut at `target_mpp`, resized to `patch_size`). Returns a summary (patches, seconds,
    patches/s, tiling). Raises `MstarError`s.
    """
    from service.embedding import embed_grid
    from service.slides.grid import build_grid
    from service.slides.h5io import write_h5
    from service.slides.open import open_slide

    out_path = Path(out_path)
    slide_id = slide_id or out_path.stem
    t0 = time.perf_counter()
    own = not hasattr(reader_or_path, "read_region")
    reader = open_slide(reader_or_path, mpp_override=mpp_override) if own else reader_or_path
    try:
        if grid is None:
            grid = build_grid(
                reader,
                target_mpp=grid_mpp(target_mpp, patch_size, field_um),
                patch_size=patch_size,
                tissue_threshold=tissue_threshold,
            )
        n = len(grid)
        if n == 0:
            from service.errors import NoTissueError

            raise NoTissueError(f"no patch with ≥{tissue_threshold:.0%} tissue at {target_mpp} µm/px")
        t_embed = time.perf_counter()
        feats = embed_grid(
            reader,
            grid,
            lambda patches: embed_batch(encoder, patches, device),
            encoder.embed_dim,
            batch_size=batch_size,
            workers=max(1, workers),
            progress=_bar_updater(progress),
        )
        embed_s = time.perf_counter() - t_embed
        if not np.isfinite(feats).all():
            raise MstarError(f"{slide_id}: the encoder produced non-finite features")
        attrs = {**encoder.attrs(), "slide_id": slide_id, "slide_path": str(getattr(reader, "path", "") or "")}
        attrs["field_um"] = float(grid.patch_size * grid.target_mpp)
        if pt_dir is not None:
            pt_dir = Path(pt_dir)
            with atomic_path(pt_dir / "pt_files" / f"{slide_id}.pt") as tmp:
                torch.save(torch.from_numpy(feats), tmp)
            write_h5(pt_dir / "h5_files" / f"{slide_id}.h5", grid, None, attrs, name=slide_id)
        write_h5(out_path, grid, feats, attrs, name=slide_id)
    finally:
        if own:
            reader.close()
    seconds = time.perf_counter() - t0
    return {
        "slide_id": slide_id,
        "status": "done",
        "patches": n,
        "seconds": round(seconds, 3),
        "embed_seconds": round(embed_s, 3),
        "patches_per_s": round(n / max(embed_s, 1e-9), 2),
        "tiling": grid.summary(),
    }


# ------------------------------------------------------------------------------------------------- cohort


@dataclass(frozen=True)
class ExtractOptions:
    target_mpp: float = 0.5
    patch_size: int = 224
    tissue_threshold: float = 0.25
    batch_size: int = 64
    workers: int = 2
    pt: bool = False
    arch: str | None = None
    seed: int = 0
    field_um: float | None = None  # None: the encoder's own field of view (official 128 µm for mSTAR/UNI)

    def __post_init__(self) -> None:
        """Run-wide options checked before any slide is read: out of range, every slide used to fail one by one
        and the run still exited 0."""

        def outside(value: float, lo: float, hi: float) -> bool:
            return not (math.isfinite(value) and lo <= value <= hi)

        bad = [
            name
            for name, wrong in (
                ("--mpp", outside(self.target_mpp, 0.05, 20)),
                ("--patch-size", self.patch_size < 16),
                ("--tissue-threshold", outside(self.tissue_threshold, 0, 1)),
                ("--batch-size", self.batch_size < 1),
                ("--workers", self.workers < 1),
                ("--field-um", self.field_um is not None and outside(self.field_um, 1e-6, math.inf)),
            )
            if wrong
        ]
        if bad:
            raise InvalidParameterError(
                f"{', '.join(bad)} out of range (--mpp 0.05-20 µm/px, --patch-size >= 16, --tissue-threshold 0-1, "
                "--batch-size and --workers >= 1, --field-um > 0)"
            )

    def field_for(self, encoder: Encoder) -> float | None:
        return self.field_um if self.field_um is not None else encoder.field_um

    def grid_mpp(self, encoder: Encoder) -> float:
        """The µm/px the tiler is asked for with this encoder (what the HDF5 records as `target_mpp`)."""
        return grid_mpp(self.target_mpp, self.patch_size, self.field_for(encoder))


def _log_record(out_dir: Path, record: dict[str, Any]) -> None:
    """One JSON line per slide attempt; a single short `write` on an O_APPEND file, safe across processes."""
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid(), **record}) + "\n"
    fd = os.open(out_dir / "extract_log.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _settings_clash(path: Path, encoder: Encoder, opts: ExtractOptions) -> str:
    """Which recorded setting of a finished file differs from this run ('' if none), so a resumed run never
    mixes features of two encoders or scales in one folder."""
    import h5py

    want = {
        "encoder": encoder.name,
        "encoder_sha256": encoder.checkpoint_sha256 or None,
        "target_mpp": float(opts.grid_mpp(encoder)),
        "patch_size": int(opts.patch_size),
        "tissue_threshold": float(opts.tissue_threshold),
    }
    with h5py.File(path, "r") as f:
        have = dict(f["coords"].attrs)
    diff = []
    for key, value in want.items():
        got = have.get(key)
        got = got.decode() if isinstance(got, bytes) else got
        if value is None and not got:
            continue
        if isinstance(value, float) and got is not None and abs(float(got) - value) < 1e-9:
            continue
        if got != value:
            diff.append(f"{key}: {got!r} != {value!r}")
    return "; ".join(diff)


def _run_shard(
    jobs: list[SlideJob], encoder_ref: str, out_dir: Path, opts: ExtractOptions, device: str, position: int = 0
) -> list[dict[str, Any]]:
    """Extract `jobs` on one device (one process). Returns one record per slide."""
    from tqdm import tqdm

    from service.slides.grid import build_grid

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    encoder = load_encoder(encoder_ref, arch=opts.arch, seed=opts.seed, device=device)
    records: list[dict[str, Any]] = []
    bar = tqdm(total=0, unit="patch", desc=f"{device}", position=position, dynamic_ncols=True, leave=True)
    try:
        for k, job in enumerate(jobs):
            bar.set_postfix_str(f"slide {k + 1}/{len(jobs)} {job.slide_id}")
            if is_done(out_dir, job.slide_id, opts.pt):
                clash = _settings_clash(out_dir / f"{job.slide_id}.h5", encoder, opts)
                if clash:
                    rec = {
                        "slide_id": job.slide_id,
                        "status": "failed",
                        "error": "settings_mismatch",
                        "reason": f"an existing file was made with other settings ({clash}); use another --out",
                    }
                else:
                    rec = {"slide_id": job.slide_id, "status": "skipped", "reason": "already done"}
            else:
                try:
                    with open_for_extraction(job) as reader:
                        grid = build_grid(
                            reader,
                            target_mpp=opts.grid_mpp(encoder),
                            patch_size=opts.patch_size,
                            tissue_threshold=opts.tissue_threshold,
                        )
                        bar.total += len(grid)
                        bar.refresh()
                        rec = extract_slide(
                            reader,
                            encoder,
                            out_dir / f"{job.slide_id}.h5",
                            target_mpp=opts.target_mpp,
                            patch_size=opts.patch_size,
                            field_um=opts.field_for(encoder),
                            tissue_threshold=opts.tissue_threshold,
                            batch_size=opts.batch_size,
                            workers=opts.workers,
                            device=device,
                            slide_id=job.slide_id,
                            pt_dir=out_dir if opts.pt else None,
                            progress=bar,
                            grid=grid,
                        )
                except MstarError as err:
                    rec = {"slide_id": job.slide_id, "status": "failed", "error": err.code, "reason": str(err)}
                except Exception as err:  # one bad slide must not end a cohort run
                    rec = {
                        "slide_id": job.slide_id,
                        "status": "failed",
                        "error": type(err).__name__,
                        "reason": f"{err}".strip() or traceback.format_exc(limit=2),
                    }
            rec["path"] = str(job.path)
            rec["device"] = device
            _log_record(out_dir, rec)
            records.append(rec)
            if rec["status"] == "failed":
                bar.write(f"FAILED {job.slide_id}: [{rec['error']}] {rec['reason']}")
    finally:
        bar.close()
    return records


def open_for_extraction(job: SlideJob) -> Any:
    """Open a slide; the µm/px override applies only when the file has no usable µm/px of its own."""
    from service.slides.mpp import override_mpp
    from service.slides.open import open_slide

    reader = open_slide(job.path)
    if reader.mpp is None and job.mpp_override is not None:
        reader.mpp = override_mpp(job.mpp_override)
    return reader


def _shard_entry(args: tuple) -> list[dict[str, Any]]:
    return _run_shard(*args)


def extract_cohort(
    source: str | os.PathLike,
    encoder: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    options: ExtractOptions = ExtractOptions(),
    devices: list[str] | None = None,
    mpp_override: float | None = None,
) -> dict[str, Any]:
    """Extract every slide of `source` (manifest or folder) into `out_dir`; skips slides already done.

    `encoder` is a config name or checkpoint (see `load_encoder`); `devices` e.g. `["cuda:0", "cuda:1"]` runs one
    process per device, default `["cpu"]` runs in this process. Writes `failures.csv`; returns counts + records.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = find_slides(source, mpp_override)
    if not jobs:
        raise InvalidParameterError(f"no slides found in {source}")
    devices = devices or ["cpu"]
    ref = str(encoder)
    t0 = time.perf_counter()
    if len(devices) == 1:
        records = _run_shard(jobs, ref, out, options, devices[0])
    else:
        import multiprocessing as mp

        shards = [(jobs[i :: len(devices)], ref, out, options, dev, i) for i, dev in enumerate(devices)]
        from tqdm import tqdm

        # one tqdm lock shared by the device processes, so their bars do not overwrite each other
        ctx = mp.get_context("spawn")
        lock = ctx.RLock()
        tqdm.set_lock(lock)
        with ctx.Pool(len(devices), initializer=tqdm.set_lock, initargs=(lock,)) as pool:
            records = [r for part in pool.map(_shard_entry, shards) for r in part]
    failures = [r for r in records if r["status"] == "failed"]
    with (out / "failures.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "path", "error", "reason"])
        for r in failures:
            w.writerow([r["slide_id"], r["path"], r["error"], r["reason"]])
    done = [r for r in records if r["status"] == "done"]
    patches = sum(r["patches"] for r in done)
    embed_s = sum(r["embed_seconds"] for r in done)
    return {
        "slides": len(jobs),
        "done": len(done),
        "skipped": sum(r["status"] == "skipped" for r in records),
        "failed": len(failures),
        "patches": patches,
        "seconds": round(time.perf_counter() - t0, 2),
        "patches_per_s": round(patches / embed_s, 2) if embed_s else None,
        "records": records,
    }


def parse_devices(text: str) -> list[str]:
    devices = [d.strip() for d in text.split(",") if d.strip()]
    for d in devices:
        if d != "cpu" and not d.startswith("cuda"):
            raise InvalidParameterError(f"device {d!r}: use cpu or cuda:N")
        if d.startswith("cuda") and not torch.cuda.is_available():
            raise InvalidParameterError(f"device {d!r} requested but CUDA is not available")
    return devices or ["cpu"]


@click.command("extract")
@click.argument("source", type=click.Path(exists=True))
@click.option("--encoder", required=True, help="patch-encoder config name or a timm state-dict checkpoint")
@click.option("--arch", default=None, help="config of a checkpoint (default: its .json sidecar, else mstar_vit_l16)")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="output folder")
@click.option("--mpp", "target_mpp", default=0.5, show_default=True, help="target µm/px of the patches")
@click.option("--patch-size", default=224, show_default=True, help="the encoder's input size in pixels")
@click.option(
    "--field-um",
    type=float,
    default=None,
    help="µm of tissue per patch side, cut at --mpp and resized to --patch-size (default: the encoder's own; "
    "mstar_vit_l16/uni_vit_l16: 128 = 256 px at 0.5 µm/px, as the official features; others: patch-size x mpp)",
)
@click.option("--tissue-threshold", default=0.25, show_default=True, help="minimum tissue fraction per patch")
@click.option(
    "--mpp-override",
    type=float,
    default=None,
    help="µm/px for slides whose file has none (files with a µm/px keep theirs)",
)
@click.option("--batch-size", default=64, show_default=True)
@click.option(
    "--workers", default=max(1, min(8, (os.cpu_count() or 2) - 1)), show_default=True, help="reader threads per device"
)
@click.option("--devices", default="cpu", show_default=True, help="cpu, or cuda:0,cuda:1 (one process each)")
@click.option("--pt", is_flag=True, help="also write pt_files/<id>.pt + h5_files/<id>.h5 (official layout)")
@click.option("--seed", default=0, show_default=True, help="init seed when --encoder is a config name")
def extract(
    source: str,
    encoder: str,
    arch: str | None,
    out_dir: str,
    target_mpp: float,
    patch_size: int,
    field_um: float | None,
    tissue_threshold: float,
    mpp_override: float | None,
    batch_size: int,
    workers: int,
    devices: str,
    pt: bool,
    seed: int,
) -> None:
    """Extract patch features for a cohort manifest (cohort.csv) or a folder of slides."""
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("wsidicom").setLevel(logging.ERROR)  # per-file UID chatter on every DICOM series
    try:
        opts = ExtractOptions(target_mpp, patch_size, tissue_threshold, batch_size, workers, pt, arch, seed, field_um)
        summary = extract_cohort(
            source, encoder, out_dir, options=opts, devices=parse_devices(devices), mpp_override=mpp_override
        )
    except MstarError as err:
        raise click.ClickException(str(err)) from None
    summary.pop("records")
    click.echo(json.dumps(summary))
    if summary["failed"]:
        click.echo(f"{summary['failed']} slide(s) failed; see {Path(out_dir) / 'failures.csv'}", err=True)
