"""RNA profile readers (`service.inference.rna_input`): every supported format, gene mapping, and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from service.errors import InvalidParameterError
from service.inference.rna_input import impute, map_profile, normalize_gene_id, read_matrix, read_profile

GDC = """# gene-model: GENCODE v36
gene_id\tgene_name\tgene_type\tunstranded\tstranded_first\tstranded_second\ttpm_unstranded\tfpkm_unstranded
N_unmapped\t\t\t123\t1\t1\t\t
N_multimapping\t\t\t55\t1\t1\t\t
ENSG00000141510.17\tTP53\tprotein_coding\t2000\t1000\t1000\t35.5\t10.1
ENSG00000111640.15\tGAPDH\tprotein_coding\t90000\t1\t1\t1500.0\t400.2
ENSG00000182162.11\tP2RY8\tprotein_coding\t10\t1\t1\t2.0\t0.5
ENSG00000182162.11_PAR_Y\tP2RY8\tprotein_coding\t0\t0\t0\t0.0\t0.0
"""

RSEM = "gene_id\tnormalized_count\nTP53|7157\t812.5\nGAPDH|2597\t40000\n?|100130426\t0\n"


def test_gene_value_csv_is_read_as_is() -> None:
    prof = read_profile(b"Gene,Value\nTP53,3.5\ngapdh,7.25\n")
    assert prof == {"TP53": 3.5, "GAPDH": 7.25}


def test_gene_and_value_among_more_columns() -> None:
    """The synthetic cohort's per-case files (`mstar synth`: rna/<case_id>.csv) are `Gene,Index,Value`."""
    assert read_profile("Gene,Index,Value\nTP53,0,1.5\nEGFR,1,2.5\n") == {"TP53": 1.5, "EGFR": 2.5}


def test_headerless_two_column_tsv() -> None:
    assert read_profile("TP53\t1.0\nEGFR\t2.0\n") == {"TP53": 1.0, "EGFR": 2.0}


def test_gdc_star_counts_take_log1p_tpm_and_skip_summary_rows() -> None:
    prof = read_profile(GDC.encode())
    assert set(prof) == {"TP53", "GAPDH", "P2RY8"}
    assert prof["TP53"] == pytest.approx(math.log1p(35.5))
    assert prof["P2RY8"] == pytest.approx(math.log1p(2.0))  # the PAR_Y duplicate (0 TPM) does not win


def test_tcga_rsem_table_strips_entrez_and_logs() -> None:
    prof = read_profile(RSEM)  # the '?|ENTREZ' row (no symbol) is skipped
    assert set(prof) == {"TP53", "GAPDH"}
    assert prof["TP53"] == pytest.approx(math.log1p(812.5))


def test_an_rsem_table_without_normalized_counts_is_refused() -> None:
    """A legacy `*.rsem.genes.results` (raw_count, scaled_estimate) was read on the wrong scale (scaled_estimate is
    TPM / 1e6: every gene near zero against training means of 2-6) and a result came back."""
    legacy = "gene_id\traw_count\tscaled_estimate\ttranscript_id\nTP53|7157\t812.0\t3.1e-05\tuc002\n"
    with pytest.raises(InvalidParameterError, match="without normalized_count"):
        read_profile(legacy.encode())
    with pytest.raises(InvalidParameterError, match="without normalized_count"):
        read_profile(b"gene_id\traw_count\nTP53|7157\t812\n")


def test_cohort_matrix_with_missing_cells(tmp_path: Path) -> None:
    p = tmp_path / "rna.csv"
    p.write_text("gene,case-1,case-2\nTP53,1.0,\nENSG00000111640.15,2.0,3.0\n")
    m = read_matrix(p)
    assert m == {"case-1": {"TP53": 1.0, "ENSG00000111640": 2.0}, "case-2": {"ENSG00000111640": 3.0}}


def test_mapping_reports_unknown_and_missing_and_imputes() -> None:
    mapped = map_profile({"TP53": 1.0, "NOTAGENE1": 5.0, "EGFR": 2.0}, ["TP53", "EGFR", "KRAS"], min_coverage=0.5)
    assert mapped.missing == ["KRAS"] and mapped.unknown == ["NOTAGENE1"]
    assert np.isnan(mapped.values[2])
    np.testing.assert_allclose(impute(mapped.values, np.array([0.0, 0.0, 9.0])), [1.0, 2.0, 9.0])
    with pytest.raises(InvalidParameterError, match="covers 1 of the model's 3 genes"):
        map_profile({"TP53": 1.0}, ["TP53", "EGFR", "KRAS"], min_coverage=0.5)


def test_gene_ids_are_normalised() -> None:
    assert normalize_gene_id("ENSG00000141510.17") == "ENSG00000141510"
    assert normalize_gene_id("tp53|7157") == "TP53"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"Gene,Value\nTP53,high\n", "not a number"),
        (b"Gene,Value\nTP53,nan\n", "not finite"),
        (b"Gene,Value\nTP53,inf\n", "not finite"),
        (b"Gene,Value\nTP53,1e39\n", "not finite"),  # inf in float32: every output was NaN
        (b"Gene,Value\nTP53,1_000\n", "not a number"),  # Python's float() took it as 1000
        (b"Gene,Value\n<script>,1\n", "not a gene identifier"),
        (b"a,b,c\n1,2,3\n", "format not recognised"),
        (b"\xff\xfe\x00bad", "not UTF-8"),
        (GDC.replace("35.5", "-1").encode(), "negative"),
    ],
)
def test_bad_profiles_get_a_reason_without_the_value(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidParameterError, match=reason) as err:
        read_profile(data)
    assert "high" not in str(err.value) and "-1" not in str(err.value)


def test_oversized_profile_is_refused() -> None:
    with pytest.raises(InvalidParameterError, match="larger than"):
        read_profile(b"G,1\n" * (9 * 1024 * 1024))
    with pytest.raises(InvalidParameterError, match="more than"):
        read_profile("".join(f"G{i},1\n" for i in range(100_020)))


def test_a_gene_named_twice_in_a_gene_value_file_is_refused(tmp_path: Path) -> None:
    """Which of two values was meant cannot be guessed (the JSON form refuses it too); ids that normalise to one
    gene count as the same gene. A GDC table's repeated symbols keep their larger TPM (test above)."""
    with pytest.raises(InvalidParameterError, match=r"RNA row 4: gene listed twice \(rows 2 and 4"):
        read_profile(b"Gene,Value\nTP53,1.0\nEGFR,2.0\ntp53,3.0\n")
    with pytest.raises(InvalidParameterError, match=r"rows 2 and 3"):
        read_profile("Gene,Index,Value\nENSG00000141510.17,0,1\nENSG00000141510.18,1,2\n")
    assert read_profile(RSEM + "TP53|9999\t1.0\n")["TP53"] == pytest.approx(math.log1p(812.5))
    p = tmp_path / "rna.csv"
    p.write_text("gene,case-1,case-2\nTP53,1.0,2.0\nEGFR,1,1\nTP53,5.0,6.0\n")
    with pytest.raises(InvalidParameterError, match=r"gene listed twice \(rows 2 and 4\)"):
        read_matrix(p)
    p.write_text("gene,case-1,case-1\nTP53,1.0,2.0\n")
    with pytest.raises(InvalidParameterError, match="more than one column"):
        read_matrix(p)


def test_errors_name_the_line_an_editor_shows_and_a_missing_first_value_is_not_a_header() -> None:
    """Row numbers in errors skipped comment and summary rows (a bad value on line 26 of a GDC table was reported
    as row 21); a headerless Gene,Value file whose first value was NA had that row taken for a header, and the
    gene silently imputed, where NA on any other row is refused."""
    lines = GDC.splitlines()
    bad = len(lines)  # the last line, after the comment and N_* rows
    with pytest.raises(InvalidParameterError, match=rf"RNA row {bad}: the value is not a number"):
        cells = lines[-1].split("\t")
        cells[6] = "high"  # tpm_unstranded
        read_profile("\n".join([*lines[:-1], "\t".join(cells)]).encode())
    with pytest.raises(InvalidParameterError, match="RNA row 1: the value is not a number"):
        read_profile(b"TP53,NA\nEGFR,2.5\n")
    assert read_profile(b"Gene,Value\nTP53,1.5\n") == {"TP53": 1.5}
