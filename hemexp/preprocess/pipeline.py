"""One patient end to end: ingest + skull strip, register + resample + QC, shard.

Three steps, three commands (``hemexp ingest|preprocess|shard {p}``), because a template built from
training baselines needs those patients' ingest outputs before any patient can be registered.
Each step writes its whole output folder/file atomically, so a failure leaves nothing behind, and
every input problem is a :class:`~hemexp.core.errors.PatientInputError` naming patient, file and problem.

Layout (``R`` = results_dir): ``R/ingested/{p}/`` {bl,fu}_ct (canonical HU), {bl,fu}_{iph,ivh},
brain_{bl,fu}, ingest.json; ``R/preprocessed/{p}/`` {bl,fu}_{ct,iph,ivh}, brain_{bl,fu} on the model
grid, transforms/, qc.png, summary.json; ``R/shards/{p}.parquet``.

The steps are public so that nothing recomposes them: :func:`load_scan` (ingest one timepoint),
:func:`lesion_safe_brain` + :func:`skull_stripped` (skull strip), :func:`template_grid` and
:func:`hemexp.preprocess.register.register_baseline` (register to the template),
:func:`resample_timepoint` + :func:`write_on_grid` (resample to the model grid). ``hemexp simulate``
(:func:`hemexp.sampling.simulate.prepare_baseline`) and ``scripts/bench_preprocess.py`` call them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from hemexp.cohort.manifest import read_manifest
from hemexp.core.clinical import CLINICAL_NAMES, dice, is_expansion, mask_volume_ml
from hemexp.core.deid import shareable_path
from hemexp.core.errors import PatientInputError, reading_product
from hemexp.core.files import atomic_dir, read_json, write_json
from hemexp.core.layout import Layout, manifest_path
from hemexp.io.ingest import load_ct, load_mask
from hemexp.io.nifti import make_image, save_nifti, spacing_mm
from hemexp.io.shards import IMAGE_COLUMNS, patient_table, write_shard
from hemexp.preprocess.grid import ModelGrid, brain_coverage, model_grid
from hemexp.preprocess.identity import affine_measures, identity_failure, identity_measures
from hemexp.preprocess.skullstrip import brain_mask
from hemexp.preprocess.template import load_template, template_paths
from hemexp.preprocess.transform_files import BL_TO_TEMPLATE, FU_TO_BL, MODEL_GRID, TRANSFORMS_DIR

TIMEPOINTS = {"bl": "baseline", "fu": "followup"}
KINDS = ("iph", "ivh")
GRID_VOLUME_TOLERANCE = 0.25  # warn when a model-grid volume differs from native by more (relative)
CLINICAL_VOLUME_TOLERANCE_ML = 1.0


def patient_row(cfg: dict[str, Any], patient_id: str) -> pd.Series:
    """This patient's manifest row. Files are not checked here (another patient's missing file must
    not fail this patient's job); each stage checks its own patient's files."""
    path = manifest_path(cfg)
    df = read_manifest(path, check_files=False)
    rows = df[df["patient_id"] == patient_id]
    if rows.empty:
        raise PatientInputError(patient_id, path, "patient not in the manifest")
    return rows.iloc[0]


def _load(path: Path, stage: str = "ingest") -> nib.Nifti1Image:
    """An intermediate NIfTI of ``<stage dir>/<patient>/`` read in full: truncated -> one line naming the stage."""
    with reading_product(path, stage, Path(path).parent.name):
        img = nib.load(str(path))
        return make_image(np.asarray(img.dataobj), img.affine)


# ---------------------------------------------------------------- ingest + skull strip


def load_scan(ct_path: str | Path, iph_path: str | Path, ivh_path: str | Path | None, labels: dict[str, int],
              pid: str) -> dict[str, nib.Nifti1Image]:
    """Ingest one timepoint from files: ``{ct, iph, ivh}`` (canonical HU CT, masks checked against it).

    The same file for IPH and IVH means a label map (``cohort.mask_labels``); ``ivh_path`` None means
    no IVH (an empty mask; ``hemexp simulate`` allows it, the manifest names a file).
    """

    ct = load_ct(ct_path, pid)
    label_map = ivh_path is not None and Path(iph_path) == Path(ivh_path)
    out = {"ct": ct, "iph": load_mask(iph_path, ct, "iph", labels, label_map, pid)}
    out["ivh"] = (load_mask(ivh_path, ct, "ivh", labels, label_map, pid) if ivh_path is not None
                  else make_image(np.zeros(ct.shape, np.uint8), ct.affine))
    return out


def load_timepoint(row: pd.Series, tp: str, labels: dict[str, int], pid: str) -> dict[str, nib.Nifti1Image]:
    """:func:`load_scan` of a manifest row's ``tp`` ('bl' or 'fu') files."""
    name = TIMEPOINTS[tp]
    return load_scan(row[f"{name}_ct"], row[f"{name}_iph"], row[f"{name}_ivh"], labels, pid)


def lesion_safe_brain(ct: nib.Nifti1Image, iph: nib.Nifti1Image, ivh: nib.Nifti1Image, cfg: dict[str, Any], pid: str) -> tuple[np.ndarray, dict]:
    """Skull-strip mask, united with the hemorrhage masks: a bleed touching the skull must never be
    cut from the skull-stripped CT (the strip is a registration aid, the masks are ground truth)."""

    pre = cfg["preprocess"]
    mask_img, info = brain_mask(ct, pre["skullstrip"], pid, pre["brain_volume_ml"])
    brain = np.asarray(mask_img.dataobj) > 0
    brain |= (np.asarray(iph.dataobj) > 0) | (np.asarray(ivh.dataobj) > 0)
    return brain.astype(np.uint8), dict(info)


def skull_stripped(ct: nib.Nifti1Image, brain: np.ndarray | nib.Nifti1Image) -> nib.Nifti1Image:
    """The CT (float32 HU) with everything outside the (lesion-safe) brain mask set to 0: what is
    registered and resampled onto the model grid."""
    mask = np.asarray(brain.dataobj if isinstance(brain, nib.Nifti1Image) else brain) > 0
    return make_image(np.asarray(ct.dataobj, np.float32) * mask, ct.affine)


def check_distinct_files(row: pd.Series, pid: str) -> None:
    """Baseline and follow-up must be two scans: the same CT path (or the same file under two names)
    for both timepoints is a manifest copy error."""
    bl, fu = Path(row["baseline_ct"]), Path(row["followup_ct"])
    same = bl == fu
    if not same and bl.exists() and fu.exists():
        try:
            same = bl.samefile(fu)
        except OSError:
            same = False
    if same:
        raise PatientInputError(pid, fu, f"follow-up CT is the same file as the baseline CT ({bl}): "
                                "the manifest must name two different scans")


def check_distinct_pixels(bl_ct: nib.Nifti1Image, fu_ct: nib.Nifti1Image, row: pd.Series, pid: str) -> None:
    """Identical voxel data at both timepoints means one scan copied twice (noise alone makes two
    acquisitions differ in almost every voxel)."""
    if bl_ct.shape == fu_ct.shape and np.array_equal(np.asarray(bl_ct.dataobj), np.asarray(fu_ct.dataobj)):
        raise PatientInputError(pid, row["followup_ct"], f"follow-up CT has pixel data identical to the baseline CT "
                                f"({row['baseline_ct']}): the same scan copied twice, not a follow-up")


def ingest_patient(cfg: dict[str, Any], patient_id: str, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Load, check and skull-strip one patient's baseline and follow-up; write ``ingested/{p}/``."""
    row = patient_row(cfg, patient_id)
    out_dir = Path(out_dir) if out_dir else Layout.of(cfg).ingested(patient_id)
    labels = cfg["cohort"]["mask_labels"]
    t0 = time.perf_counter()
    check_distinct_files(row, patient_id)
    imgs = {tp: load_timepoint(row, tp, labels, patient_id) for tp in TIMEPOINTS}
    check_distinct_pixels(imgs["bl"]["ct"], imgs["fu"]["ct"], row, patient_id)
    volumes = {tp: {k: mask_volume_ml(np.asarray(imgs[tp][k].dataobj), spacing_mm(imgs[tp]["ct"])) for k in KINDS}
               for tp in TIMEPOINTS}
    if volumes["bl"]["iph"] == 0:
        stated = row.get("baseline_iph_ml")
        said = (f" although the manifest says baseline_iph_ml={float(stated):g}"
                if stated is not None and np.isfinite(float(stated)) and float(stated) > 0 else "")
        raise PatientInputError(patient_id, row["baseline_iph"],
                                f"baseline IPH mask is empty (no hemorrhage to model){said}: wrong file or label value?")
    t1 = time.perf_counter()
    brains, strip_info = {}, {}
    for tp, parts in imgs.items():
        brains[tp], strip_info[tp] = lesion_safe_brain(parts["ct"], parts["iph"], parts["ivh"], cfg, patient_id)
    t2 = time.perf_counter()
    info = {
        "patient_id": patient_id,
        "native": {tp: {"shape": list(imgs[tp]["ct"].shape), "spacing_mm": list(spacing_mm(imgs[tp]["ct"])),
                        "source": imgs[tp]["ct"].extra.get("ingest", {})} for tp in TIMEPOINTS},
        "volumes_ml": {TIMEPOINTS[tp]: {**v, "total": v["iph"] + v["ivh"]} for tp, v in volumes.items()},
        "skullstrip": strip_info,
        "timings_s": {"ingest": t1 - t0, "skullstrip": t2 - t1},
    }
    with atomic_dir(out_dir) as tmp:
        for tp, parts in imgs.items():
            save_nifti(parts["ct"], tmp / f"{tp}_ct.nii.gz", np.float32)
            for kind in KINDS:
                save_nifti(parts[kind], tmp / f"{tp}_{kind}.nii.gz", np.uint8)
            save_nifti(make_image(brains[tp], parts["ct"].affine), tmp / f"brain_{tp}.nii.gz", np.uint8)
        write_json(tmp / "ingest.json", info)
    return info


# ---------------------------------------------------------------- register + resample + QC


def template_grid(cfg: dict[str, Any]) -> tuple[nib.Nifti1Image, nib.Nifti1Image, Any]:
    """(template CT, template brain mask, model grid): the fixed space every patient is registered to."""

    pre = cfg["preprocess"]
    template, tmask = load_template(cfg)
    return template, tmask, model_grid(tmask, pre["spacing_mm"], pre["crop"])


def resample_timepoint(stripped: nib.Nifti1Image, brain: nib.Nifti1Image, masks: dict[str, nib.Nifti1Image],
                       patient_dir: Path, tp: str) -> dict[str, np.ndarray]:
    """One timepoint on the model grid through ``patient_dir``'s transforms: ``{tp}_ct`` (skull-stripped
    HU, linear, float32), ``{tp}_brain`` and ``{tp}_iph``/``{tp}_ivh`` (label interpolator, uint8)."""
    from hemexp.preprocess.register import to_model_grid  # ANTs: only the stages that register import it

    vols = {f"{tp}_ct": np.asarray(to_model_grid(stripped, patient_dir, tp, "linear").dataobj, np.float32),
            f"{tp}_brain": np.asarray(to_model_grid(brain, patient_dir, tp, "label").dataobj, np.uint8)}
    for kind in KINDS:
        vols[f"{tp}_{kind}"] = np.asarray(to_model_grid(masks[kind], patient_dir, tp, "label").dataobj, np.uint8)
    return vols


def write_on_grid(grid: Any, vols: dict[str, np.ndarray], out_dir: Path) -> None:
    """Save model-grid volumes as the preprocessed layout names them: ``{tp}_{ct,iph,ivh}``, ``brain_{tp}``."""
    for key, data in vols.items():
        dtype = np.float32 if key.endswith("_ct") else np.uint8
        name = f"brain_{key[:2]}" if key.endswith("_brain") else key
        save_nifti(grid.image(data, dtype), out_dir / f"{name}.nii.gz", dtype)


def _resample_all(src: Path, patient_dir: Path) -> dict[str, np.ndarray]:
    """Every ingested image of both timepoints on the model grid (:func:`resample_timepoint`)."""
    vols: dict[str, np.ndarray] = {}
    for tp in TIMEPOINTS:
        brain = _load(src / f"brain_{tp}.nii.gz")
        masks = {kind: _load(src / f"{tp}_{kind}.nii.gz") for kind in KINDS}
        vols.update(resample_timepoint(skull_stripped(_load(src / f"{tp}_ct.nii.gz"), brain), brain, masks,
                                       patient_dir, tp))
    return vols


def _stripped_ants(src: Path, tp: str):
    from hemexp.preprocess.register import nib_to_ants

    return nib_to_ants(skull_stripped(_load(src / f"{tp}_ct.nii.gz"), _load(src / f"brain_{tp}.nii.gz")))


def _grid_volumes(vols: dict[str, np.ndarray], spacing: tuple[float, float, float]) -> dict[str, dict[str, float]]:
    out = {}
    for tp, name in TIMEPOINTS.items():
        v = {k: mask_volume_ml(vols[f"{tp}_{k}"], spacing) for k in KINDS}
        out[name] = {**v, "total": v["iph"] + v["ivh"]}
    return out


def _warnings(native: dict, grid: dict, row: pd.Series, expansion: bool) -> list[str]:
    """Non-fatal disagreements a reader should see: label vs manifest, volumes vs clinical table,
    volumes lost or gained by resampling."""
    out = []
    manifest_exp = row.get("expansion")
    if manifest_exp is not None and np.isfinite(manifest_exp) and bool(manifest_exp) != expansion:
        out.append(f"expansion label {int(expansion)} by the paper rule (IPH {native['baseline']['iph']:.2f} -> "
                   f"{native['followup']['iph']:.2f} mL) disagrees with the manifest's expansion={int(manifest_exp)}")
    stated, measured = float(row["baseline_iph_ml"]), native["baseline"]["iph"]
    if abs(stated - measured) > max(CLINICAL_VOLUME_TOLERANCE_ML, 0.1 * measured):
        out.append(f"manifest baseline_iph_ml={stated:.2f} but the baseline IPH mask measures {measured:.2f} mL")
    for tp in ("baseline", "followup"):
        for kind in KINDS:
            a, b = native[tp][kind], grid[tp][kind]
            if max(a, b) > 1.0 and abs(a - b) > GRID_VOLUME_TOLERANCE * max(a, b):
                out.append(f"{tp} {kind.upper()} volume {a:.2f} mL native vs {b:.2f} mL on the model grid")
    return out


def preprocess_patient(cfg: dict[str, Any], patient_id: str, out_dir: str | Path | None = None,
                       src_dir: str | Path | None = None) -> dict[str, Any]:
    """Register, resample to the model grid, QC and summarise one ingested patient."""
    from hemexp.preprocess.qc import qc_figure
    from hemexp.preprocess.register import (
        nib_to_ants,
        register_patient,
        rigid_motion,
        save_native_grid,
        template_on_grid,
    )

    pre = cfg["preprocess"]
    row = patient_row(cfg, patient_id)
    src = Path(src_dir) if src_dir else Layout.of(cfg).ingested(patient_id)
    out_dir = Path(out_dir) if out_dir else Layout.of(cfg).preprocessed(patient_id)
    with reading_product(src / "ingest.json", "ingest", patient_id):
        ingest = read_json(src / "ingest.json")
    template, tmask, grid = template_grid(cfg)
    with atomic_dir(out_dir) as tmp:
        tdir = tmp / TRANSFORMS_DIR
        t0 = time.perf_counter()
        timings = register_patient(nib_to_ants(template), _stripped_ants(src, "bl"), _stripped_ants(src, "fu"),
                                   cfg["seed"], pre["registration_mm"], tdir)
        grid.save(tdir / MODEL_GRID)
        save_native_grid(_load(src / "bl_ct.nii.gz"), tmp)
        t1 = time.perf_counter()
        vols = _resample_all(src, tmp)
        write_on_grid(grid, vols, tmp)
        t2 = time.perf_counter()
        on_template = template_on_grid(template, tmask, grid)  # (template HU, template brain mask) on the grid
        summary = _summary(cfg, patient_id, row, ingest, grid, vols, on_template)
        summary["registration"].update(
            bl_to_template=rigid_motion(tdir / BL_TO_TEMPLATE), fu_to_bl=rigid_motion(tdir / FU_TO_BL),
            template=shareable_path(template_paths(cfg)[0], manifest_path(cfg).parent, cfg["results_dir"]),
            template_brain_coverage=brain_coverage(grid, tmask),
        )
        summary["identity"] = {**identity_measures(vols, tuple(pre["hu_window"])), **affine_measures(tdir / FU_TO_BL),
                               "min_ncc": pre["min_identity_ncc"],
                               "allowed_scale_change": pre["max_identity_scale_change"],
                               "allowed_slice_scale_change": pre["max_identity_slice_scale_change"]}
        _check(summary, row, patient_id, pre["min_brain_dice"], pre["min_identity_ncc"], pre["max_identity_scale_change"],
               pre["max_identity_slice_scale_change"])
        qc_figure(vols, pre["hu_window"], tmp / "qc.png", _qc_title(summary), on_template[1], grid.spacing)
        t3 = time.perf_counter()
        summary["timings_s"].update(registration_total=t1 - t0, rigid=timings["rigid"], affine=timings["affine"],
                                    resample=t2 - t1, qc=t3 - t2)
        write_json(tmp / "summary.json", summary)
    return summary


def _summary(cfg: dict[str, Any], pid: str, row: pd.Series, ingest: dict, grid, vols: dict,
             on_template: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """``summary.json`` of one patient. ``on_template`` (template HU, template brain mask on the model
    grid) adds ``registration.template_similarity`` (:func:`template_similarity`: Dice, NCC, centroid offset)."""
    registration: dict[str, Any] = {"brain_dice": dice(vols["bl_brain"], vols["fu_brain"])}
    if on_template is not None:
        from hemexp.preprocess.register import template_similarity

        registration["template_similarity"] = template_similarity(
            vols["bl_ct"], vols["bl_brain"], *on_template, grid.spacing, tuple(cfg["preprocess"]["hu_window"]))
    native = ingest["volumes_ml"]
    on_grid = _grid_volumes(vols, grid.spacing)
    expansion = is_expansion(native["baseline"]["iph"], native["followup"]["iph"])
    manifest_exp = row.get("expansion")
    return {
        "patient_id": pid,
        "split": row["split"],
        "site": row["site"],
        "volumes_ml": native,
        "volumes_ml_model_grid": on_grid,
        "expansion": bool(expansion),
        "manifest_expansion": bool(manifest_exp) if manifest_exp is not None and np.isfinite(manifest_exp) else None,
        "warnings": _warnings(native, on_grid, row, expansion),
        "registration": registration,
        "grid": {"spacing_mm": list(grid.spacing), "shape": list(grid.shape)},
        "native_slice_thickness_mm": float(ingest["native"]["bl"]["spacing_mm"][2]),
        "clinical": {name: float(row[name]) for name in CLINICAL_NAMES},
        "he_prob": float(row["he_prob"]) if np.isfinite(row["he_prob"]) else None,
        "timings_s": dict(ingest["timings_s"]),
    }


def _check(summary: dict[str, Any], row: pd.Series, pid: str, min_dice: float, min_ncc: float | None = None,
           max_scale_change: float | None = None, max_slice_scale_change: float | None = None) -> None:
    """Failures that make a pair unusable for training or evaluation: the lesion off the grid, the
    follow-up not aligned (brain Dice), or the follow-up another patient's head
    (:func:`hemexp.preprocess.identity.identity_failure`: the affine's scale factors, ``identity.ncc``)."""
    if summary["volumes_ml_model_grid"]["baseline"]["iph"] == 0:
        raise PatientInputError(pid, row["baseline_iph"],
                                "baseline IPH lies outside the model grid after registration (check crop and the QC)")
    dice_ = summary["registration"]["brain_dice"]
    if dice_ < min_dice:
        raise PatientInputError(pid, row["followup_ct"],
                                f"follow-up does not align with the baseline after registration (brain Dice {dice_:.3f} "
                                f"< preprocess.min_brain_dice {min_dice}): a different patient's scan or a failed registration?")
    why = identity_failure(summary.get("identity", {}), min_ncc, max_scale_change, max_slice_scale_change)
    if why is not None:
        raise PatientInputError(pid, row["followup_ct"], f"follow-up CT does not look like the same head as the baseline: "
                                f"{why}; is it another patient's scan? check the QC figure")


def _qc_title(summary: dict[str, Any]) -> str:
    v = summary["volumes_ml"]
    return (f"{summary['patient_id']} ({summary['split']}, site {summary['site']})  IPH {v['baseline']['iph']:.1f} -> "
            f"{v['followup']['iph']:.1f} mL, IVH {v['baseline']['ivh']:.1f} -> {v['followup']['ivh']:.1f} mL, "
            f"expansion={int(summary['expansion'])}, brain Dice {summary['registration']['brain_dice']:.3f}{_template_note(summary)}")


def _template_note(summary: dict[str, Any]) -> str:
    sim = summary["registration"].get("template_similarity")
    if not sim:
        return ""
    return (f"\ntemplate fit: brain Dice {sim['brain_dice']:.3f}, NCC {sim['ncc']:.3f}, "
            f"centroid offset {sim['centroid_offset_mm']:.1f} mm")


# ---------------------------------------------------------------- shard


def read_summary(patient_id: str, patient_dir: str | Path) -> dict[str, Any]:
    """A preprocessed patient's ``summary.json``, the one reader every later stage uses.

    Missing or unreadable -> :class:`PatientInputError` naming the patient, the file and the stage
    to rerun, so a sampler or evaluator never fails with a bare ``KeyError`` or JSON traceback.
    """
    path = Path(patient_dir) / "summary.json"
    if not path.is_file():
        raise PatientInputError(patient_id, path, "preprocess summary.json missing (run hemexp preprocess)")
    try:
        return read_json(path)
    except (OSError, ValueError) as err:
        raise PatientInputError(patient_id, path, f"preprocess summary.json unreadable ({err}); "
                                "rerun hemexp preprocess") from err


def shard_patient(cfg: dict[str, Any], patient_id: str, out_path: str | Path | None = None,
                  src_dir: str | Path | None = None) -> Path:
    """Write ``shards/{p}.parquet`` from the preprocessed volumes, the summary and the manifest row."""
    src = Path(src_dir) if src_dir else Layout.of(cfg).preprocessed(patient_id)
    out_path = Path(out_path) if out_path else Layout.of(cfg).shard(patient_id)
    summary = read_summary(patient_id, src)
    row = patient_row(cfg, patient_id)
    with reading_product(src / TRANSFORMS_DIR / MODEL_GRID, "preprocess", patient_id):
        grid = ModelGrid.load(src / TRANSFORMS_DIR / MODEL_GRID)
    vols = {c: np.asarray(_load(src / f"{c}.nii.gz", "preprocess").dataobj) for c in IMAGE_COLUMNS}
    meta = {"patient_id": patient_id, "split": row["split"], "site": row["site"],
            "expansion": summary["expansion"], "he_prob": row["he_prob"],
            **{name: row[name] for name in CLINICAL_NAMES}}
    try:
        table = patient_table(vols, grid.spacing, grid.z_mm(), meta, cfg["shards"]["context_margin_mm"])
    except ValueError as err:
        raise PatientInputError(patient_id, src / "bl_iph.nii.gz", f"cannot shard: {err}") from err
    return write_shard(table, out_path, cfg["shards"]["row_group_rows"])
