"""ROC of the baseline/follow-up identity measures (``summary.json`` ``identity``) and of the decision rule.

Builds pairs, runs each through the pipeline's own skull strip, registration and model-grid resampling
(:mod:`hemexp.preprocess.pipeline`, :mod:`hemexp.preprocess.register`), computes every candidate feature
and prints, per kind of pair, each feature's ROC AUC and the TPR/FPR of the pipeline's rule
(:func:`hemexp.preprocess.identity.identity_failure` with the config's ``preprocess.min_identity_ncc`` and
``preprocess.max_identity_scale_change`` / ``max_identity_slice_scale_change``; positive = same patient = accepted). Features:

* ``ncc``: :func:`hemexp.preprocess.identity.identity_ncc` (higher = same);
* ``max_scale_change`` (all axes), ``inplane_scale_change`` (x, y), ``slice_scale_change`` (z),
  ``abs_log_det``, ``anisotropy``: :func:`hemexp.preprocess.identity.affine_scales` of the follow-up ->
  baseline affine ``fu_to_bl.mat`` (lower = same);
* ``brain_dice`` (the old check) and ``csf_dice`` (CSF, brain below 15 HU, on the model grid, lesions out);
* ``skull_dice`` (synthetic pairs only: the template has no skull): bone above 300 HU within 12 mm of the
  baseline brain, follow-up moved by the *rigid* stage only, on the native baseline grid.

* synthetic: baseline + follow-up of one patient of :mod:`hemexp.cohort.synth` ('same') versus the
  baseline of one patient and the follow-up of the next ('different');
* template (when ``../shared/data/ct_template/`` exists): the real CT template posed, resliced to thick
  slices, with noise, a mild warp (mass effect) and a synthetic hematoma that grows between timepoints
  ('same'), versus the template and another head made from it: an axis-aligned scaling drawn as the
  difference of two adult heads (log scale per axis ~ N(0, 0.05): length, width and height of adult heads
  vary with SD ~3.5 %, as :func:`hemexp.cohort.synth.anatomy.draw_anatomy` draws them) composed with a
  smooth random warp of 6-10 mm ('different'). A warp alone is not another head: it keeps the size.

Usage: ``python scripts/identity_roc.py [--patients 12] [--template-pairs 8] [--matrix 64]``. Small
matrices keep it to about two and a half minutes on two cores (126 s for 12 + 8 pairs of each kind).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml
from scipy import ndimage

from hemexp.cohort.synth import cohort as synth
from hemexp.cohort.synth.fields import rotation_matrix
from hemexp.core.clinical import dice
from hemexp.io.ingest import load_ct, load_mask
from hemexp.io.nifti import make_image
from hemexp.preprocess.grid import model_grid
from hemexp.preprocess.identity import affine_measures, identity_failure, identity_measures, identity_region
from hemexp.preprocess.pipeline import lesion_safe_brain, resample_timepoint, skull_stripped
from hemexp.preprocess.register import (
    FU_TO_BL,
    FU_TO_BL_RIGID,
    MODEL_GRID,
    TRANSFORMS_DIR,
    apply,
    nib_to_ants,
    register_patient,
)

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_DIR = ROOT.parent / "shared" / "data" / "ct_template"
LABELS = {"iph": 1, "ivh": 2}
SAVE_DIR: Path | None = None  # --save-dir: keep each pair's model-grid volumes (pair_NNN.npz, in run order)
# feature -> +1 when higher means 'same patient', -1 when lower does
FEATURES = {"ncc": 1, "max_scale_change": -1, "inplane_scale_change": -1, "slice_scale_change": -1, "abs_log_det": -1, "anisotropy": -1, "brain_dice": 1,
            "csf_dice": 1, "skull_dice": 1}
CSF_HU = 15.0
HEAD_LOG_SCALE_SD = 0.05  # per-axis log size difference of two adult heads (each ~3.5 % SD)
BONE_HU = 300.0
SKULL_REACH_MM = 12.0


def auc(pos: list[float], neg: list[float]) -> float:
    """Mann-Whitney AUC: probability a 'same' pair scores above a 'different' one (ties count half)."""
    p, n = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return round(float(dice(a, b)), 4) if (a.any() or b.any()) else float("nan")


def skull_dice(bl: dict, fu: dict, rigid: Path) -> float:
    """Bone (> 300 HU) overlap near the baseline brain, follow-up moved by the rigid stage only."""
    moved = np.asarray(apply(nib_to_ants(bl["raw"]), nib_to_ants(fu["raw"]), [rigid], "linear").numpy())
    spacing = np.linalg.norm(bl["raw"].affine[:3, :3], axis=0)
    near = ndimage.distance_transform_edt(np.asarray(bl["brain"].dataobj) == 0, sampling=spacing) < SKULL_REACH_MM
    return _dice((np.asarray(bl["raw"].dataobj) > BONE_HU) & near, (moved > BONE_HU) & near)


def measure(bl: dict, fu: dict, template, tmask, cfg: dict, work: Path) -> dict[str, float]:
    """Identity measures of one pair; ``bl``/``fu`` hold ``ct`` (skull-stripped), ``brain``, ``iph``, ``ivh``
    (and ``raw``, the unstripped CT, for the skull feature)."""
    pre = cfg["preprocess"]
    grid = model_grid(tmask, pre["spacing_mm"], pre["crop"])
    pdir = Path(tempfile.mkdtemp(dir=work))
    register_patient(nib_to_ants(template), nib_to_ants(bl["ct"]), nib_to_ants(fu["ct"]), cfg["seed"],
                     pre["registration_mm"], pdir / TRANSFORMS_DIR)
    grid.save(pdir / TRANSFORMS_DIR / MODEL_GRID)
    vols = {}
    for tp, parts in (("bl", bl), ("fu", fu)):
        vols.update(resample_timepoint(parts["ct"], parts["brain"], {"iph": parts["iph"], "ivh": parts["ivh"]}, pdir, tp))
    out = identity_measures(vols, tuple(pre["hu_window"]))
    out.update(affine_measures(pdir / TRANSFORMS_DIR / FU_TO_BL))
    out["abs_log_det"] = abs(out["log_det"])
    out["inplane_scale_change"] = round(max(abs(out["scale_x"] - 1), abs(out["scale_y"] - 1)), 4)
    out["slice_scale_change"] = round(abs(out["scale_z"] - 1), 4)
    if SAVE_DIR is not None:
        np.savez_compressed(SAVE_DIR / f"pair_{len(list(SAVE_DIR.glob('*.npz'))):03d}.npz", **vols)
    out["brain_dice"] = round(dice(vols["bl_brain"], vols["fu_brain"]), 4)
    region = identity_region(vols["bl_brain"], vols["fu_brain"],
                             [vols[k] for k in ("bl_iph", "bl_ivh", "fu_iph", "fu_ivh")])
    out["csf_dice"] = _dice(region & (vols["bl_ct"] < CSF_HU), region & (vols["fu_ct"] < CSF_HU))
    if "raw" in bl and "raw" in fu:
        out["skull_dice"] = skull_dice(bl, fu, pdir / TRANSFORMS_DIR / FU_TO_BL_RIGID)
    return out


# ---------------------------------------------------------------- synthetic cohort pairs


def synthetic_scans(cfg: dict, n: int, work: Path) -> dict[str, dict[str, dict]]:
    """Ingested, skull-stripped baseline and follow-up of ``n`` synthetic patients."""
    cfg = copy.deepcopy(cfg)
    cfg["results_dir"] = str(work / "results")
    syn = cfg["cohort"]["synthetic"]
    scans = {}
    for i in range(n):
        pid = f"R{i:02d}"
        sim = synth._baseline(cfg, pid, "A", "train")
        synth._followup(cfg, sim)
        paths = synth.synthetic_inputs(cfg, pid)
        scans[pid] = {}
        for tp in ("baseline", "followup"):
            ct = load_ct(paths[f"{tp}_ct"], pid)
            parts = {"ct": ct, **{k: load_mask(paths[f"{tp}_{k}"], ct, k, LABELS, False, pid) for k in ("iph", "ivh")}}
            brain, _ = lesion_safe_brain(parts["ct"], parts["iph"], parts["ivh"], cfg, pid)
            parts["brain"] = make_image(brain, ct.affine)
            parts["ct"] = skull_stripped(ct, brain)
            parts["raw"] = ct
            scans[pid][tp] = parts
        print(f"  synthetic {pid}: slices {syn['slice_thickness_mm']} mm range, "
              f"bl {scans[pid]['baseline']['ct'].shape}, fu {scans[pid]['followup']['ct'].shape}", flush=True)
    return scans


# ---------------------------------------------------------------- template pairs


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], amplitude_vox: float, sigma_vox: float) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return f * (amplitude_vox / (np.abs(f).max() + 1e-6))


def warped_head(data: np.ndarray, rng: np.random.Generator, amplitude_mm: float, spacing: float) -> tuple[np.ndarray, ...]:
    """Displacement fields (voxels) of a smooth random deformation: another head shape when large."""
    coarse = tuple(max(4, s // 8) for s in data.shape)
    fields = []
    for _ in range(3):
        f = _smooth_field(rng, coarse, amplitude_mm / spacing, 1.0)
        fields.append(ndimage.zoom(f, [s / c for s, c in zip(data.shape, coarse, strict=True)], order=1))
    return tuple(fields)


def acquire(vol: np.ndarray, mask: np.ndarray, lesion: np.ndarray, affine: np.ndarray, rng: np.random.Generator,
            inplane_mm: float, thickness_mm: float, warp: tuple[np.ndarray, ...] | None,
            scale: np.ndarray | None = None) -> dict:
    """Reslice template-space volumes into a posed thick-slice scan with noise (what a scanner would give);
    ``scale`` (per template axis, about the volume centre) makes a head that much longer/wider/taller."""
    pose = rotation_matrix(rng.normal(0, 3.0, 3))
    shift = rng.normal(0, 3.0, 3)
    src_spacing = np.linalg.norm(affine[:3, :3], axis=0)
    extent = np.array(vol.shape) * src_spacing
    shape = tuple(int(v) for v in np.ceil(extent / np.array([inplane_mm, inplane_mm, thickness_mm])))
    out_aff = np.diag([inplane_mm, inplane_mm, thickness_mm, 1.0])
    centre_src = affine[:3, :3] @ ((np.array(vol.shape) - 1) / 2) + affine[:3, 3]
    out_aff[:3, 3] = centre_src - out_aff[:3, :3] @ ((np.array(shape) - 1) / 2)
    idx = np.indices(shape, dtype=np.float32).reshape(3, -1)
    world = out_aff[:3, :3] @ idx + out_aff[:3, 3:4]
    world = pose @ (world - centre_src[:, None]) + centre_src[:, None] + shift[:, None]
    if scale is not None:
        world = centre_src[:, None] + (world - centre_src[:, None]) / np.asarray(scale, np.float64)[:, None]
    src = np.linalg.solve(affine[:3, :3], world - affine[:3, 3:4])
    if warp is not None:
        src = src + np.stack([ndimage.map_coordinates(w, src, order=1, mode="nearest") for w in warp])
    # thick slices average the source over the slab: sample at sub-slice offsets along z
    subs = np.linspace(-0.4, 0.4, 5) * thickness_mm / src_spacing[2]
    ct = np.mean([ndimage.map_coordinates(vol, src + np.array([[0], [0], [d]]), order=1, cval=0.0) for d in subs], axis=0)
    m = ndimage.map_coordinates(mask.astype(np.float32), src, order=1) > 0.5
    les = ndimage.map_coordinates(lesion.astype(np.float32), src, order=1) > 0.5
    ct = ct.reshape(shape)
    m, les = m.reshape(shape), les.reshape(shape)
    ct = np.where(m, ct + rng.normal(0, 3.0, shape), 0.0).astype(np.float32)
    img = make_image(ct, out_aff)
    zero = make_image(np.zeros(shape, np.uint8), out_aff)
    return {"ct": img, "brain": make_image(m.astype(np.uint8), out_aff), "iph": make_image(les.astype(np.uint8), out_aff),
            "ivh": zero}


def template_pairs(n: int, work: Path, cfg: dict, template, tmask) -> tuple[list, list]:
    """('same' measures, 'different' measures) of ``n`` template-based pairs each."""
    rng = np.random.default_rng(11)
    vol = np.asarray(template.dataobj, np.float32)
    mask = np.asarray(tmask.dataobj) > 0
    aff = template.affine
    spacing = float(np.linalg.norm(aff[:3, :3], axis=0).mean())
    inside = np.argwhere(ndimage.binary_erosion(mask, iterations=int(25 / spacing)))
    same, diff = [], []
    ii = np.indices(vol.shape, dtype=np.float32)
    for k in range(n):
        c = inside[rng.integers(len(inside))]
        r0 = rng.uniform(8, 15) / spacing
        r1 = r0 * rng.uniform(1.0, 1.4)
        dist = np.sqrt(((ii - c[:, None, None, None]) ** 2).sum(0))
        les0, les1 = (dist < r0) & mask, (dist < r1) & mask
        bl = acquire(np.where(les0, 65.0, vol), mask, les0, aff, rng, 2.0, rng.choice([1.0, 2.5, 5.0]), None)
        mild = warped_head(vol, rng, 1.5, spacing)  # mass effect / positioning: a small warp
        fu = acquire(np.where(les1, 65.0, vol), mask, les1, aff, rng, 2.0, rng.choice([1.0, 2.5, 5.0]), mild)
        same.append(measure(bl, fu, template, tmask, cfg, work))
        other = warped_head(vol, rng, rng.uniform(6.0, 10.0), spacing)  # a differently shaped head ...
        size = np.exp(rng.normal(0.0, HEAD_LOG_SCALE_SD, 3))  # ... of another size
        fu_other = acquire(np.where(les1, 65.0, vol), mask, les1, aff, rng, 2.0, rng.choice([1.0, 2.5, 5.0]), other,
                           size)
        diff.append({**measure(bl, fu_other, template, tmask, cfg, work), "true_scale": [round(float(v), 3) for v in size]})
        print(f"  template pair {k}: same {same[-1]}, different {diff[-1]}", flush=True)
    return same, diff


def rule_passes(m: dict, min_ncc: float | None, max_scale: float | None, max_slice: float | None) -> bool:
    return identity_failure(m, min_ncc, max_scale, max_slice) is None


def report(kind: str, same: list[dict], diff: list[dict], min_ncc: float, max_scale: float, max_slice: float) -> None:
    """Per-feature AUC and the rule's TPR/FPR (positive = same patient = accepted)."""
    print(f"{kind}: {len(same)} same-patient pairs, {len(diff)} different-patient pairs")
    for name, sign in FEATURES.items():
        s = [m[name] for m in same if name in m and np.isfinite(m[name])]
        d = [m[name] for m in diff if name in m and np.isfinite(m[name])]
        if not s or not d:
            continue
        print(f"  {name:20s} same {min(s):.4f}..{max(s):.4f} (median {np.median(s):.4f})  different "
              f"{min(d):.4f}..{max(d):.4f} (median {np.median(d):.4f})  AUC {auc([sign * v for v in s], [sign * v for v in d]):.3f}")
    rules = {f"ncc >= {min_ncc}": (min_ncc, None, None),
             f"x, y within 1 +- {max_scale}, z within 1 +- {max_slice}": (None, max_scale, max_slice),
             f"all axes within 1 +- {max_scale}": (None, max_scale, None),
             "combined (the pipeline's rule)": (min_ncc, max_scale, max_slice)}
    for label, (n, x, z) in rules.items():
        tpr = float(np.mean([rule_passes(m, n, x, z) for m in same]))
        fpr = float(np.mean([rule_passes(m, n, x, z) for m in diff]))
        print(f"  rule {label:48s} TPR {tpr:.2f}  FPR {fpr:.2f}")
    sweep = [(x, np.mean([rule_passes(m, None, x, 1.0) for m in same]), np.mean([rule_passes(m, None, x, 1.0) for m in diff]))
             for x in (0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05)]
    print("  in-plane scale sweep (alone): " + ", ".join(f"{x}: TPR {t:.2f} FPR {f:.2f}" for x, t, f in sweep))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "config" / "config.yaml"))
    ap.add_argument("--patients", type=int, default=12)
    ap.add_argument("--template-pairs", type=int, default=8)
    ap.add_argument("--matrix", type=int, default=64)
    ap.add_argument("--inplane-mm", type=float, default=3.5)
    ap.add_argument("--save-dir", type=Path, default=None, help="write each pair's model-grid volumes here")
    args = ap.parse_args()
    global SAVE_DIR
    if args.save_dir is not None:
        args.save_dir.mkdir(parents=True, exist_ok=True)
        SAVE_DIR = args.save_dir
    cfg = yaml.safe_load(Path(args.config).read_text())
    cfg["cohort"]["synthetic"].update(matrix=args.matrix, inplane_mm=args.inplane_mm, formats=["nifti"])
    cfg["preprocess"].update(skullstrip="builtin", registration_mm=4.0)
    min_ncc = float(cfg["preprocess"]["min_identity_ncc"])
    max_scale = float(cfg["preprocess"]["max_identity_scale_change"])
    max_slice = float(cfg["preprocess"]["max_identity_slice_scale_change"])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="identity_roc_") as tmp:
        work = Path(tmp)
        have_template = (TEMPLATE_DIR / "scct_unsmooth_SS_0.01.nii.gz").exists()
        if args.patients >= 2:
            scans = synthetic_scans(cfg, args.patients, work)
            ids = sorted(scans)
            if have_template:
                template = nib.load(TEMPLATE_DIR / "scct_unsmooth_SS_0.01.nii.gz")
                tmask = nib.load(TEMPLATE_DIR / "scct_unsmooth_SS_0.01_Mask.nii.gz")
            else:  # the first synthetic baseline stands in for the template
                template, tmask = scans[ids[0]]["baseline"]["ct"], scans[ids[0]]["baseline"]["brain"]
            same = [measure(scans[p]["baseline"], scans[p]["followup"], template, tmask, cfg, work) for p in ids]
            diff = [measure(scans[p]["baseline"], scans[q]["followup"], template, tmask, cfg, work)
                    for p, q in zip(ids, ids[1:] + ids[:1], strict=True)]
            for p, m in zip(ids, same, strict=True):
                print(f"  synthetic same {p}: {m}")
            for p, m in zip(ids, diff, strict=True):
                print(f"  synthetic different {p}: {m}")
            report("synthetic cohort", same, diff, min_ncc, max_scale, max_slice)
        if have_template and args.template_pairs > 0:
            template = nib.load(TEMPLATE_DIR / "scct_unsmooth_SS_0.01.nii.gz")
            tmask = nib.load(TEMPLATE_DIR / "scct_unsmooth_SS_0.01_Mask.nii.gz")
            # halve the template's resolution: the pairs are resliced to >= 2 mm anyway
            data = ndimage.zoom(np.asarray(template.dataobj, np.float32), 0.5, order=1)
            mdata = ndimage.zoom(np.asarray(tmask.dataobj, np.float32), 0.5, order=1) > 0.5
            aff = template.affine.copy()
            aff[:3, :3] *= 2.0
            template, tmask = make_image(np.where(mdata, data, 0).astype(np.float32), aff), make_image(mdata.astype(np.uint8), aff)
            s, d = template_pairs(args.template_pairs, work, cfg, template, tmask)
            report("CT template", s, d, min_ncc, max_scale, max_slice)
        elif not have_template:
            print(f"no CT template under {TEMPLATE_DIR}: template pairs skipped")
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
