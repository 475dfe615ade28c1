"""The analysis as standard DICOM objects for the slide's own study (highdicom), so a PACS viewer shows it:

* a Comprehensive 3D SR measurement report (TID 1500): predicted class, class probabilities, survival risk,
  the model identity (AlgorithmIdentification: bundle name, version, model checksums), referencing the slide;
* the attention heatmap as a FRACTIONAL Segmentation and/or a float Parametric Map on the slide's frame of
  reference, one pixel per patch step, positioned and scaled on the total pixel matrix so a viewer (Slim)
  overlays it on the slide;
* per-patch attention and per-class patch probabilities as Microscopy Bulk Simple Annotations (one rectangle
  per patch, in total pixel matrix coordinates of the source image);
* the generated report text in its own SR, marked as an AI-generated draft (completion PARTIAL, verification
  UNVERIFIED) that a pathologist must verify.

Every UID is derived from (source series, bundle, job options), so writing the same analysis twice gives the
same objects and a PACS stores nothing twice.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CODING_SCHEME = "99MSTAR"  # private coding scheme (DICOM PS3.16 8.2: 99 prefix) for model outputs
MANUFACTURER = "mSTAR"
DRAFT_NOTICE = "AI-generated draft. Not verified: a pathologist must review and sign any report."
_ROOT_PREFIX = "2.25."


def derive_uid(*parts: Any) -> str:
    """A UID that depends only on `parts`: `2.25.` + a 128-bit integer from their SHA-256 (the UUID-derived
    form of PS3.5 B.2, at most 44 characters)."""
    raw = json.dumps(parts, sort_keys=True, default=str).encode()
    return _ROOT_PREFIX + str(int.from_bytes(hashlib.sha256(raw).digest()[:16], "big"))


def analysis_options(options: dict) -> dict:
    """The job options that change what an analysis computes, in one canonical form: the task list as a sorted
    set (["survival", "classification"] is the same analysis as the reverse) and without `bundle_version`,
    which only pins the served bundle (the gateway refuses any other) and is in the identity already."""
    out = {k: v for k, v in options.items() if k != "bundle_version"}
    if isinstance(out.get("tasks"), list | tuple):
        out["tasks"] = sorted(set(out["tasks"]))
    return out


@dataclass(frozen=True)
class Identity:
    """What makes two analyses the same: the source series, the bundle (name + version) and the options."""

    study_uid: str
    series_uid: str
    bundle_name: str
    bundle_version: str
    options: dict

    def uid(self, kind: str) -> str:
        options = analysis_options(self.options)
        return derive_uid("mstar-result", self.series_uid, self.bundle_name, self.bundle_version, options, kind)


def _code(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value[:16], scheme_designator=CODING_SCHEME, meaning=meaning[:64])


def strip_bulk(meta: dict) -> dict:
    """DICOM JSON metadata without bulk data references (pixel data and the like), recursively."""
    out = {}
    for tag, el in meta.items():
        if not isinstance(el, dict) or "BulkDataURI" in el or "InlineBinary" in el:
            continue
        if el.get("vr") == "SQ" and isinstance(el.get("Value"), list):
            el = {**el, "Value": [strip_bulk(x) for x in el["Value"] if isinstance(x, dict)]}
        out[tag] = el
    return out


def source_dataset(meta: dict):
    """The slide's level-0 VOLUME instance as a pydicom dataset (metadata only), what highdicom references."""
    from pydicom import Dataset

    ds = Dataset.from_json(strip_bulk(meta))
    return ds


def _algorithm(bundle: dict):
    from highdicom.sr import AlgorithmIdentification

    params = [f"{n}:{m.get('version')}:sha256={m.get('sha256')}" for n, m in sorted(bundle["models"].items())]
    return AlgorithmIdentification(name=bundle["name"], version=bundle["version"], parameters=params)


def _equipment(bundle: dict) -> dict:
    """The General Equipment attributes the SEG, map and annotations require: the bundle is the "device"."""
    return {
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": bundle["name"][:64],
        "software_versions": str(bundle["version"])[:64],
        "device_serial_number": "0",
    }


def _algorithm_sequence(bundle: dict):
    from highdicom import AlgorithmIdentificationSequence
    from pydicom.sr.codedict import codes

    params = {n[:64]: f"{m.get('version')} sha256={m.get('sha256')}"[:64] for n, m in sorted(bundle["models"].items())}
    return AlgorithmIdentificationSequence(
        name=bundle["name"],
        family=codes.cid7162.ArtificialIntelligence,
        version=bundle["version"],
        source="mSTAR",
        parameters=params,
    )


def _scalar(value: Any) -> float:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    return float(arr[0])


def measurement_report(src, result: dict, bundle: dict, ident: Identity):
    """TID 1500 SR: class (coded), class probabilities, survival risk, with the algorithm's identity."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algo = _algorithm(bundle)
    unit = codes.UCUM.NoUnits
    measurements, evaluations = [], []
    for head, out in sorted((result.get("classification") or {}).items()):
        probs = out.get("probabilities") or {}
        if isinstance(probs, dict):
            for label, p in probs.items():
                measurements.append(
                    hd.sr.Measurement(
                        name=_code(f"p-{head}-{label}", f"Probability of {label} ({head})"),
                        value=float(p),
                        unit=unit,
                        algorithm_id=algo,
                    )
                )
        if out.get("label") is not None:
            evaluations.append(
                hd.sr.QualitativeEvaluation(
                    name=_code(f"class-{head}", f"Predicted class ({head})"),
                    value=_code(f"{out['label']}", str(out["label"])),
                )
            )
    for head, out in sorted((result.get("survival") or {}).items()):
        if out.get("risk") is not None:
            measurements.append(
                hd.sr.Measurement(
                    name=_code(f"risk-{head}", f"Survival risk score ({head})"),
                    value=_scalar(out["risk"]),
                    unit=unit,
                    algorithm_id=algo,
                )
            )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=ident.uid("sr-tracking"), identifier="mSTAR slide analysis"),
        algorithm_id=algo,
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(src)],
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=derive_uid("mstar-device", bundle["name"], bundle["version"]),
                name="mSTAR",
                manufacturer_name=MANUFACTURER,
                model_name=bundle["name"][:64],
            ),
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=_code("wsi-analysis", "Whole-slide image AI analysis"),
        imaging_measurements=[group],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[src],
        content=report,
        series_instance_uid=ident.uid("sr-series"),
        series_number=9101,
        sop_instance_uid=ident.uid("sr-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description="mSTAR AI measurements (research use)",
    )


def report_text_sr(src, text: str, bundle: dict, ident: Identity):
    """The generated report as text, flagged as an unverified AI draft (title, notice item, SR flags)."""
    import highdicom as hd
    from highdicom.sr import ContainerContentItem, RelationshipTypeValues, TextContentItem
    from pydicom.sr.codedict import codes

    root = ContainerContentItem(name=_code("ai-draft-report", "AI-generated draft pathology report"), template_id=None)
    items = [
        TextContentItem(
            name=codes.DCM.Finding, value=text[:65000] or "(empty)", relationship_type=RelationshipTypeValues.CONTAINS
        ),
        TextContentItem(name=codes.DCM.Comment, value=DRAFT_NOTICE, relationship_type=RelationshipTypeValues.CONTAINS),
        TextContentItem(
            name=_code("algorithm", "Algorithm"),
            value=f"{bundle['name']} {bundle['version']}",
            relationship_type=RelationshipTypeValues.CONTAINS,
        ),
    ]
    root.ContentSequence = items
    return hd.sr.Comprehensive3DSR(
        evidence=[src],
        content=root,
        series_instance_uid=ident.uid("text-series"),
        series_number=9104,
        sop_instance_uid=ident.uid("text-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=False,
        is_final=False,
        is_verified=False,
        series_description="mSTAR AI draft report - UNVERIFIED",
    )


def _grid_map(coords: np.ndarray, values: np.ndarray, step: int, shape: tuple[int, int]) -> np.ndarray:
    """Per-patch values on a [rows, cols] map, one cell per grid step (level-0 px); cells without a patch: 0."""
    out = np.zeros(shape, np.float32)
    c = np.clip(coords[:, 0] // step, 0, shape[1] - 1)
    r = np.clip(coords[:, 1] // step, 0, shape[0] - 1)
    out[r, c] = values
    return out


def _placement(src, step: int) -> tuple[tuple[int, int], dict]:
    """The heatmap grid's shape ([rows, cols], one cell per patch step) and the highdicom geometry that puts it
    on the slide's total pixel matrix: pixel spacing = the slide's spacing x step, origin = the slide's origin,
    the slide's orientation. SEG and Parametric Map share it, so both overlay the slide the same way."""
    import highdicom as hd

    width, height = int(src.TotalPixelMatrixColumns), int(src.TotalPixelMatrixRows)
    shape = (-(-height // step), -(-width // step))
    spacing = [float(v) for v in src.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    origin_seq = getattr(src, "TotalPixelMatrixOriginSequence", None)
    origin = origin_seq[0] if origin_seq else None
    position = hd.PlanePositionSequence(
        coordinate_system="SLIDE",
        image_position=(
            float(getattr(origin, "XOffsetInSlideCoordinateSystem", 0.0) or 0.0),
            float(getattr(origin, "YOffsetInSlideCoordinateSystem", 0.0) or 0.0),
            float(getattr(origin, "ZOffsetInSlideCoordinateSystem", 0.0) or 0.0),
        ),
        pixel_matrix_position=(1, 1),
    )
    geometry = {
        "pixel_measures": hd.PixelMeasuresSequence(
            pixel_spacing=(spacing[0] * step, spacing[1] * step), slice_thickness=1.0
        ),
        "plane_orientation": hd.PlaneOrientationSequence(
            coordinate_system="SLIDE", image_orientation=[float(v) for v in src.ImageOrientationSlide]
        ),
        "plane_positions": [position],
        "tile_pixel_array": True,
        "tile_size": (min(256, shape[0]), min(256, shape[1])),  # (rows, columns)
    }
    return shape, geometry


def heatmap_segmentation(src, coords: np.ndarray, attention: np.ndarray, step: int, bundle: dict, ident: Identity):
    """FRACTIONAL segmentation of relative attention (attention / max), one pixel per patch step, on the
    slide's frame of reference (`_placement`). 8-bit: what every SEG-capable viewer overlays."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    shape, geometry = _placement(src, step)
    rel = attention / attention.max() if attention.size and attention.max() > 0 else attention
    fmap = _grid_map(coords, rel.astype(np.float32), step, shape)
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="mSTAR attention",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm_sequence(bundle),
    )
    return hd.seg.Segmentation(
        source_images=[src],
        pixel_array=fmap[None, :, :, None],
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=[description],
        series_instance_uid=ident.uid("seg-series"),
        series_number=9102,
        sop_instance_uid=ident.uid("seg-instance"),
        instance_number=1,
        **_equipment(bundle),
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        omit_empty_frames=False,
        content_label="ATTENTION",
        content_description="relative aggregator attention (1 = most attended patch)",
        series_description="mSTAR attention heatmap (research use)",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        **geometry,
    )


def heatmap_parametric_map(src, coords: np.ndarray, attention: np.ndarray, step: int, bundle: dict, ident: Identity):
    """Float Parametric Map of the aggregator attention itself (not rescaled: the values of result.json), one
    pixel per patch step on the slide's frame of reference (`_placement`); cells without a patch are 0."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    shape, geometry = _placement(src, step)
    fmap = _grid_map(coords, attention.astype(np.float32), step, shape)
    top = float(fmap.max()) if fmap.size else 0.0
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="ATTENTION",
        lut_explanation="mSTAR aggregator attention per patch",
        unit=codes.UCUM.NoUnits,
        value_range=(0.0, max(top, 1e-6)),
        slope=1.0,
        intercept=0.0,
        quantity_definition=_code("attention", "Aggregator attention"),
    )
    return hd.pm.ParametricMap(
        source_images=[src],
        pixel_array=fmap[None, :, :],
        series_instance_uid=ident.uid("pmap-series"),
        series_number=9105,
        sop_instance_uid=ident.uid("pmap-instance"),
        instance_number=1,
        **_equipment(bundle),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=top / 2, window_width=max(top, 1e-6))],
        content_label="ATTENTION",
        content_description="aggregator attention (float, as in result.json)",
        series_description="mSTAR attention map (research use)",
        **geometry,
    )


def patch_class_measurements(scores_h5: Path, coords: np.ndarray) -> tuple[list, list[str]]:
    """One annotation measurement per class of every classifier head that scored each patch alone
    (`patch_scores.h5`, `heads/<name>/probabilities`), in the rows of `coords`. ([], notes) when there are none
    or the file's patches are not the annotated ones."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from service.results import patch_scores

    if not scores_h5.is_file():
        return [], []
    scores = patch_scores.read(scores_h5)
    if scores.coords.shape != coords.shape or not np.array_equal(scores.coords, coords):
        return [], ["patch_scores.h5 does not list the annotated patches: per-class patch scores not written"]
    out = []
    for h, head in enumerate(sorted((x for x in scores.heads if x.probabilities is not None), key=lambda x: x.name)):
        for c, label in enumerate(head.labels or []):
            out.append(
                hd.ann.Measurements(
                    name=_code(f"patch-p{h}-{c}", f"Patch probability of {label} ({head.name})"),
                    unit=codes.UCUM.NoUnits,
                    values=np.asarray(head.probabilities[:, c], np.float32),
                )
            )
    return out, []


def patch_annotations(
    src, coords: np.ndarray, size: int, attention: np.ndarray, bundle: dict, ident: Identity, extra: list = ()
):
    """One rectangle per patch (total pixel matrix coordinates) with its attention as a measurement, and
    `extra` measurements (per-class patch probabilities) next to it."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    x, y = coords[:, 0].astype(np.float32), coords[:, 1].astype(np.float32)
    s = np.float32(size)
    polys = [np.array([[a, b], [a + s, b], [a + s, b + s], [a, b + s]], np.float32) for a, b in zip(x, y, strict=True)]
    group = hd.ann.AnnotationGroup(
        number=1,
        uid=ident.uid("ann-group"),
        label="mSTAR patches",
        annotated_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        annotated_property_type=codes.SCT.Tissue,
        graphic_type=hd.ann.GraphicTypeValues.POLYGON,
        graphic_data=polys,
        algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm_sequence(bundle),
        measurements=[
            hd.ann.Measurements(
                name=_code("attention", "Aggregator attention"),
                unit=codes.UCUM.NoUnits,
                values=attention.astype(np.float32),
            ),
            *extra,
        ],
        description="analysed patches: attention and per-class scores",
    )
    return hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[src],
        annotation_coordinate_type=hd.ann.AnnotationCoordinateTypeValues.SCOORD,
        annotation_groups=[group],
        series_instance_uid=ident.uid("ann-series"),
        series_number=9103,
        sop_instance_uid=ident.uid("ann-instance"),
        instance_number=1,
        **_equipment(bundle),
        content_label="PATCHES",
        series_description="mSTAR patch scores (research use)",
    )


def build_objects(
    src, result: dict, features_h5: Path, bundle: dict, ident: Identity, *, heatmap: str = "seg"
) -> tuple[dict[str, Any], list[str]]:
    """({file name: dataset}, notes) for every object this analysis yields (what exists depends on the bundle
    and the source: a heatmap needs the slide's Frame of Reference to be placed on it). `heatmap` picks the
    heatmap objects: `seg` (FRACTIONAL Segmentation), `pmap` (float Parametric Map) or `both`."""
    notes: list[str] = []
    import h5py

    objects: dict[str, Any] = {"mstar-sr.dcm": measurement_report(src, result, bundle, ident)}
    with h5py.File(features_h5, "r") as f:
        coords = np.asarray(f["coords"][:], np.int64)
        attention = np.asarray(f["attention"][:], np.float64) if "attention" in f else None
        attrs = dict(f.attrs)
    size = int(attrs.get("patch_size_level0") or result["tiling"]["patch_size_level0"])
    step = int(attrs.get("step_level0") or size)
    if attention is None or not coords.shape[0]:
        notes.append("no per-patch attention (the bundle has no aggregator): no heatmap or patch annotations")
    elif not getattr(src, "FrameOfReferenceUID", None):
        # both are placed on the slide's frame of reference (highdicom's slide-coordinate annotations need it
        # too): without one, building the annotations raised AttributeError and failed the whole write-back
        notes.append(
            "the slide has no FrameOfReferenceUID, so the heatmap and the patch annotations cannot be placed "
            "on it: not written (the per-patch values are in result.json and the job's other files)"
        )
    else:
        if heatmap in ("seg", "both"):
            objects["mstar-seg.dcm"] = heatmap_segmentation(src, coords, attention, step, bundle, ident)
        if heatmap in ("pmap", "both"):
            objects["mstar-pmap.dcm"] = heatmap_parametric_map(src, coords, attention, step, bundle, ident)
        extra, more = patch_class_measurements(features_h5.with_name("patch_scores.h5"), coords)
        notes += more
        objects["mstar-ann.dcm"] = patch_annotations(src, coords, size, attention, bundle, ident, extra)
    text = (result.get("report") or {}).get("text")
    if text:
        objects["mstar-report-sr.dcm"] = report_text_sr(src, text, bundle, ident)
    return objects, notes
