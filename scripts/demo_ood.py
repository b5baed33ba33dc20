"""The out-of-distribution gate on one test patient, as acquired and as a thick-slice noisy scan.

Takes a pipeline test patient's ingested baseline (canonical CT and masks, ``results/ingested/{p}/``)
and its clinical values, and simulates it twice with ``hemexp simulate``: as it is (in distribution)
and re-acquired with thicker slices (groups of slices averaged to at least ``--thickness-mm``, masks
by majority) plus Gaussian noise (``--noise-hu``). Prints, and writes to ``<out>/ood_scores.md``, every
OOD feature's value, fitted range and status for both, and the warnings.

    python scripts/demo_ood.py --config config/config.yaml --patient D003 \
        --models models:/hemexp-2D-ice@champion --out results/ood_demo
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np

from hemexp.cli import main as hemexp_main
from hemexp.core.clinical import CLINICAL_NAMES
from hemexp.core.config import load_config
from hemexp.core.layout import Layout


def thicken(img: nib.Nifti1Image, k: int, mask: bool) -> nib.Nifti1Image:
    """Average each group of ``k`` slices into one (majority for a mask): a thicker-slice acquisition."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    n = data.shape[2] // k
    grouped = data[:, :, : n * k].reshape(data.shape[0], data.shape[1], n, k).mean(axis=3)
    affine = img.affine.copy()
    affine[:3, 2] *= k
    affine[:3, 3] += img.affine[:3, 2] * (k - 1) / 2.0  # first thick slice centred on its k thin ones
    out = (grouped >= 0.5).astype(np.uint8) if mask else grouped.astype(np.float32)
    return nib.Nifti1Image(out, affine)


def shifted_inputs(src: Path, dest: Path, thickness_mm: float, noise_hu: float, seed: int
                   ) -> tuple[dict[str, Path], float]:
    """Thick-slice, noisier copies of a patient's ingested baseline: (paths, the thickness reached)."""
    dest.mkdir(parents=True, exist_ok=True)
    ct = nib.load(str(src / "bl_ct.nii.gz"))
    k = max(2, math.ceil(thickness_mm / float(np.linalg.norm(ct.affine[:3, 2]))))
    thick = thicken(ct, k, mask=False)
    hu = np.asarray(thick.dataobj, dtype=np.float32)
    noisy = hu + np.random.default_rng(seed).normal(0.0, noise_hu, hu.shape).astype(np.float32) * (hu > -500)
    paths = {"ct": dest / "ct.nii.gz", "iph": dest / "iph.nii.gz", "ivh": dest / "ivh.nii.gz"}
    nib.save(nib.Nifti1Image(np.rint(noisy).astype(np.int16), thick.affine), paths["ct"])
    for kind in ("iph", "ivh"):
        nib.save(thicken(nib.load(str(src / f"bl_{kind}.nii.gz")), k, mask=True), paths[kind])
    return paths, float(np.linalg.norm(thick.affine[:3, 2]))


def simulate(paths: dict[str, Path], clinical: dict[str, float], args: argparse.Namespace, out: Path, pid: str) -> dict:
    argv = ["simulate", "--ct", paths["ct"], "--iph", paths["iph"], "--ivh", paths["ivh"], "--clinical",
            *[f"{k}={clinical[k]}" for k in CLINICAL_NAMES if k != "baseline_iph_ml"], "--flag", "0.5",
            "--n-samples", str(args.n_samples), "--patient-id", pid, "--out", out, "--config", args.config,
            "--no-progress"]
    if args.models:
        argv += ["--models", args.models]
    if hemexp_main([str(a) for a in argv]) != 0:
        raise SystemExit(f"hemexp simulate failed for {pid}")
    return json.loads((out / "summary.json").read_text())["ood"]


def table(scores: dict[str, dict]) -> str:
    names = list(next(iter(scores.values()))["features"])
    head = "| feature | " + " | ".join(f"{case} value | {case} status" for case in scores) + " | warns below | warns above |"
    rows = [head, "|---" * (1 + 2 * len(scores) + 2) + "|"]
    for name in names:
        cells, ref = [], next(iter(scores.values()))["features"][name]
        for s in scores.values():
            f = s["features"][name]
            cells += [f"{f['value']:.4g}" if f.get("value") is not None else "–", f["status"]]
        lo, hi = ref.get("lo"), ref.get("hi")
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {'–' if lo is None else f'{lo:.4g}'} | "
                    f"{'–' if hi is None else f'{hi:.4g}'} |")
    warn = "\n".join(f"- **{case}**: " + ("; ".join(s["warnings"]) or "none") for case, s in scores.items())
    return "\n".join(rows) + "\n\nWarnings:\n\n" + warn + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="config/config.yaml")
    p.add_argument("--patient", default="D003", help="a preprocessed test patient")
    p.add_argument("--models", default=None, help="model folder or models:/NAME@ALIAS (default: results/models)")
    p.add_argument("--thickness-mm", type=float, default=10.0, help="at least this slice thickness (whole slices merged)")
    p.add_argument("--noise-hu", type=float, default=15.0)
    p.add_argument("--n-samples", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (keep it under results_dir)")
    args = p.parse_args()
    cfg = load_config(args.config)
    layout = Layout.of(cfg)
    src = layout.ingested(args.patient)
    clinical = json.loads((layout.preprocessed(args.patient) / "summary.json").read_text())["clinical"]
    out = Path(args.out)
    original = {k: src / f"bl_{k}.nii.gz" for k in ("ct", "iph", "ivh")}
    scores = {"as acquired": simulate(original, clinical, args, out / "in_distribution", args.patient)}
    shifted, thickness = shifted_inputs(src, out / "shifted_inputs", args.thickness_mm, args.noise_hu, args.seed)
    scores[f"{thickness:g} mm slices + {args.noise_hu:g} HU noise"] = simulate(shifted, clinical, args, out / "shifted",
                                                                                 f"{args.patient}-shifted")
    text = f"# OOD gate: {args.patient} as acquired and re-acquired\n\n" + table(scores)
    (out / "ood_scores.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
