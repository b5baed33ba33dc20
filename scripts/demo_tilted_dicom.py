"""A gantry-tilted DICOM CT with masks drawn on a dcm2niix-style conversion, through to simulated follow-ups.

What a team with a real tilted head CT does: the scanner writes a tilted series, the annotator opens
the dcm2niix conversion (an axial grid with equidistant slices, which is not HemExp's own
tilt-corrected grid) and draws IPH/IVH masks there, and ``hemexp simulate`` takes the DICOM folder
and those masks. Here the head is a synthetic cohort patient's baseline (its own raw files from a
pipeline run), re-sliced onto a tilted stack and written as DICOM; the masks are its native masks
sampled nearest-neighbour onto the dcm2niix-style grid. The script prints the geometry HemExp found,
the mask volumes on each grid, and the sample set's summary, so the whole path is checked end to end.

    python scripts/demo_tilted_dicom.py --raw results/raw --patient D001 --models results/models \
        --config config/config.yaml --out /tmp/tilted_demo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy.ndimage import map_coordinates

from hemexp.cli import main as hemexp_main
from hemexp.cohort.synth.dicom_writer import write_dicom_series
from hemexp.core.clinical import CLINICAL_NAMES, mask_volume_ml
from hemexp.io.ingest import load_ct, load_mask
from hemexp.io.nifti import spacing_mm

LPS = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS sign flip of x and y
DCM2NIIX_SLICE_MM = 2.62


def tilted_stack(ct: nib.Nifti1Image, tilt_deg: float, table_step_mm: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Re-slice ``ct`` onto a gantry-tilted stack around its centre: (HU [cols, rows, K], IOP, positions, pixel)."""
    pixel = float(abs(ct.affine[0, 0]))
    n = ct.shape[0]
    theta = np.radians(tilt_deg)
    row_dir, col_dir = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(theta), -np.sin(theta)])
    centre_lps = nib.affines.apply_affine(ct.affine, (np.array(ct.shape) - 1) / 2.0) * LPS
    extent_z = ct.shape[2] * abs(ct.affine[2, 2])
    n_slices = int(extent_z / table_step_mm)
    corner = centre_lps - (n / 2) * pixel * (row_dir + col_dir)
    positions = np.array([corner + [0.0, 0.0, table_step_mm * (k - n_slices / 2)] for k in range(n_slices)])
    c, r = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    inverse = np.linalg.inv(ct.affine)
    data = np.asarray(ct.dataobj, dtype=np.float32)
    volume = np.empty((n, n, n_slices), np.float32)
    for k, pos in enumerate(positions):
        pts_lps = pos + pixel * (c[..., None] * row_dir + r[..., None] * col_dir)
        ijk = nib.affines.apply_affine(inverse, pts_lps * LPS)
        volume[:, :, k] = map_coordinates(data, np.moveaxis(ijk, -1, 0), order=1, cval=-1000.0)
    return volume, np.concatenate([row_dir, col_dir]), positions, pixel


def dcm2niix_style(mask: nib.Nifti1Image, pixel: float) -> nib.Nifti1Image:
    """The mask nearest-neighbour on an axial grid with equidistant 2.62 mm slices over the same head."""
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in mask.shape], indexing="ij")).reshape(3, -1).T
    world = nib.affines.apply_affine(mask.affine, corners)
    lo, hi = world.min(0), world.max(0)
    spacing = np.array([pixel, pixel, DCM2NIIX_SLICE_MM])
    shape = tuple(int(v) for v in np.floor((hi - lo) / spacing) + 1)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = lo
    ijk = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij"), axis=0).reshape(3, -1)
    src = nib.affines.apply_affine(np.linalg.inv(mask.affine) @ affine, ijk.T).T
    data = map_coordinates(np.asarray(mask.dataobj, np.float32), src, order=0, cval=0.0).reshape(shape)
    return nib.Nifti1Image(data.astype(np.uint8), affine)


def run(raw: Path, patient: str, models: Path, config: Path, out: Path, tilt_deg: float) -> dict:
    row = pd.read_csv(raw / "manifest.tsv", sep="\t").set_index("patient_id").loc[patient]
    ct = load_ct(raw / row["baseline_ct"], patient)
    masks = {k: load_mask(raw / row[f"baseline_{k}"], ct, k, {"iph": 1, "ivh": 2}, False, patient)
             for k in ("iph", "ivh")}
    volume, iop, positions, pixel = tilted_stack(ct, tilt_deg, float(abs(ct.affine[2, 2])))
    dicom_dir = out / "input" / "baseline_ct"
    write_dicom_series(volume, np.diag([pixel, pixel, float(abs(ct.affine[2, 2])), 1.0]), dicom_dir, patient,
                       "HEAD TILTED", orientation_lps=iop, slice_positions_lps=positions, gantry_tilt_deg=tilt_deg)
    facts: dict = {"patient": patient, "tilt_deg": tilt_deg, "native_ml": {}, "dcm2niix_grid_ml": {},
                   "ingested_ml": {}}
    paths = {}
    ingested = load_ct(dicom_dir, patient)
    facts["ingest"] = {k: ingested.extra["ingest"].get(k) for k in ("tilt_deg", "spacing_mm")
                       if k in ingested.extra["ingest"]}
    for kind, mask in masks.items():
        drawn = dcm2niix_style(mask, pixel)
        paths[kind] = out / "input" / f"baseline_{kind}.nii.gz"
        nib.save(drawn, str(paths[kind]))
        back = load_mask(paths[kind], ingested, kind, {"iph": 1, "ivh": 2}, False, patient)
        for key, img in (("native_ml", mask), ("dcm2niix_grid_ml", drawn), ("ingested_ml", back)):
            facts[key][kind] = round(mask_volume_ml(np.asarray(img.dataobj) > 0, spacing_mm(img)), 3)
    clinical = [f"{k}={row[k]}" for k in CLINICAL_NAMES if k != "baseline_iph_ml"]
    argv = ["simulate", "--ct", str(dicom_dir), "--iph", str(paths["iph"]), "--ivh", str(paths["ivh"]),
            "--models", str(models), "--config", str(config), "--patient-id", patient, "--out",
            str(out / "simulated"), "--no-progress", "--clinical", *clinical]
    facts["simulate_rc"] = hemexp_main(argv)
    summary = out / "simulated" / "summary.json"
    if summary.exists():
        facts["summary"] = json.loads(summary.read_text())
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, required=True, help="a pipeline run's raw/ folder (synthetic cohort)")
    parser.add_argument("--patient", default="D001")
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tilt-deg", type=float, default=15.0)
    args = parser.parse_args()
    facts = run(args.raw, args.patient, args.models, args.config, args.out, args.tilt_deg)
    print(json.dumps(facts, indent=1, default=str))


if __name__ == "__main__":
    main()
