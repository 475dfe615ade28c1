"""Procedural H&E whole-slide rendering for the synthetic cohort.

A slide is defined by a few smooth random *fields* on a low-resolution grid (`LABEL_MPP` µm/px). A per-cancer-
type *rule* turns fields into tissue labels (tumour, stroma, lymphocytes, necrosis, fat, lumen, glass); the
same rule applied to the bilinearly upsampled fields gives smooth level-0 boundaries, so the low-res label
mask written to `truth/` is the ground truth of what is drawn. Level 0 is rendered in horizontal bands: every
random texture, nucleus and fat-cell seed comes from a generator keyed by (slide, purpose, row chunk), so a
band can be rendered alone with identical pixels to a whole-image render — memory stays bounded for large
slides.

Colour is produced in stain space (haematoxylin / eosin concentrations -> optical density -> RGB) with a
random stain matrix per slide, and the mean tissue optical density is scaled to a per-slide target drawn
independently of the cancer type: global colour carries scanner/site variation only, never the class."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np

# Class indices of the label masks (documented in truth.json and the README).
CLASSES: tuple[str, ...] = ("background", "tumour", "stroma", "lymphocytes", "necrosis", "fat", "lumen")
BG, TUM, STR, LYM, NEC, FAT, LUM = range(7)
KER = 7  # render-only sub-class of tumour: keratin pearls (labelled tumour in the truth)
LABEL_MPP = 4.0  # µm per label-mask pixel
CHUNK = 128  # rows per random chunk (level-0 pixels); bands are multiples of it

CANCER_TYPES: tuple[str, ...] = ("LUSC", "COAD", "HNSC", "BRCA")
# Context cohorts (`SynthConfig.context`): every type draws its tumour cells from the same pool of four
# cytologies (the four types' own cells, index -> whose cells) under one shared tissue rule, so a patch alone
# cannot tell the type; the type is carried only by which cytologies co-occur on a slide. Each type's marginal
# share of every cytology is 1/4: LUSC slides hold all four, the other types one of two complementary pairs.
CYTOLOGIES: tuple[str, ...] = CANCER_TYPES
CONTEXT_SETS: dict[str, tuple[tuple[int, ...], ...]] = {
    "LUSC": ((0, 1, 2, 3),),
    "COAD": ((0, 1), (2, 3)),
    "HNSC": ((0, 2), (1, 3)),
    "BRCA": ((0, 3), (1, 2)),
}
CLONE0 = 8  # render-only sub-classes of tumour in context cohorts: CLONE0 + cytology index
CLONE_SCALE_UM = 40.0  # correlation length of the fields that split tumour into clone territories
CONTEXT_ARRANGEMENT = (
    "context cohort: one tissue rule (tumour nests, necrosis, lymphocytes, fat) for every type; tumour cells "
    "from a shared pool of four cytologies in clone territories; the type is which cytologies co-occur: "
    + "; ".join(
        f"{ct}: " + " or ".join("+".join(CYTOLOGIES[k] + "-like" for k in grp) for grp in sets)
        for ct, sets in CONTEXT_SETS.items()
    )
)
ARRANGEMENT = {
    "LUSC": "solid tumour nests with central keratinisation/necrosis in desmoplastic stroma",
    "COAD": "glands: tumour epithelium in rings around lumens, dirty luminal necrosis",
    "HNSC": "irregular tumour nests with a dense peritumoral lymphocytic infiltrate",
    "BRCA": "thin infiltrative tumour cords (small round monotonous nuclei) with patchy necrosis",
}

# Standard-ish optical-density stain vectors (R, G, B) for haematoxylin and eosin (Macenko-like reference).
_H_VEC = np.array([0.56, 0.72, 0.41], np.float32)
_E_VEC = np.array([0.22, 0.80, 0.56], np.float32)
_OD_SCALE = 1.3


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length ~sigma pixels (coarse grid + cubic
    upsampling for large sigma, so the cost does not grow with the blur)."""
    k = max(1.0, sigma / 3.0)
    hs, ws = int(np.ceil(shape[0] / k)) + 1, int(np.ceil(shape[1] / k)) + 1
    s = sigma / k
    pad = int(3 * s) + 1
    white = rng.standard_normal((hs + 2 * pad, ws + 2 * pad)).astype(np.float32)
    f = cv2.GaussianBlur(white, (0, 0), max(s, 0.3))[pad:-pad, pad:-pad]
    if k > 1:
        f = cv2.resize(f, (int(np.ceil(ws * k)), int(np.ceil(hs * k))), interpolation=cv2.INTER_CUBIC)
    f = np.ascontiguousarray(f[: shape[0], : shape[1]])
    return (f - f.mean()) / (f.std() + 1e-8)


def _q(x: np.ndarray, mask: np.ndarray, frac: float) -> float:
    """Threshold so that `frac` of the masked pixels of `x` lie above it."""
    v = x[mask]
    if v.size == 0:
        return float("inf")
    return float(np.quantile(v, 1.0 - float(np.clip(frac, 0.0, 1.0))))


@dataclass
class SlideLayout:
    """Low-res fields + thresholds; `labels(fields)` works at any resolution (low-res truth, level-0 band)."""

    cancer_type: str
    fields: dict[str, np.ndarray]
    thr: dict[str, float]
    grade: float  # 1..3, continuous: drives nuclear size, darkness, pleomorphism, mitoses
    clones: tuple[int, ...] = ()  # context cohorts: the cytologies of this slide's tumour (empty: by type)

    def labels(self, f: dict[str, np.ndarray], detail: bool = False) -> np.ndarray:
        """Class indices; `detail` also marks keratin pearls (KER) inside tumour and, in context cohorts, each
        tumour pixel's cytology (CLONE0 + index), for rendering only."""
        t, ct = self.thr, self.cancer_type
        tissue = f["tissue"] > t["tissue"]
        lab = np.full(tissue.shape, STR, np.uint8)
        if self.clones:  # context cohort: the same rule for every type
            tum = f["nest"] > t["tum"]
            lab[tum] = TUM
            lab[tum & (f["nest"] > t["nec"])] = NEC
            lab[(~tum) & (f["lym"] > t["lym"])] = LYM
        elif ct in ("LUSC", "HNSC"):
            tum = f["nest"] > t["tum"]
            lab[tum] = TUM
            lab[tum & (f["nest"] > t["nec"])] = NEC
            near = f.get("prox", 0.0)
            lym = (~tum) & (f["lym"] + near > t["lym"])
            lab[lym] = LYM
        elif ct == "COAD":
            zone = f["zone"] > t["zone"]
            epi = zone & (f["gland"] > t["epi"])
            lab[epi] = TUM
            lum = epi & (f["gland"] > t["lum"])
            lab[lum] = LUM
            lab[lum & (f["nec"] > t["nec"])] = NEC
            lab[(~zone) & (f["lym"] > t["lym"])] = LYM
        elif ct == "BRCA":
            zone = f["zone"] > t["zone"]
            lab[zone & (np.abs(f["cord"]) < t["cord"])] = TUM
            lab[zone & (f["nec"] > t["nec"])] = NEC
            lab[(lab == STR) & (f["lym"] > t["lym"])] = LYM
        else:  # pragma: no cover - guarded by make_layout
            raise ValueError(ct)
        # fat lobules of any specimen: the same share distribution for every type, so the amount of white
        # space inside the tissue says nothing about the class
        lab[f["fat"] > t["fat"]] = FAT
        lab[~tissue] = BG
        if detail and "ker" in f:
            lab[(lab == TUM) & (f["ker"] > t["ker"])] = KER
        if detail and self.clones:
            tum = lab == TUM
            lab[tum] = CLONE0 + np.asarray(self.clones, np.uint8)[self.clone_index(f)[tum]]
        return lab

    def clone_index(self, f: dict[str, np.ndarray]) -> np.ndarray:
        """Index into `clones` of the territory each pixel lies in (argmax of one smooth field per clone)."""
        return np.argmax(np.stack([f[f"clone{k}"] for k in range(len(self.clones))]), 0).astype(np.uint8)


def make_layout(
    rng: np.random.Generator,
    shape_lr: tuple[int, int],
    cancer_type: str,
    risk: float,
    immune: float,
    stroma: float,
    grade: float,
    clones: tuple[int, ...] = (),
) -> SlideLayout:
    """Fields and thresholds for one slide. Risk raises tumour and necrosis share; immune raises TILs; stroma
    (desmoplasia) lowers the tumour share; `grade` (1..3, the case's) sets nuclear size, darkness and
    pleomorphism. `clones` (context cohorts): the slide's tumour cytologies; the tissue rule is then the same
    for every type."""
    h, w = shape_lr
    um = 1.0 / LABEL_MPP  # label px per µm
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h / 2 + rng.normal(0, h * 0.05), w / 2 + rng.normal(0, w * 0.05)
    ry, rx = h * rng.uniform(0.3, 0.52), w * rng.uniform(0.3, 0.52)
    d2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    env = 1.6 * (1.0 - d2) + 0.45 * _smooth_noise(rng, shape_lr, 120 * um)
    # texture fields shared by all types: fibre direction and coarse staining unevenness
    f: dict[str, np.ndarray] = {
        "tissue": env,
        "angle": _smooth_noise(rng, shape_lr, 25 * um),
        "coarse": _smooth_noise(rng, shape_lr, 8 * um),
    }
    thr: dict[str, float] = {"tissue": 0.0}
    tissue = env > 0.0
    noise = lambda s: rng.normal(0, s)  # noqa: E731
    risk = risk + noise(0.6)  # each slide shows the risk through its own noise
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    if cancer_type not in CANCER_TYPES:
        raise ValueError(f"unknown cancer type {cancer_type!r}; known: {', '.join(CANCER_TYPES)}")
    if clones:
        # one rule for every type: the nest, necrosis and lymphocyte shares follow risk and immune exactly as
        # in the nest types, and nothing in it depends on the type
        f["nest"] = _smooth_noise(rng, shape_lr, 40 * um)
        f["lym"] = _smooth_noise(rng, shape_lr, 25 * um)
        ft = sig(-0.3 + 0.45 * risk - 0.25 * stroma + noise(0.3))
        thr["tum"] = _q(f["nest"], tissue, ft)
        thr["nec"] = _q(f["nest"], tissue, ft * sig(-2.6 + 0.9 * risk + noise(0.3)))
        stroma_mask = tissue & (f["nest"] <= thr["tum"])
        thr["lym"] = _q(f["lym"], stroma_mask, sig(-1.6 + 0.8 * immune - 0.3 * risk + noise(0.3)))
        for k in range(len(clones)):
            f[f"clone{k}"] = _smooth_noise(rng, shape_lr, CLONE_SCALE_UM * um)
    elif cancer_type in ("LUSC", "HNSC"):
        scale = 55 if cancer_type == "LUSC" else 30
        f["nest"] = _smooth_noise(rng, shape_lr, scale * um)
        if cancer_type == "LUSC":  # keratin pearls scattered in the nests
            f["ker"] = _smooth_noise(rng, shape_lr, 9 * um)
            thr["ker"] = 1.6
        f["lym"] = _smooth_noise(rng, shape_lr, 25 * um)
        ft = sig(-0.3 + 0.45 * risk - 0.25 * stroma + noise(0.3))
        thr["tum"] = _q(f["nest"], tissue, ft)
        fn = sig(-2.6 + 0.9 * risk + noise(0.3)) * (0.6 if cancer_type == "HNSC" else 1.0)
        thr["nec"] = _q(f["nest"], tissue, ft * fn)
        if cancer_type == "HNSC":
            tum_lr = (f["nest"] > thr["tum"]).astype(np.float32)
            prox = cv2.GaussianBlur(tum_lr, (0, 0), 30 * um)
            f["prox"] = 2.5 * prox
            fl = sig(0.6 + 0.8 * immune - 0.3 * risk + noise(0.3)) * 0.8
        else:
            fl = sig(-3.0 + 0.8 * immune - 0.3 * risk + noise(0.3))
        stroma_mask = tissue & (f["nest"] <= thr["tum"])
        extra = f.get("prox", 0.0)
        thr["lym"] = _q(f["lym"] + extra, stroma_mask, fl)
    elif cancer_type == "COAD":
        f["zone"] = _smooth_noise(rng, shape_lr, 90 * um)
        f["gland"] = _smooth_noise(rng, shape_lr, 18 * um)
        f["nec"] = _smooth_noise(rng, shape_lr, 12 * um)
        f["lym"] = _smooth_noise(rng, shape_lr, 25 * um)
        fz = sig(0.6 + 0.5 * risk - 0.25 * stroma + noise(0.3))
        thr["zone"] = _q(f["zone"], tissue, fz)
        zone = tissue & (f["zone"] > thr["zone"])
        # poorly differentiated (high risk) -> more epithelium, fewer lumens
        fe = float(np.clip(0.55 + 0.08 * risk + noise(0.05), 0.35, 0.8))
        thr["epi"] = _q(f["gland"], zone, fe)
        fl_share = float(np.clip(0.4 - 0.12 * (grade - 2) + noise(0.05), 0.12, 0.6))
        thr["lum"] = _q(f["gland"], zone, fe * fl_share)
        lum = zone & (f["gland"] > thr["lum"])
        thr["nec"] = _q(f["nec"], lum, sig(-1.4 + 0.9 * risk + noise(0.3)))
        thr["lym"] = _q(f["lym"], tissue & ~zone, sig(-2.8 + 0.8 * immune + noise(0.3)))
    elif cancer_type == "BRCA":
        f["zone"] = _smooth_noise(rng, shape_lr, 90 * um)
        f["cord"] = _smooth_noise(rng, shape_lr, 14 * um)
        f["nec"] = _smooth_noise(rng, shape_lr, 35 * um)
        f["lym"] = _smooth_noise(rng, shape_lr, 25 * um)
        thr["zone"] = _q(f["zone"], tissue, sig(0.3 + 0.45 * risk + noise(0.3)))
        zone = tissue & (f["zone"] > thr["zone"])
        thr["cord"] = float(np.clip(0.35 + 0.12 * risk + noise(0.05), 0.15, 0.75))
        thr["nec"] = _q(f["nec"], zone, sig(-2.4 + 0.9 * risk + noise(0.3)))
        thr["lym"] = _q(f["lym"], tissue & ~zone, sig(-2.6 + 0.8 * immune + noise(0.3)))
    else:
        raise ValueError(f"unknown cancer type {cancer_type!r}; known: {', '.join(CANCER_TYPES)}")
    f["fat"] = _smooth_noise(rng, shape_lr, 45 * um)
    thr["fat"] = _q(f["fat"], tissue, min(0.45, sig(-1.6 - 0.2 * stroma + noise(0.6))))
    return SlideLayout(cancer_type, f, thr, float(np.clip(grade, 1.0, 3.0)), tuple(clones))


def clone_mask(layout: SlideLayout) -> np.ndarray:
    """Context cohorts' cytology truth at `LABEL_MPP` µm/px: 0 off tumour, else 1 + the cytology index."""
    lab = layout.labels(layout.fields)
    out = np.zeros(lab.shape, np.uint8)
    if layout.clones:
        tum = lab == TUM
        out[tum] = 1 + np.asarray(layout.clones, np.uint8)[layout.clone_index(layout.fields)[tum]]
    return out


def proportions(labels: np.ndarray) -> dict[str, float]:
    """Share of each class among tissue pixels (glass excluded)."""
    tissue = labels != BG
    n = max(int(tissue.sum()), 1)
    return {name: round(float((labels == i).sum()) / n, 6) for i, name in enumerate(CLASSES) if i != BG}


# ----------------------------------------------------------------------------------------------------
# Stain / scanner model


@dataclass
class Stain:
    """Per-slide stain + scanner appearance; drawn independently of the class."""

    h_vec: np.ndarray
    e_vec: np.ndarray
    gain: np.ndarray  # per RGB channel multiplier on optical density
    glass: np.ndarray  # RGB of empty glass
    blur: float  # scanner point-spread sigma, px
    noise: float  # sensor noise, grey levels
    jpeg_quality: int
    target: np.ndarray  # mean tissue transmittance per RGB channel (class-independent draw)

    def to_json(self) -> dict:
        r = lambda a: [round(float(x), 5) for x in a]  # noqa: E731
        return {
            "h_vec": r(self.h_vec),
            "e_vec": r(self.e_vec),
            "od_gain": r(self.gain),
            "glass_rgb": r(self.glass),
            "blur_px": round(self.blur, 4),
            "noise": round(self.noise, 4),
            "jpeg_quality": self.jpeg_quality,
            "target_tissue_transmittance": r(self.target),
        }


def make_stain(rng: np.random.Generator) -> Stain:
    """Random stain vectors, scanner blur/noise and a target mean tissue transmittance per RGB channel, all
    drawn without looking at the class; `SlideRenderer` then sets the OD gain that reaches the target."""

    def jitter(v: np.ndarray) -> np.ndarray:
        u = np.clip(v + rng.normal(0, 0.06, 3), 0.05, None).astype(np.float32)
        return u / np.linalg.norm(u)

    h_vec = jitter(_H_VEC) * rng.uniform(0.8, 1.25)
    e_vec = jitter(_E_VEC) * rng.uniform(0.8, 1.25)
    target = np.array([0.70, 0.42, 0.60]) * np.exp(rng.normal(0, 0.08) + rng.normal(0, 0.04, 3))
    glass = np.clip(np.array([244, 242, 245]) + rng.normal(0, 4, 3), 225, 252).astype(np.float32)
    return Stain(
        h_vec.astype(np.float32),
        e_vec.astype(np.float32),
        np.ones(3, np.float32),
        glass,
        float(rng.uniform(0.35, 0.9)),
        float(rng.uniform(1.0, 3.0)),
        int(rng.integers(75, 92)),
        np.clip(target, 0.3, 0.85).astype(np.float32),
    )


# ----------------------------------------------------------------------------------------------------
# Level-0 rendering in bands


@dataclass
class _NucleusClass:
    density: float  # nuclei per µm²
    a: tuple[float, float]  # semi-major axis range, µm
    ratio: tuple[float, float]  # minor/major
    intensity: tuple[float, float]  # haematoxylin concentration


@dataclass
class SlideRenderer:
    """Renders level 0 of one slide band by band; identical pixels whatever the band split."""

    layout: SlideLayout
    stain: Stain
    width: int
    height: int
    mpp: float
    key: tuple[int, ...]  # entropy for per-chunk generators
    _nuc: dict[int, _NucleusClass] = field(init=False)
    _nuc_cache: dict[int, list] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        g = self.layout.grade
        # tumour cytology per type: squamous = large nuclei, abundant cytoplasm (LUSC) or basaloid (HNSC);
        # colonic = crowded elongated (columnar) nuclei; breast = small monotonous round nuclei in cords
        cyto = {
            "LUSC": (1 / (190 - 20 * g), (3.4 + 0.5 * g, 4.2 + 1.1 * g), (0.6, 0.95)),
            "HNSC": (1 / (110 - 12 * g), (2.8 + 0.5 * g, 3.4 + 1.0 * g), (0.6, 0.95)),
            "COAD": (1 / (95 - 10 * g), (3.4 + 0.5 * g, 4.4 + 1.0 * g), (0.3, 0.5)),
            "BRCA": (1 / (120 - 12 * g), (2.4 + 0.35 * g, 3.0 + 0.7 * g), (0.75, 1.0)),
        }
        tum_inten = (0.75 + 0.12 * g, 1.0 + 0.2 * g)
        density, size, ratio = cyto[self.layout.cancer_type]
        self._nuc = {
            TUM: _NucleusClass(density, size, ratio, tum_inten),
            KER: _NucleusClass(1 / 1500, (3.0, 4.5), (0.2, 0.35), (0.7, 1.0)),
            STR: _NucleusClass(1 / 900, (4.0, 6.5), (0.18, 0.3), (0.9, 1.2)),
            LYM: _NucleusClass(1 / 42, (2.4, 3.2), (0.85, 1.0), (1.4, 1.8)),
            NEC: _NucleusClass(1 / 55, (0.6, 1.6), (0.5, 1.0), (0.6, 1.3)),
            FAT: _NucleusClass(1 / 6000, (3.5, 5.0), (0.25, 0.4), (0.8, 1.0)),
            LUM: _NucleusClass(1 / 3000, (0.8, 2.0), (0.5, 1.0), (0.4, 0.9)),
        }
        if self.layout.clones:  # context cohort: each clone territory has one of the four types' cells
            for k, name in enumerate(CYTOLOGIES):
                self._nuc[CLONE0 + k] = _NucleusClass(*cyto[name], tum_inten)
            self._nuc[TUM] = _NucleusClass(*cyto[CYTOLOGIES[0]], tum_inten)  # never drawn: tumour is clones
        # classes:       BG     TUM   STR   LYM   NEC   FAT   LUM   KER
        h0 = np.array([0.0, 0.14, 0.03, 0.12, 0.16, 0.0, 0.01, 0.02], np.float32)
        hm = np.array([0.0, 0.03, 0.0, 0.0, 0.06, 0.0, 0.0, 0.0], np.float32)
        e0 = np.array([0.012, 0.30, 0.58, 0.30, 0.50, 0.02, 0.04, 0.74], np.float32)
        em = np.array([0.0, 0.05, 0.0, 0.05, 0.12, 0.0, 0.0, 0.06], np.float32)
        ef = np.array([0.0, 0.0, 0.0, 0.0, 0.05, 0.0, 0.0, 0.06], np.float32)
        eb = np.array([0.0, 0.0, 0.14, 0.0, 0.0, 0.0, 0.0, 0.0], np.float32)
        ec = np.array([0.004, 0.02, 0.06, 0.0, 0.0, 0.0, 0.0, 0.0], np.float32)
        # tumour cytoplasm: eosinophilic in keratinising squamous (LUSC), scant/basophilic in basaloid HNSC
        cyto_he = {"LUSC": (0.07, 0.46), "HNSC": (0.17, 0.26), "COAD": (0.14, 0.30), "BRCA": (0.12, 0.33)}
        h0[TUM], e0[TUM] = cyto_he[self.layout.cancer_type]
        if self.layout.clones:  # rows CLONE0 + k: tumour of cytology k (same texture terms as TUM)
            h0[TUM], e0[TUM] = cyto_he[CYTOLOGIES[0]]  # never drawn: tumour pixels are clones
            h0, hm, e0, em, ef, eb, ec = (
                np.concatenate([a, np.repeat(a[TUM : TUM + 1], 4)]) for a in (h0, hm, e0, em, ef, eb, ec)
            )
            for k, name in enumerate(CYTOLOGIES):
                h0[CLONE0 + k], e0[CLONE0 + k] = cyto_he[name]
        self._lut = (h0, hm, e0, em, ef, eb, ec)
        self.stain.gain = self._calibrated_gain()

    def _calibrated_gain(self) -> np.ndarray:
        """Per-channel OD gain so that the expected mean tissue transmittance equals the stain's target.

        Fat excluded (it stays white like glass; its share is drawn the same way for every type): each class
        is a mixture of cytoplasm/matrix and nuclei (coverage from density x mean nuclear area, Poisson
        overlap); textures are zero-mean. Solving in transmittance (not OD) makes the mean RGB of
        cellular tissue independent of its composition."""
        h0, _, e0, *_ = self._lut
        props = proportions(label_mask(self.layout))
        parts: list[tuple[int, float]] = [(ci, props.get(name, 0.0)) for ci, name in enumerate(CLASSES)]
        if self.layout.clones:  # context cohort: tumour is its clones' mixture, so colour ignores the mixture
            cm = clone_mask(self.layout)
            n_tum = max(int((cm > 0).sum()), 1)
            parts = [(ci, p) for ci, p in parts if ci != TUM]
            parts += [(CLONE0 + k, props["tumour"] * float((cm == 1 + k).sum()) / n_tum) for k in range(4)]
        comps: list[tuple[float, float, float]] = []  # (weight, H, E)
        for ci, p in parts:
            if ci in (BG, FAT) or p <= 0:  # fat stays white, as glass does
                continue
            nc = self._nuc[ci]
            a2 = (nc.a[0] ** 2 + nc.a[0] * nc.a[1] + nc.a[1] ** 2) / 3
            cov = 1 - np.exp(-nc.density * np.pi * a2 * (nc.ratio[0] + nc.ratio[1]) / 2)
            inten = min(2.1, (nc.intensity[0] + nc.intensity[1]) / 2)
            comps += [
                (p * (1 - cov), float(h0[ci]), float(e0[ci])),
                (p * cov, inten, 0.8 * float(e0[ci]) + 0.12),
            ]
        w = np.array([c[0] for c in comps])
        w = w / w.sum()
        hh = np.array([c[1] for c in comps])
        ee = np.array([c[2] for c in comps])
        gain = np.ones(3, np.float32)
        for ch in range(3):
            od = _OD_SCALE * (hh * self.stain.h_vec[ch] + ee * self.stain.e_vec[ch])
            lo, hi = 0.5, 2.5
            for _ in range(40):  # mean transmittance decreases with the gain: bisection
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if float(w @ np.exp(-mid * od)) > self.stain.target[ch] else (lo, mid)
            gain[ch] = 0.5 * (lo + hi)
        return gain

    # -- deterministic per-chunk randomness -----------------------------------------------------------------
    def _rng(self, purpose: int, chunk: int) -> np.random.Generator:
        return np.random.default_rng([*self.key, purpose, chunk + 1_000_000])

    def _white(self, purpose: int, y0: int, y1: int) -> np.ndarray:
        """Zero-mean unit-variance white noise for rows [y0, y1) (rows outside the slide are defined too)."""
        c0, c1 = y0 // CHUNK, (y1 - 1) // CHUNK
        # uniform noise with unit variance: ~3x cheaper than normals and Gaussian enough once smoothed
        parts = [
            (self._rng(purpose, c).random((CHUNK, self.width), dtype=np.float32) - 0.5) * 3.4641
            for c in range(c0, c1 + 1)
        ]
        full = np.concatenate(parts, 0)
        return full[y0 - c0 * CHUNK : y1 - c0 * CHUNK]

    # -- fields ---------------------------------------------------------------------------------------------
    def _fields(self, xs: np.ndarray, ys: np.ndarray) -> dict[str, np.ndarray]:
        """Bilinear samples of the low-res fields at level-0 pixel centres (cv2.resize convention)."""
        any_f = next(iter(self.layout.fields.values()))
        sy, sx = any_f.shape[0] / self.height, any_f.shape[1] / self.width
        mx = ((xs + 0.5) * sx - 0.5).astype(np.float32)
        my = ((ys + 0.5) * sy - 0.5).astype(np.float32)
        return {
            k: cv2.remap(v, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            for k, v in self.layout.fields.items()
        }

    def fields_rows(self, y0: int, y1: int) -> dict[str, np.ndarray]:
        xs = np.broadcast_to(np.arange(self.width, dtype=np.float32)[None], (y1 - y0, self.width))
        ys = np.broadcast_to(np.arange(y0, y1, dtype=np.float32)[:, None], (y1 - y0, self.width))
        return self._fields(np.ascontiguousarray(xs), np.ascontiguousarray(ys))

    def labels_rows(self, y0: int, y1: int) -> np.ndarray:
        """Level-0 labels of rows [y0, y1): the rendered truth at full resolution."""
        return self.layout.labels(self.fields_rows(y0, y1))

    def _labels_at(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        if xs.size == 0:
            return np.zeros(0, np.uint8)
        f = self._fields(xs[None].astype(np.float32), ys[None].astype(np.float32))
        return self.layout.labels(f, detail=True)[0]

    # -- nuclei ---------------------------------------------------------------------------------------------
    def _nuclei(self, chunk: int) -> list[tuple[int, int, int, int, float, float, bool, int]]:
        """Nuclei centred in one chunk: (x, y, a_px, b_px, angle, intensity, vesicular, class); cached because
        neighbouring bands draw the same chunk's nuclei into their margins."""
        if chunk in self._nuc_cache:
            return self._nuc_cache[chunk]
        if len(self._nuc_cache) > 64:
            self._nuc_cache.clear()
        rng = self._rng(1, chunk)
        px_per_um = 1.0 / self.mpp
        area_um = CHUNK * self.width * self.mpp**2
        dmax = max(n.density for n in self._nuc.values())
        n = rng.poisson(dmax * area_um)
        xs = rng.uniform(0, self.width, n)
        ys = chunk * CHUNK + rng.uniform(0, CHUNK, n)
        u = rng.random(n)
        lab = self._labels_at(xs, ys)
        out = []
        g = self.layout.grade
        params = rng.random((n, 6))
        for i in np.flatnonzero(lab != BG):
            nc = self._nuc.get(int(lab[i]))
            if nc is None or u[i] > nc.density / dmax:
                continue
            p = params[i]
            a = nc.a[0] + (nc.a[1] - nc.a[0]) * p[0]
            tumour = lab[i] == TUM or lab[i] >= CLONE0
            if tumour and p[5] < 0.04 * g:  # pleomorphic giant nuclei with grade
                a *= 1.5
            b = a * (nc.ratio[0] + (nc.ratio[1] - nc.ratio[0]) * p[1])
            inten = nc.intensity[0] + (nc.intensity[1] - nc.intensity[0]) * p[2]
            ves = bool(tumour and p[4] < 0.25 * g)
            out.append(
                (
                    int(xs[i]),
                    int(ys[i]),
                    max(1, round(a * px_per_um)),
                    max(1, round(b * px_per_um)),
                    float(p[3] * 180.0),
                    float(inten),
                    ves,
                    int(lab[i]),
                )
            )
        self._nuc_cache[chunk] = out
        return out

    # -- fat cells (Voronoi membranes) ----------------------------------------------------------------------
    def _fat_seeds(self, chunk: int) -> np.ndarray:
        rng = self._rng(2, chunk)
        cell_um = 55.0
        n = rng.poisson(CHUNK * self.width * self.mpp**2 / cell_um**2)
        return np.stack([rng.uniform(0, self.width, n), chunk * CHUNK + rng.uniform(0, CHUNK, n)], 1)

    def render_rows(self, y0: int, y1: int) -> np.ndarray:
        """RGB uint8 rows [y0, y1) of level 0."""
        ppu = 1.0 / self.mpp  # px per µm
        m = int(np.ceil(16 * ppu))  # margin for smoothing and nuclei overlap
        Y0, Y1 = y0 - m, y1 + m
        H, W = Y1 - Y0, self.width
        flds = self.fields_rows(Y0, Y1)
        lab = self.layout.labels(flds, detail=True)
        w_fine = self._white(10, Y0, Y1)
        w_mid = self._white(11, Y0, Y1)
        n_fine = cv2.GaussianBlur(w_fine, (0, 0), 0.6 * ppu) * (1.7 * ppu)
        small = cv2.resize(w_mid, (W // 4, H // 4), interpolation=cv2.INTER_AREA)
        n_mid = cv2.resize(cv2.GaussianBlur(small, (0, 0), 0.6 * ppu), (W, H), interpolation=cv2.INTER_LINEAR)
        # fixed (analytic) normalisation, never data-dependent: a band must not depend on its neighbours
        n_mid *= 4.0 * 2.0 * np.sqrt(np.pi) * 0.6 * ppu
        n_coarse = flds["coarse"]
        # stroma fibres: noise smeared along a slowly varying direction (4 orientation buckets)
        # fibres are computed at ~1 µm/px (cheap), then upsampled
        k = max(1, round(1.0 / self.mpp))
        hs, ws = -(-H // k), -(-W // k)
        fib_src = cv2.resize(w_fine, (ws, hs), interpolation=cv2.INTER_AREA)
        ang = (cv2.resize(flds["angle"], (ws, hs), interpolation=cv2.INTER_AREA) * 0.9) % np.pi
        L = 13
        fib_s = np.zeros((hs, ws), np.float32)
        for j in range(4):
            theta = j * np.pi / 4
            ker = np.zeros((L, L), np.float32)
            c = L // 2
            dx, dy = np.cos(theta) * c, np.sin(theta) * c
            cv2.line(ker, (round(c - dx), round(c - dy)), (round(c + dx), round(c + dy)), 1.0, 1)
            ker /= ker.sum()
            sm = cv2.filter2D(fib_src, -1, ker, borderType=cv2.BORDER_REFLECT)
            wgt = np.maximum(0, 1 - np.abs(((ang - theta + np.pi / 2) % np.pi) - np.pi / 2) / (np.pi / 4))
            fib_s += wgt * sm
        fib = cv2.resize(fib_s, (W, H), interpolation=cv2.INTER_LINEAR)[:H, :W]
        fib *= k * np.sqrt(L) * 1.3

        # per-class base concentrations as lookup tables (index = class), modulated by textures
        h0, hm, e0, em, ef, eb, ec = self._lut
        Hc = h0[lab] + hm[lab] * n_mid
        Ec = e0[lab] + em[lab] * n_mid + ef[lab] * n_fine + eb[lab] * fib + ec[lab] * n_coarse
        lum = lab == LUM
        if lum.any():
            Ec[lum] += 0.25 * (n_coarse[lum] > 1.3)
        sig = 1.2 * ppu
        Hc = cv2.GaussianBlur(Hc, (0, 0), sig)
        Ec = cv2.GaussianBlur(Ec, (0, 0), sig)

        # fat membranes from Voronoi cells of seeds around the band
        if (lab == FAT).any():
            rad = int(90 * ppu)
            c0, c1 = (Y0 - rad) // CHUNK, (Y1 + rad) // CHUNK
            seeds = np.concatenate([self._fat_seeds(c) for c in range(c0, c1 + 1)], 0)
            pad = rad
            canvas = np.ones((H + 2 * pad, W), np.uint8)
            sx = np.clip(seeds[:, 0].astype(int), 0, W - 1)
            sy = seeds[:, 1].astype(int) - Y0 + pad
            ok = (sy >= 0) & (sy < H + 2 * pad)
            canvas[sy[ok], sx[ok]] = 0
            _, vlab = cv2.distanceTransformWithLabels(canvas, cv2.DIST_L2, 3, labelType=cv2.DIST_LABEL_PIXEL)
            vlab = vlab[pad:-pad]
            edge = np.zeros((H, W), np.uint8)
            edge[:, 1:] |= (vlab[:, 1:] != vlab[:, :-1]).astype(np.uint8)
            edge[1:, :] |= (vlab[1:, :] != vlab[:-1, :]).astype(np.uint8)
            edge = cv2.dilate(edge, np.ones((max(1, int(1.2 * ppu)),) * 2, np.uint8))
            memb = cv2.GaussianBlur(edge.astype(np.float32), (0, 0), 0.5 * ppu)
            fat = lab == FAT
            Ec[fat] += 0.55 * memb[fat]
            Hc[fat] += 0.04 * memb[fat]

        # nuclei: uint8 canvas of intensity (scaled), drawn from chunks overlapping the band
        nuc = np.zeros((H, W), np.uint8)
        c0, c1 = Y0 // CHUNK, (Y1 - 1) // CHUNK
        amax = int(12 * ppu) + 2
        for c in range(max(c0 - 1, (Y0 - amax) // CHUNK), c1 + 2):
            for x, y, a, b, angle, inten, ves, cls in self._nuclei(c):
                yy = y - Y0
                if yy < -amax or yy > H + amax:
                    continue
                if cls in (STR, FAT):  # fibroblasts follow fibre direction
                    iy = min(max(yy, 0), H - 1) // k
                    angle = float(np.degrees(ang[iy, min(x, W - 1) // k]))
                v = int(min(255, inten * 120))
                cv2.ellipse(nuc, (x, yy), (a, b), angle, 0, 360, v, -1, cv2.LINE_AA)
                if ves and a > 3:
                    cv2.ellipse(
                        nuc,
                        (x, yy),
                        (max(1, int(a * 0.6)), max(1, int(b * 0.6))),
                        angle,
                        0,
                        360,
                        int(v * 0.72),
                        -1,
                        cv2.LINE_AA,
                    )
                    cv2.circle(nuc, (x, yy), max(1, int(0.8 * ppu)), min(255, int(v * 1.15)), -1, cv2.LINE_AA)
        nucf = nuc.astype(np.float32) / 120.0
        nucf *= 1.0 + 0.22 * n_fine
        has = nucf > 0.05
        Hc = np.where(has, np.maximum(Hc, nucf), Hc)
        Ec = np.where(has, Ec * 0.8 + 0.12, Ec)

        st = self.stain
        a = -_OD_SCALE * st.h_vec * st.gain
        b = -_OD_SCALE * st.e_vec * st.gain
        noise = st.noise * w_mid
        chans = []
        for c in range(3):  # Beer-Lambert per channel: glass * exp(-OD)
            ch = cv2.exp(cv2.addWeighted(Hc, float(a[c]), Ec, float(b[c]), 0.0)) * float(st.glass[c])
            chans.append(cv2.GaussianBlur(ch, (0, 0), st.blur) + noise)
        rgb = cv2.merge(chans)[m : m + (y1 - y0)]
        return cv2.convertScaleAbs(rgb)  # rounds and saturates to uint8

    def bands(self, band_rows: int = 1024) -> Iterator[tuple[int, np.ndarray]]:
        """(y0, RGB rows) for the whole slide in order."""
        band_rows = max(CHUNK, band_rows // CHUNK * CHUNK)
        for y0 in range(0, self.height, band_rows):
            yield y0, self.render_rows(y0, min(self.height, y0 + band_rows))


def label_mask(layout: SlideLayout) -> np.ndarray:
    """The truth mask at `LABEL_MPP` µm/px."""
    return layout.labels(layout.fields)


def tiles_from_bands(
    bands: Iterator[tuple[int, np.ndarray]],
    width: int,
    tile: int,
    on_band: Callable[[int, np.ndarray], None] | None = None,
) -> Iterator[np.ndarray]:
    """Row-major `tile`-square tiles from bands whose height is a multiple of `tile` (the last may be short:
    its tiles are padded with glass white); `on_band` sees each band, to build lower levels without a second
    render."""
    for y0, rows in bands:
        if on_band is not None:
            on_band(y0, rows)
        for r in range(0, rows.shape[0], tile):
            strip = rows[r : r + tile]
            for c in range(0, width, tile):
                t = strip[:, c : c + tile]
                if t.shape[0] != tile or t.shape[1] != tile:
                    t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)), constant_values=255)
                yield t
