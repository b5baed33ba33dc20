"""Evaluation figures draw from the bookkeeping tables they are meant for (composition check)."""

import numpy as np
import pandas as pd
from PIL import Image

from hemexp.evaluation.calibration import calibration_summary, patient_calibration, rank_histogram
from hemexp.evaluation.figures import (
    plot_calibration_bars,
    plot_guidance_and_perturbations,
    plot_pit_histogram,
)
from hemexp.evaluation.guidance.effects import FAVOURING, STABLE, guidance_separation, perturbation_effects
from hemexp.sampling.scenarios import UNPERTURBED


def _png_ok(path):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
        assert np.asarray(im.convert("L")).std() > 5  # something was drawn


def test_fig3_pit_and_calibration(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for w in (0.0, 1.0, 2.0):
        for pid in ("P1", "P2", "P3"):
            for scen, slope in ((FAVOURING, 3.0), (STABLE, -1.0), (UNPERTURBED, 0.0), ("gcs_3", 1.0)):
                rows += [{"guidance_scale": w, "patient_id": pid, "scenario": scen, "sample": s,
                          "total_ml": 20 + slope * w + rng.normal(), "baseline_total_ml": 18.0} for s in range(5)]
    vols = pd.DataFrame(rows)
    sep = guidance_separation(vols)
    eff = perturbation_effects(vols[vols["guidance_scale"] == 1.0].drop(columns="guidance_scale"))
    plot_guidance_and_perturbations(sep, eff, tmp_path / "fig3.png", title="test")
    _png_ok(tmp_path / "fig3.png")

    cal = vols[(vols["scenario"] == UNPERTURBED) & (vols["guidance_scale"] == 1.0)].rename(columns={"total_ml": "volume_ml"})
    cal = cal.assign(truth_ml=cal["patient_id"].map({"P1": 19.0, "P2": 21.0, "P3": 30.0}))
    per = patient_calibration(cal, [0.5, 0.8])
    plot_pit_histogram(rank_histogram(per, 5), tmp_path / "pit.png")
    plot_calibration_bars(calibration_summary(per, [0.5, 0.8]), tmp_path / "cal.png")
    _png_ok(tmp_path / "pit.png")
    _png_ok(tmp_path / "cal.png")
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes left no temporaries
