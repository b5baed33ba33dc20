"""The validity study's products: one table set per studied variant (an ablation row each), the
cross-variant summary, the figure, and the flat numbers for DVC/MLflow.

Layout (under ``<results>/validity/``): ``effects.csv``, ``guidance.csv``, ``adherence.csv``,
``calibration.csv``, ``patient_scores.csv``, ``targets.csv`` (all long, with a ``variant`` column),
``study.md`` (every table, readable), ``study.json`` (flat numbers) and ``validity.png``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from hemexp.core.config import variants as configured_variants  # noqa: E402
from hemexp.core.files import atomic_path, read_json, save_figure, write_json  # noqa: E402
from hemexp.core.layout import Layout  # noqa: E402
from hemexp.core.tables import fmt_floats, markdown_table, write_csv  # noqa: E402
from hemexp.evaluation.collect import reference_truth  # noqa: E402
from hemexp.evaluation.guidance.effects import read_truth  # noqa: E402
from hemexp.evaluation.validity import tables as T  # noqa: E402
from hemexp.evaluation.validity.names import TABLES  # noqa: E402
from hemexp.sampling.scenarios import scenarios_from_config  # noqa: E402


def patient_frame(cfg: Mapping[str, Any], patient_ids: Sequence[str], volumes: pd.DataFrame) -> pd.DataFrame:
    """Per test patient: clinical values (truth.json), true flag and follow-up truth and baseline (grid mL)."""
    _, clinical = read_truth(Layout.of(cfg).truth)
    rows = []
    for pid in patient_ids:
        truth = reference_truth(pid, Layout.of(cfg).preprocessed(pid))
        mine = volumes[volumes["patient_id"] == pid]
        base_iph, base_total = float(mine["baseline_iph_ml"].iloc[0]), float(mine["baseline_total_ml"].iloc[0])
        rows.append({"patient_id": pid, "true_flag": int(truth["expansion"]), "truth_iph_ml": truth["truth_iph_ml"],
                     "truth_ivh_ml": truth["truth_ivh_ml"], "truth_total_ml": truth["truth_total_ml"],
                     "grid_baseline_iph_ml": base_iph, "grid_baseline_ivh_ml": base_total - base_iph})
    return pd.DataFrame(rows).merge(clinical.drop(columns="split", errors="ignore"), on="patient_id", how="left")


def diagnostics_table(layout: Layout, studied: Sequence[str]) -> pd.DataFrame:
    """Per variant and noise step: how far the x0 prediction moves for flag, clinical and baseline
    changes, the denoising fit on training vs test patients (share of Δz explained, overall and near
    the baseline hematoma; the share of Δz's energy there; loss penalty of a flipped flag or nulled
    clinical input) (:mod:`hemexp.evaluation.validity.diagnostics`), and the
    VAE's baseline volume bias."""
    rows = []
    for variant in studied:
        d = read_json(layout.validity_diagnostics(variant))
        for i, step in enumerate(d["noise_steps"]):
            rows.append({"variant": variant, "noise_step": step, "x0_rms": d["x0_rms"][i],
                         "flag_flip_rms": d["flag_rms"][i], "null_clinical_rms": d["clinical_rms"][i],
                         "other_baseline_rms": d["baseline_rms"][i], "flag_over_baseline": d["flag_over_baseline"][i],
                         "clinical_over_baseline": d["clinical_over_baseline"][i],
                         "vae_iph_bias_ml": d["vae_iph_bias_ml_mean"], "vae_iph_abs_bias_ml": d["vae_iph_bias_ml_mae"],
                         **{f"{split}_{k}": d["fit"][split][k][i] for split in ("train", "test")
                            for k in ("explained", "explained_near", "near_energy_share", "flag_flip_penalty",
                                      "null_clinical_penalty")}})
    return pd.DataFrame(rows)


def validity_bootstrap(cfg: Mapping[str, Any]) -> T.Bootstrap:
    """The patient bootstrap every interval of the study is drawn with (``evaluation.validity``)."""
    v = cfg["evaluation"]["validity"]
    return T.Bootstrap(int(v["bootstrap"]), float(v["ci"]), int(v["seed"]))


def truth_adherence(cfg: Mapping[str, Any], layout: Layout, studied: Sequence[str]) -> pd.DataFrame:
    """:func:`~hemexp.evaluation.validity.tables.truth_adherence_table` of the first studied variant's
    diagnostics: the truth through the grid and the VAE does not depend on the diffusion variant (one VAE
    per results folder; the sampled slices depend on the baseline only)."""
    return T.truth_adherence_table(read_json(layout.validity_diagnostics(studied[0]))["patients"],
                                   validity_bootstrap(cfg))


def row_label(variant: str, decode: str) -> str:
    """The ablation row of one (variant, decode mode): ``2D-ice / residual``."""
    return f"{variant} / {decode}"


def variant_tables(cfg: Mapping[str, Any], variant: str, label: str, volumes: pd.DataFrame,
                   patients: pd.DataFrame, law: Mapping[str, float]) -> dict[str, pd.DataFrame]:
    """Every table of one ablation row (a studied variant under one decode mode), labelled ``label``."""
    v = cfg["evaluation"]["validity"]
    boot = validity_bootstrap(cfg)
    spec = configured_variants(cfg)[variant]
    single, profiles = scenarios_from_config(cfg["evaluation"])
    levels = [float(x) for x in cfg["evaluation"]["interval_levels"]]
    scale = float(cfg["sampling"]["guidance_scale"])
    effects = T.effect_table(volumes, patients, single, law, scale, spec.uses_flag, boot)
    guidance = T.guidance_table(volumes, patients, profiles, law, spec.uses_flag, boot)
    adherence = T.adherence_table(volumes, boot) if spec.uses_flag else pd.DataFrame()
    scores = T.patient_scores(volumes, patients, law, spec.uses_flag, levels, int(v["oracle_draws"]), int(v["seed"]))
    calibration = T.calibration_table(scores, levels, boot)
    targets = T.targets_table(effects, guidance, adherence, calibration, spec.uses_flag)
    out = {"effects": effects, "guidance": guidance, "adherence": adherence, "calibration": calibration,
           "patient_scores": scores, "targets": targets}
    return {k: t.assign(variant=label) if not t.empty else t for k, t in out.items()}


def slug(label: str) -> str:
    """An ablation row label as a metric-key prefix: ``2D-ice / residual`` -> ``2D-ice.residual``."""
    return label.replace(" / ", ".").replace(" ", "_")


def _numbers(tables: Mapping[str, pd.DataFrame]) -> dict[str, float]:
    tables = {k: t.assign(variant=t["variant"].map(slug)) if "variant" in t else t for k, t in tables.items()}
    out: dict[str, float] = {}
    for r in tables["truth_adherence"].to_dict("records"):  # one set for the study: no variant in it
        out[f"truth.adherence.{r['measured_on']}.flag{r['true_flag']}"] = r["estimate"]
    for r in tables["effects"].to_dict("records") if not tables["effects"].empty else []:
        out[f"{r['variant']}.effect.{r['scenario']}.learned_ml"] = r["learned_ml"]
        out[f"{r['variant']}.effect.{r['scenario']}.true_ml"] = r["true_ml"]
    for r in tables["adherence"].to_dict("records") if not tables["adherence"].empty else []:
        out[f"{r['variant']}.adherence.flag{r['requested_flag']}"] = r["estimate"]
    for r in tables["calibration"].to_dict("records"):
        key = r["quantity"].replace(" ", "_").replace("/", "over").replace("%", "pct").replace("(mL)", "ml")
        out[f"{r['variant']}.{r['volume']}.{key}"] = r["estimate"]
    for r in tables["targets"].to_dict("records"):
        if r["met"] is not None:
            out.setdefault(f"{r['variant']}.targets_met", 0.0)
            out[f"{r['variant']}.targets_met"] += float(bool(r["met"]))
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}


def plot_study(tables: Mapping[str, pd.DataFrame], studied: Sequence[str], path: Path) -> None:
    """One row per variant: learned vs law effects (95 % intervals), guidance sweep, PIT of the total."""
    fig, axes = plt.subplots(len(studied), 3, figsize=(15, 4 * len(studied)), squeeze=False)
    for row, variant in zip(axes, studied, strict=True):
        eff = tables["effects"]
        eff = eff[eff["variant"] == variant] if not eff.empty else eff
        if len(eff):
            y = np.arange(len(eff))
            row[0].errorbar(eff["learned_ml"], y, xerr=[eff["learned_ml"] - eff["learned_low"],
                            eff["learned_high"] - eff["learned_ml"]], fmt="o", label="learned (95 % CI)")
            row[0].plot(eff["true_ml"], y, "kx", label="law (like with like)")
            row[0].set_yticks(y, eff["scenario"])
            row[0].axvline(0, color="grey", lw=0.5)
            row[0].legend(fontsize=8)
        row[0].set_title(f"{variant}: ΔV total vs unperturbed (mL)")
        gui = tables["guidance"]
        gui = gui[gui["variant"] == variant] if not gui.empty else gui
        for rule, g in gui.groupby("guidance_rule", sort=False) if len(gui) else ():
            g = g.sort_values("guidance_scale")
            row[1].errorbar(g["guidance_scale"], g["separation_ml"],
                            yerr=[g["separation_ml"] - g["separation_low"],
                                  g["separation_high"] - g["separation_ml"]], fmt="o-", label=f"learned ({rule})")
        if len(gui):
            law_line = gui.drop_duplicates("guidance_scale").sort_values("guidance_scale")
            row[1].plot(law_line["guidance_scale"], law_line["true_separation_ml"], "k--",
                        label="law (conditional, w = 1)")
            row[1].legend(fontsize=8)
        row[1].set_title("guidance separation: favouring − stable (mL)")
        row[1].set_xlabel("guidance scale")
        sc = tables["patient_scores"]
        counts = T.pit_counts(sc[sc["variant"] == variant], "total") if len(sc) else np.zeros(1)
        row[2].bar(np.arange(len(counts)), counts, color="tab:blue")
        if counts.sum():
            row[2].axhline(counts.sum() / len(counts), color="k", ls="--", lw=1, label="calibrated")
            row[2].legend(fontsize=8)
        row[2].set_title("PIT rank of the true total volume")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def write_validity_report(cfg: Mapping[str, Any], patient_ids: Sequence[str], studied: Sequence[str]) -> dict[str, float]:
    """Read every studied variant's samples, score them, and write the study's products."""
    layout = Layout.of(cfg)
    law, _ = read_truth(layout.truth)
    per_variant, labels = [], []
    for variant in studied:
        volumes = pd.read_csv(layout.validity_volumes(variant))
        volumes = volumes[volumes["patient_id"].isin(patient_ids)]
        patients = patient_frame(cfg, sorted(volumes["patient_id"].unique()), volumes)
        for decode, rows in volumes.groupby("decode", sort=True):
            labels.append(row_label(variant, str(decode)))
            per_variant.append(variant_tables(cfg, variant, labels[-1], rows, patients, law))
    tables = {k: pd.concat([t[k] for t in per_variant if not t[k].empty], ignore_index=True)
              if any(not t[k].empty for t in per_variant) else pd.DataFrame() for k in TABLES}
    tables["diagnostics"] = diagnostics_table(layout, studied)
    tables["truth_adherence"] = truth_adherence(cfg, layout, studied)
    for name, table in tables.items():
        write_csv(table, layout.validity_product(f"{name}.csv"))
    numbers = {**_numbers(tables), "n_test_patients": float(len(patient_ids))}
    write_json(layout.validity_product("study.json"), {"law": law, "numbers": numbers})
    _write_markdown(tables, law, labels, len(patient_ids), layout.validity_product("study.md"))
    plot_study(tables, labels, layout.validity_product("validity.png"))
    return numbers


def targets_summary(targets: pd.DataFrame, labels: Sequence[str]) -> pd.DataFrame:
    """The targets side by side, one column per ablation row: the measured value, and ✓ / ✗ for met or
    missed (the study's one-glance answer to "which change helped")."""
    if targets.empty:
        return pd.DataFrame()
    mark = {True: " ✓", False: " ✗"}
    cells = targets.assign(cell=[f"{m}{mark.get(ok, '')}" for m, ok in zip(targets["measured"], targets["met"],
                                                                          strict=True)])
    wide = cells.pivot(index="target", columns="variant", values="cell")
    order = list(dict.fromkeys(targets["target"]))
    return wide.reindex(index=order, columns=[c for c in labels if c in wide.columns]).fillna("").reset_index()


HEADINGS = {"truth_adherence": "Adherence of the true follow-ups, measured as samples are"}


def _write_markdown(tables: Mapping[str, pd.DataFrame], law: Mapping[str, float], studied: Sequence[str],
                    n_patients: int, path: Path) -> None:
    parts = [f"# Validity study: {n_patients} held-out test patients, variants {', '.join(studied)}\n",
             "Growth law: " + ", ".join(f"{k} {v:g}" for k, v in law.items()) + "\n",
             "Estimates are means over test patients with 95 % patient-bootstrap intervals. Flag-conditioned "
             "variants are sampled under each patient's true flag and compared with the law given that flag.\n"]
    summary = targets_summary(tables["targets"], studied)
    if not summary.empty:
        parts.append("## Summary: targets per ablation row\n\n" + markdown_table(summary))
    for name in ("targets", "effects", "guidance", "adherence", "truth_adherence", "calibration", "diagnostics"):
        t = tables[name]
        if not t.empty:
            parts.append(f"## {HEADINGS.get(name, name.capitalize())}\n\n" + markdown_table(fmt_floats(t)))
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts) + "\n")
