"""RNA-Seq input: read a cohort matrix, a per-case `Gene,Value` CSV or a TCGA/GDC table, and map it onto a model's
gene list.

It lives in the service's shared kernel (`.importlinter`) because training and serving must read a profile the
same way: a value the model was trained on as log1p(TPM) has to arrive as log1p(TPM) at inference too.

Formats (`read_profile` detects them from the header):
- `Gene,Value` (CSV or TSV, any header names, two columns; or `Gene` and `Value` among more columns, as the
  synthetic cohort's `Gene,Index,Value`): values taken as they are (the cohort's own scale); a gene named twice
  (after `normalize_gene_id`) is refused, since either value could be the intended one;
- GDC STAR "augmented gene counts" (`gene_id, gene_name, gene_type, ..., tpm_unstranded`): `gene_name`, and
  log1p(`tpm_unstranded`), the house scale; the `N_unmapped`-style summary rows are skipped; a symbol listed
  twice (the PAR genes, a few GENCODE symbols) keeps its larger value;
- legacy TCGA RSEM (`gene_id` / `normalized_count`, ids `SYMBOL|ENTREZ`): log1p(value), the rows without a
  symbol (`?|ENTREZ`) skipped; a table with only `scaled_estimate` or `raw_count` is refused (another scale);
- a cohort matrix (`read_matrix`): genes x cases, the first column the gene, one column per case id.

Gene ids are normalised (`normalize_gene_id`): Ensembl version suffixes dropped, `SYMBOL|ENTREZ` -> SYMBOL,
upper case. Errors name the row and the problem, never the value: RNA values are patient data.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.errors import InvalidParameterError

MAX_BYTES = 32 * 1024 * 1024  # a GDC STAR table is ~4 MB; anything far larger is not one profile
MAX_GENES = 100_000
_GENE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-|@/]{0,63}$")
_GDC_VALUE = "tpm_unstranded"
_RSEM_VALUES = ("normalized_count", "scaled_estimate", "raw_count")


def normalize_gene_id(raw: str) -> str:
    """A comparable gene id: `TP53|7157` -> `TP53`, `ENSG00000141510.17` -> `ENSG00000141510`, upper case."""
    gene = raw.strip().split("|", 1)[0]
    if gene.upper().startswith("ENSG") and "." in gene:
        gene = gene.split(".", 1)[0]
    return gene.upper()


def _check_gene(raw: str, row: int) -> str:
    if not _GENE_RE.match(raw.strip()):
        raise InvalidParameterError(f"RNA row {row}: not a gene identifier (letters, digits, . _ - | @ /)")
    return normalize_gene_id(raw)


FLOAT32_MAX = float(np.finfo(np.float32).max)
_MISSING = {"", "na", "nan", "n/a", "null", "none", "-"}


def _number(text: str, row: int) -> float:
    try:
        if "_" in text:  # Python's float() reads 1_000 as 1000; no expression table writes that
            raise ValueError(text)
        value = float(text)
    except ValueError:
        raise InvalidParameterError(f"RNA row {row}: the value is not a number") from None
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        # beyond float32 a value is inf in the model, and every output NaN
        raise InvalidParameterError(f"RNA row {row}: the value is not finite")
    return value


def _decode(data: bytes | str) -> str:
    if isinstance(data, bytes):
        if len(data) > MAX_BYTES:
            raise InvalidParameterError(f"RNA profile larger than {MAX_BYTES // (1024 * 1024)} MiB")
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InvalidParameterError("RNA profile is not UTF-8 text") from None
    return data


class _Row(list):
    """A row's cells and its line in the file (errors name the line an editor shows, comments included)."""

    line: int


def _rows(text: str) -> list[_Row]:
    numbered = [(i, ln) for i, ln in enumerate(text.splitlines(), start=1) if ln.strip() and not ln.startswith("#")]
    if not numbered:
        raise InvalidParameterError("RNA profile is empty")
    if len(numbered) > MAX_GENES + 10:
        raise InvalidParameterError(f"RNA profile has more than {MAX_GENES} rows")
    delim = "\t" if "\t" in numbered[0][1] else ","
    rows = []
    for (line, _), cells in zip(
        numbered, csv.reader(io.StringIO("\n".join(ln for _, ln in numbered)), delimiter=delim), strict=False
    ):
        row = _Row(c.strip() for c in cells)
        row.line = line
        rows.append(row)
    return rows


def read_profile(data: bytes | str | Path) -> dict[str, float]:
    """One case's profile {gene: value} from any supported per-case format (see the module docstring)."""
    if isinstance(data, Path):
        if data.stat().st_size > MAX_BYTES:
            raise InvalidParameterError(f"RNA profile larger than {MAX_BYTES // (1024 * 1024)} MiB")
        data = data.read_bytes()
    rows = _rows(_decode(data))
    header = [h.lower() for h in rows[0]]
    if "gene_name" in header and _GDC_VALUE in header:  # GDC STAR augmented counts
        gi, vi, log = header.index("gene_name"), header.index(_GDC_VALUE), True
        body = [r for r in rows[1:] if r and not r[0].startswith("N_")]
    elif header and header[0] in ("gene_id", "gene") and any(v in header for v in _RSEM_VALUES):
        if "normalized_count" not in header:
            # scaled_estimate is TPM / 1e6, raw_count unnormalised: both read as near-zero or far-off expression
            # on the model's log1p(normalized_count) scale, and a result came back anyway
            raise InvalidParameterError(
                "a TCGA RSEM table without normalized_count: its scaled_estimate or raw_count is on another scale "
                "than the model's (log1p of RSEM normalized counts); send the *.rsem.genes.normalized_results file"
            )
        gi, vi, log = 0, header.index("normalized_count"), True
        body = [r for r in rows[1:] if r and not r[0].startswith("?|")]  # TCGA rows with no gene symbol
    elif "gene" in header and "value" in header:  # Gene,...,Value with extra columns (mSTAR's Gene,Index,Value)
        gi, vi, log = header.index("gene"), header.index("value"), False
        body = rows[1:]
    elif len(header) == 2:
        gi, vi, log = 0, 1, False
        # a header names its columns: a first row whose value is missing ("NA", empty) is data, refused as such
        # (it was taken for a header and that gene silently imputed)
        body = rows[1:] if not _is_number(rows[0][1]) and rows[0][1].lower() not in _MISSING else rows
    else:
        raise InvalidParameterError(
            "RNA profile format not recognised: expected two columns (Gene,Value), a GDC STAR gene-counts table "
            "(gene_name, tpm_unstranded) or a TCGA RSEM table (gene_id, normalized_count)"
        )
    profile: dict[str, float] = {}
    first_row: dict[str, int] = {}
    for r in body:
        n = r.line
        if len(r) <= max(gi, vi):
            raise InvalidParameterError(f"RNA row {n}: expected at least {max(gi, vi) + 1} columns")
        gene, value = _check_gene(r[gi], n), _number(r[vi], n)
        if log:
            if value < 0:
                raise InvalidParameterError(f"RNA row {n}: a TPM or count is negative")
            value = math.log1p(value)
        if gene in profile:
            if not log:  # a Gene,Value file naming a gene twice is ambiguous: which value did the sender mean?
                raise InvalidParameterError(
                    f"RNA row {n}: gene listed twice (rows {first_row[gene]} and {n}, after normalising the id)"
                )
            # GDC lists PAR genes twice (chrX and chrY) and GENCODE/RSEM repeat a few symbols: keep the larger,
            # as their sum is not a TPM
            value = max(value, profile[gene])
        first_row.setdefault(gene, n)
        profile[gene] = value
    if not profile:
        raise InvalidParameterError("RNA profile has no genes")
    return profile


def profile_from_lists(genes: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    """A profile sent as two parallel lists (the JSON form of a request), checked like a file's rows."""
    if len(genes) != len(values):
        raise InvalidParameterError(f"RNA profile: {len(genes)} genes but {len(values)} values")
    if not genes:
        raise InvalidParameterError("RNA profile has no genes")
    if len(genes) > MAX_GENES:
        raise InvalidParameterError(f"RNA profile has more than {MAX_GENES} genes")
    profile: dict[str, float] = {}
    for n, (raw, value) in enumerate(zip(genes, values, strict=True)):
        if not isinstance(raw, str):
            raise InvalidParameterError(f"RNA gene {n}: not a gene identifier")
        gene = _check_gene(raw, n)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidParameterError(f"RNA gene {n}: the value is not a number")
        if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
            raise InvalidParameterError(f"RNA gene {n}: the value is not finite")
        if gene in profile:
            raise InvalidParameterError(f"RNA gene {n}: listed twice")
        profile[gene] = float(value)
    return profile


def canonical_bytes(profile: dict[str, float]) -> bytes:
    """One byte form per profile (`Gene,Value`, genes sorted, values as exact float reprs), which `read_profile`
    reads back unchanged: what the service keeps for a job, and what its SHA-256 is taken of, so two requests
    that differ only in format or gene order are the same work and two that differ in any value are not."""
    rows = "".join(f"{g},{float(profile[g])!r}\n" for g in sorted(profile))
    return ("Gene,Value\n" + rows).encode()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_matrix(path: str | Path) -> dict[str, dict[str, float]]:
    """A cohort matrix (genes x cases, CSV or TSV; empty cells are missing) -> {case_id: {gene: value}}."""
    rows = _rows(_decode(Path(path).read_bytes()))
    cases = rows[0][1:]
    if not cases:
        raise InvalidParameterError(f"{path}: an RNA matrix needs a gene column and one column per case")
    if len(set(cases)) != len(cases):
        raise InvalidParameterError(f"{path}: a case id heads more than one column")
    out: dict[str, dict[str, float]] = {c: {} for c in cases}
    seen: dict[str, int] = {}
    for n, r in enumerate(rows[1:], start=2):
        if len(r) != len(cases) + 1:
            raise InvalidParameterError(f"{path}: row {n} has {len(r)} cells, the header {len(cases) + 1}")
        gene = _check_gene(r[0], n)
        if gene in seen:
            raise InvalidParameterError(f"{path}: gene listed twice (rows {seen[gene]} and {n})")
        seen[gene] = n
        for case, cell in zip(cases, r[1:], strict=True):
            if cell != "":
                out[case][gene] = _number(cell, n)
    return out


@dataclass
class MappedProfile:
    """A profile on a model's gene list: `values` [G] with NaN where the gene is missing, and what did not map."""

    values: np.ndarray
    missing: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    @property
    def coverage(self) -> float:
        return 1.0 - len(self.missing) / max(len(self.values), 1)


def map_profile(profile: dict[str, float], genes: Sequence[str], min_coverage: float = 0.5) -> MappedProfile:
    """Put `profile` on `genes` (the bundle's or the run's list, in order). Unknown genes are reported and
    ignored; missing genes are NaN (the model imputes its training mean, see `impute`); below `min_coverage`
    the profile is refused, since a model fed mostly imputed genes returns the population average."""
    wanted = [normalize_gene_id(g) for g in genes]
    values = np.array([profile.get(g, np.nan) for g in wanted], dtype=np.float32)
    known = set(wanted)
    mapped = MappedProfile(
        values=values,
        missing=[g for g, v in zip(genes, values, strict=True) if np.isnan(v)],
        unknown=sorted(g for g in profile if g not in known),
    )
    if mapped.coverage < min_coverage:
        raise InvalidParameterError(
            f"RNA profile covers {len(genes) - len(mapped.missing)} of the model's {len(genes)} genes "
            f"(needs {min_coverage:.0%}); are the gene identifiers symbols the model knows?"
        )
    return mapped


def impute(values: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Missing genes (NaN) take the training mean: after standardisation they are 0, i.e. uninformative."""
    return np.where(np.isnan(values), mean, values).astype(np.float32)
