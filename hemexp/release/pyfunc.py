"""The released model as an MLflow pyfunc: ``mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict(df)``.

One input row is one patient: file paths of the baseline CT (NIfTI or DICOM folder) and masks, the
seven clinical values and the expansion flag; one output row is that patient's simulated follow-up
summary. ``predict`` runs the same code as ``hemexp simulate`` (baseline preprocessing against the
bundle's template, sampling, products), so a model served by MLflow and one run from the command
line give the same samples for the same seed. Products go to the row's ``out`` folder when given,
else to a temporary folder that is removed.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from hemexp.core.clinical import CLINICAL_NAMES
from hemexp.tracking.registry import MODELS

OUTPUT_COLUMNS = ("patient_id", "iph_median_ml", "iph_80_low_ml", "iph_80_high_ml", "total_median_ml",
                  "p_expansion", "p_ivh", "n_ood_warnings", "out")
PARAMS = {"n_samples": 20, "guidance_scale": 1.0, "steps": 25, "seed": 0}


def signature() -> Any:
    """Input, output and parameter schema of the pyfunc (what the registry shows and checks)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "ct"), ColSpec("string", "iph"), ColSpec("string", "ivh", required=False),
                     *[ColSpec("double", n) for n in CLINICAL_NAMES], ColSpec("string", "flag", required=False),
                     ColSpec("string", "patient_id", required=False), ColSpec("string", "out", required=False)])
    outputs = Schema([ColSpec("string", c) if c in ("patient_id", "out") else
                      ColSpec("long" if c == "n_ood_warnings" else "double", c) for c in OUTPUT_COLUMNS])
    params = ParamSchema([ParamSpec(k, "long" if isinstance(v, int) else "double", v) for k, v in PARAMS.items()])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


class HemExpSimulator(mlflow.pyfunc.PythonModel):
    """Simulated follow-ups of each input patient from the bundled models."""

    def load_context(self, context: Any) -> None:
        import yaml

        self.bundle = Path(context.artifacts["bundle"])
        self.config = yaml.safe_load((self.bundle / "config.yaml").read_text())
        self.variant = (self.bundle / "variant.txt").read_text().strip()

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from hemexp.sampling.sampler import SamplerSettings
        from hemexp.sampling.simulate import run_simulate

        p = {**PARAMS, **(params or {})}
        rows = []
        with tempfile.TemporaryDirectory(prefix="hemexp_pyfunc_") as work:
            cfg = copy.deepcopy(self.config)
            cfg["results_dir"] = str(Path(work) / "results")
            settings = SamplerSettings.from_config(cfg["sampling"], steps=int(p["steps"]),
                                                   guidance_scale=float(p["guidance_scale"]), seed=int(p["seed"]))
            for i, row in enumerate(model_input.to_dict("records")):
                out = Path(row["out"]) if _given(row.get("out")) else Path(work) / f"patient_{i}"
                args = argparse.Namespace(
                    models=str(self.bundle / MODELS), variant=self.variant, ct=row["ct"], iph=row["iph"],
                    ivh=row["ivh"] if _given(row.get("ivh")) else None,
                    flag=str(row["flag"]) if _given(row.get("flag")) else "classifier",
                    clinical=[f"{n}={row[n]}" for n in CLINICAL_NAMES if _given(row.get(n))], clinical_json=None,
                    overrides=None, template=None, template_mask=None, n_samples=int(p["n_samples"]), device=None,
                    patient_id=str(row["patient_id"]) if _given(row.get("patient_id")) else f"patient_{i}",
                    out=str(out), no_progress=True)
                run_simulate(args, cfg, settings)
                rows.append(_summary_row(out, row))
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


def _given(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and value != value) and str(value) != ""


def _summary_row(out: Path, row: dict[str, Any]) -> dict[str, Any]:
    from hemexp.core.files import read_json

    s = read_json(out / "summary.json")
    fu = s["followup_ml"]
    lo, hi = fu["iph"]["interval_80"]
    return {"patient_id": s["patient_id"], "iph_median_ml": fu["iph"]["median"], "iph_80_low_ml": lo,
            "iph_80_high_ml": hi, "total_median_ml": fu["total"]["median"], "p_expansion": s["p_expansion"],
            "p_ivh": s["p_ivh"], "n_ood_warnings": len(s.get("ood", {}).get("warnings", [])),
            "out": str(out) if _given(row.get("out")) else ""}
