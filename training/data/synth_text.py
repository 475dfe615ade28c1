"""Free-text surgical pathology reports for the synthetic cohort.

Three layouts (narrative with gross description, CAP-like synoptic, brief diagnosis line) x synonyms x
optional fields. Grade, pT/pN, lymphovascular invasion, margins and necrosis/TIL comments are drawn from the
case latents, so the report carries the risk (and the cancer type) partially: the histologic type is sometimes
omitted ("see comment"), squamous carcinomas of lung and head & neck differ only by site, the site is
sometimes missing, and a fraction of reports carries OCR-like character noise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SITES = {
    "LUSC": (
        [
            "Lung, right upper lobe",
            "Lung, left lower lobe",
            "Right lower lobe of lung",
            "Left upper lobe, lung",
            "Lung, right middle lobe",
        ],
        ["lobectomy", "wedge resection", "pneumonectomy", "segmentectomy"],
    ),
    "HNSC": (
        [
            "Oral tongue, left lateral",
            "Floor of mouth",
            "Larynx",
            "Right tonsil",
            "Base of tongue",
            "Buccal mucosa, right",
        ],
        [
            "partial glossectomy",
            "composite resection",
            "total laryngectomy",
            "wide local excision",
            "radical tonsillectomy",
        ],
    ),
    "COAD": (
        ["Sigmoid colon", "Right colon", "Ascending colon", "Cecum", "Transverse colon", "Descending colon"],
        [
            "segmental resection",
            "right hemicolectomy",
            "left hemicolectomy",
            "sigmoidectomy",
            "low anterior resection",
        ],
    ),
    "BRCA": (
        ["Left breast", "Right breast", "Breast, left, upper outer quadrant", "Breast, right, 10 o'clock"],
        ["lumpectomy", "partial mastectomy", "total mastectomy", "modified radical mastectomy"],
    ),
}
HISTOLOGY = {
    "LUSC": [
        "squamous cell carcinoma",
        "keratinizing squamous cell carcinoma",
        "non-small cell carcinoma, squamous type",
        "invasive squamous cell carcinoma of lung",
    ],
    "HNSC": [
        "squamous cell carcinoma",
        "invasive keratinizing squamous cell carcinoma",
        "squamous cell carcinoma, conventional type",
        "invasive squamous cell carcinoma",
    ],
    "COAD": [
        "adenocarcinoma",
        "invasive adenocarcinoma",
        "adenocarcinoma, colonic type",
        "adenocarcinoma with focal mucinous features",
        "invasive colonic adenocarcinoma",
    ],
    "BRCA": [
        "invasive ductal carcinoma",
        "infiltrating ductal carcinoma",
        "invasive carcinoma of no special type",
        "invasive mammary carcinoma, ductal type",
        "invasive breast carcinoma (NST)",
    ],
}
GRADE_WORDS = {
    1: ["well differentiated", "well-differentiated"],
    2: ["moderately differentiated"],
    3: ["poorly differentiated", "poorly-differentiated"],
}
MARGIN_NAMES = {
    "LUSC": "bronchial, vascular and parenchymal",
    "HNSC": "mucosal and deep soft tissue",
    "COAD": "proximal, distal and radial (circumferential)",
    "BRCA": "anterior, posterior and lateral",
}
TYPO_MAP = {"a": "o", "e": "c", "i": "l", "l": "1", "o": "0", "m": "rn", "n": "ri", "s": "5", "t": "f"}


@dataclass
class ReportFacts:
    """What the report states (and whether it states it), kept in truth.json."""

    grade: int
    pT: int
    pN: int
    nodes_positive: int
    nodes_examined: int
    size_cm: float
    lvi: bool
    margin_positive: bool
    type_stated: bool
    site_stated: bool
    grade_stated: bool
    stage_stated: bool
    typos: int
    layout: str


def _pick(rng: np.random.Generator, items: list[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _grade_phrase(rng: np.random.Generator, ct: str, g: int) -> str:
    if ct == "BRCA":
        tub = int(np.clip(g + rng.integers(0, 2), 1, 3))
        nuc = int(np.clip(g + rng.integers(-1, 1), 1, 3))
        mit = int(np.clip(g - rng.integers(0, 2), 1, 3))
        score = tub + nuc + mit
        return f"Nottingham histologic grade {g} (tubules {tub}, nuclei {nuc}, mitoses {mit}; {score}/9)"
    if ct == "COAD" and rng.random() < 0.4:
        return "high grade" if g == 3 else "low grade"
    w = _pick(rng, GRADE_WORDS[g])
    return w if rng.random() < 0.5 else f"{w} (G{g})"


def _typos(rng: np.random.Generator, text: str, n: int) -> str:
    chars = list(text)
    letters = [i for i, c in enumerate(chars) if c.lower() in TYPO_MAP]
    for i in rng.choice(letters, size=min(n, len(letters)), replace=False) if letters else []:
        c = chars[i]
        r = TYPO_MAP[c.lower()]
        chars[i] = r.upper() if c.isupper() else r
    return "".join(chars)


def make_report(
    rng: np.random.Generator,
    ct: str,
    risk: float,
    immune: float,
    necrosis: float,
    grade_latent: float,
) -> tuple[str, ReportFacts]:
    """One report; `necrosis` is the tumour-necrosis share of the case's tissue (0..1), `grade_latent` the
    case's continuous grade (1..3) that the slides also render, read by the pathologist with some error."""
    z = 0.75 * (risk + rng.normal(0, 0.6))  # the report's own view of the risk (stage, nodes, LVI)
    grade = int(np.clip(round(grade_latent + rng.normal(0, 0.3)), 1, 3))
    pT = int(np.clip(np.digitize(z + rng.normal(0, 0.7), [-0.8, 0.1, 0.9]) + 1, 1, 4))
    nodes_exam = int(rng.integers(6, 31))
    nodes_pos = int(min(nodes_exam, rng.poisson(np.exp(1.2 * z - 0.6))))
    pN = 0 if nodes_pos == 0 else (1 if nodes_pos <= 3 else 2)
    size = float(np.clip(rng.lognormal(np.log(2.5) + 0.33 * z, 0.35), 0.4, 12.0))
    lvi = bool(rng.random() < 1 / (1 + np.exp(-(1.4 * z - 0.8))))
    margin_pos = bool(rng.random() < 1 / (1 + np.exp(-(1.0 * z - 2.4))))
    type_stated = bool(rng.random() > 0.1)
    site_stated = bool(rng.random() > 0.1)
    grade_stated = bool(rng.random() > 0.12)
    stage_stated = bool(rng.random() > 0.15)
    sites, procs = SITES[ct]
    site, proc = _pick(rng, sites), _pick(rng, procs)
    specimen = (
        f"{site}, {proc}" if site_stated else f"Tissue, {_pick(rng, ['resection', 'excision', 'surgical resection'])}"
    )
    histo = (
        _pick(rng, HISTOLOGY[ct])
        if type_stated
        else _pick(rng, ["carcinoma, see comment", "malignant neoplasm, see comment", "invasive carcinoma"])
    )
    gp = _grade_phrase(rng, ct, grade)
    t_pref = _pick(rng, ["p", "p", "yp"]) if rng.random() < 0.1 else "p"
    stage = f"{t_pref}T{pT}{_pick(rng, ['', 'a', 'b']) if pT < 4 else ''} N{pN} MX"
    nodes = (
        _pick(
            rng,
            [
                f"Metastatic carcinoma in {nodes_pos} of {nodes_exam} lymph nodes ({nodes_pos}/{nodes_exam})",
                f"{nodes_pos}/{nodes_exam} lymph nodes positive for metastatic carcinoma",
                f"Lymph nodes: {nodes_pos} positive out of {nodes_exam} examined",
            ],
        )
        if nodes_pos
        else _pick(
            rng,
            [
                f"{nodes_exam} lymph nodes, negative for malignancy (0/{nodes_exam})",
                f"No metastatic carcinoma identified in {nodes_exam} lymph nodes (0/{nodes_exam})",
            ],
        )
    )
    margins = (
        f"{MARGIN_NAMES[ct].capitalize()} margins: involved by carcinoma"
        if margin_pos
        else _pick(
            rng,
            [
                f"All margins are free of tumor; closest margin {rng.uniform(0.1, 2.5):.1f} cm",
                f"Resection margins negative ({MARGIN_NAMES[ct]})",
                "Margins uninvolved by invasive carcinoma",
            ],
        )
    )
    lvi_s = (
        _pick(rng, ["Lymphovascular invasion: present", "Angiolymphatic invasion is identified"])
        if lvi
        else _pick(rng, ["Lymphovascular invasion: not identified", "No lymphovascular invasion seen"])
    )
    comments = []
    if necrosis > 0.06:
        comments.append(
            _pick(
                rng,
                [
                    "Extensive tumor necrosis is present.",
                    "Tumor shows geographic necrosis.",
                    "Areas of comedo-type necrosis are noted.",
                ],
            )
        )
    elif necrosis > 0.025 and rng.random() < 0.6:
        comments.append("Focal tumor necrosis is present.")
    if immune > 0.8:
        comments.append(
            _pick(
                rng,
                [
                    "Brisk tumor-infiltrating lymphocytes are present.",
                    "Prominent peritumoral lymphoid infiltrate.",
                ],
            )
        )
    elif immune < -0.8 and rng.random() < 0.5:
        comments.append("Tumor-infiltrating lymphocytes are sparse.")
    if not type_stated:
        comments.append(
            _pick(
                rng,
                [
                    "Immunohistochemical stains are pending; an addendum will follow.",
                    "The morphology is that of a primary carcinoma; see synoptic report.",
                    "Classification deferred to the tumor board.",
                ],
            )
        )
    if ct == "BRCA" and rng.random() < 0.7:
        comments.append(
            f"ER {_pick(rng, ['positive (95%)', 'positive (80%)', 'negative (<1%)'])}, "
            f"HER2 {_pick(rng, ['negative (1+)', 'equivocal (2+), FISH pending', 'negative (0)'])}."
        )
    if ct == "HNSC" and rng.random() < 0.6:
        comments.append(f"p16 immunostain: {_pick(rng, ['positive (block-type)', 'negative'])}.")
    if ct == "COAD" and rng.random() < 0.6:
        comments.append(
            "Mismatch repair proteins (MLH1, PMS2, MSH2, MSH6): "
            f"{_pick(rng, ['intact', 'intact', 'loss of MLH1 and PMS2'])}."
        )
    if rng.random() < 0.05:  # misleading history: an imperfect type signal
        other = _pick(rng, [c for c in SITES if c != ct])
        comments.append(f"Clinical history of {_pick(rng, HISTOLOGY[other])} noted.")

    layout = _pick(rng, ["narrative", "synoptic", "brief"])
    lines: list[str | None] = []
    if layout == "narrative":
        lines += ["SURGICAL PATHOLOGY REPORT", "", f"SPECIMEN: {specimen}.", ""]
        lines += [
            _pick(rng, ["GROSS DESCRIPTION:", "GROSS:"]),
            f"Received fresh is a {proc if site_stated else 'resection'} specimen with a firm "
            f"{_pick(rng, ['tan-white', 'gray-white', 'tan-pink'])} mass measuring {size:.1f} x "
            f"{size * rng.uniform(0.5, 0.95):.1f} cm. Representative sections submitted.",
            "",
        ]
        lines += [
            _pick(rng, ["FINAL DIAGNOSIS:", "DIAGNOSIS:", "PATHOLOGIC DIAGNOSIS:"]),
            f"{specimen.upper()}:",
            f"- {histo[0].upper() + histo[1:]}" + (f", {gp}." if grade_stated else "."),
        ]
        lines += [
            f"- Tumor size: {size:.1f} cm in greatest dimension." if rng.random() < 0.7 else None,
            f"- {lvi_s}.",
            f"- {margins}.",
            f"- {nodes}.",
        ]
        if stage_stated:
            lines.append(f"- Pathologic stage: {stage}.")
    elif layout == "synoptic":
        lines += [
            "SYNOPTIC REPORT",
            f"Procedure: {proc if site_stated else 'resection'}",
            f"Tumor site: {site if site_stated else 'not specified'}",
            f"Histologic type: {histo}",
        ]
        if grade_stated:
            lines.append(f"Histologic grade: {gp}")
        lines += [
            f"Tumor size: {size:.1f} cm",
            f"Lymphovascular invasion: {'present' if lvi else 'not identified'}",
            f"Margins: {'positive' if margin_pos else 'negative'}",
            f"Regional lymph nodes: {nodes_pos}/{nodes_exam}",
        ]
        if stage_stated:
            lines.append(f"Pathologic staging (AJCC 8th): {stage}")
    else:
        lines += [
            f"DIAGNOSIS: {specimen}: {histo}" + (f", {gp}" if grade_stated else "") + ".",
            f"{nodes}. {margins}." + (f" {stage}." if stage_stated else ""),
        ]
    if comments:
        lines += ["", f"{_pick(rng, ['COMMENT:', 'NOTE:', 'Comment:'])} {' '.join(comments)}"]
    text = "\n".join(line for line in lines if line is not None)
    if rng.random() < 0.35:
        text = text.upper()
    n_typos = int(rng.integers(1, 4)) if rng.random() < 0.2 else 0
    if n_typos:
        text = _typos(rng, text, n_typos)
    facts = ReportFacts(
        grade,
        pT,
        pN,
        nodes_pos,
        nodes_exam,
        round(size, 2),
        lvi,
        margin_pos,
        type_stated,
        site_stated,
        grade_stated,
        stage_stated,
        n_typos,
        layout,
    )
    return text.strip() + "\n", facts
