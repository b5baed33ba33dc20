"""Clinical-guidance study driver (paper Fig. 3): perturbation scenarios and the guidance-scale sweep.

For each test patient the baseline imaging is fixed and only the clinical conditioning changes:

* single-variable scenarios (``evaluation.scenarios``, plus ``unperturbed``) at the default guidance
  scale ``sampling.guidance_scale`` -> mean ΔV of total hemorrhage vs unperturbed;
* the two guidance profiles (``evaluation.profiles``) at every scale in ``evaluation.guidance_scales``
  -> ΔV vs baseline of each profile and their separation.

Batching: every setting at one guidance scale goes to the sampler in **one call** (settings are rows
of the clinical matrix, see :func:`hemexp.sampling.sampler.sample_deltas`); the guidance scale is a property
of a call, so a patient costs one call per distinct scale (4 with the demo config).

Common random numbers: sample k of every setting reuses sample k's initial noise (the sampler keys
noise by (seed, sample id, slice)), so a scenario's ΔV is the effect of the clinical change on the
same noise draws, not a difference between two independent noise sets. With 5 samples per setting
this removes most of the sample-to-sample variance from ΔV.

The expansion flag is held fixed within a patient: every setting uses the flag plan of the configured
``sampling.flag_source`` (oracle by default), so only the clinical variables move.

The sampler is injected (:data:`SamplerFn`): :class:`BundleSampler` runs the trained model, tests pass
a plain function.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from hemexp.core.clinical import clinical_vector, mask_volume_ml
from hemexp.core.files import atomic_path, write_json
from hemexp.core.layout import Layout
from hemexp.core.runtime import get_logger
from hemexp.core.tables import fmt_floats, markdown_table, write_csv, write_html
from hemexp.diffusion.conditioning import uses_flag
from hemexp.diffusion.ddim import branches
from hemexp.diffusion.latents import denormalise
from hemexp.evaluation.figures import plot_guidance_and_perturbations, plot_learned_vs_true
from hemexp.evaluation.guidance.effects import (
    FAVOURING,
    STABLE,
    guidance_separation,
    learned_vs_true,
    perturbation_effects,
    read_truth,
)
from hemexp.io.nifti import affine_spacing_mm
from hemexp.preprocess.pipeline import read_summary
from hemexp.sampling.flags import flag_plan_for
from hemexp.sampling.products import assemble, baseline_volumes
from hemexp.sampling.sampler import decode_followups_modes, decode_reference, encode_baseline, sample_deltas
from hemexp.sampling.scenarios import UNPERTURBED, Scenario, apply_scenario
from hemexp.sampling.simulate import PatientInput, load_baseline

log = get_logger(__name__)

# (clinical rows with raw values, flag per row, sample id per row, guidance scale) -> one dict per row
# with at least ``iph_ml`` and ``ivh_ml``.
SamplerFn = Callable[[Sequence[Mapping[str, float]], Sequence[int], Sequence[int], float], list[dict[str, float]]]
SINGLE, PROFILE = "scenario", "profile"


@dataclass(frozen=True)
class Setting:
    """One clinical setting to sample at one guidance scale."""

    name: str
    kind: str  # SINGLE or PROFILE
    guidance_scale: float
    scenario: Scenario


def study_settings(single: Mapping[str, Scenario], profiles: Mapping[str, Scenario], scales: Sequence[float],
                   default_scale: float) -> list[Setting]:
    """Single-variable scenarios at ``default_scale`` and every profile at every scale."""
    clash = sorted(set(single) & set(profiles))
    if clash:
        raise ValueError(f"scenario and profile names must differ, both define {clash}")
    for name in (FAVOURING, STABLE):
        if name not in profiles:
            raise ValueError(f"evaluation.profiles must define {name!r}")
    if UNPERTURBED not in single:
        raise ValueError(f"single-variable scenarios must include {UNPERTURBED!r} (the reference)")
    out = [Setting(name, SINGLE, float(default_scale), sc) for name, sc in single.items()]
    out += [Setting(name, PROFILE, float(w), sc) for w in dict.fromkeys(float(s) for s in scales)
            for name, sc in profiles.items()]
    return out


def perturb_patient(patient_id: str, clinical: Mapping[str, float], flags: Sequence[int], sampler: SamplerFn,
                    settings: Sequence[Setting], baseline_ml: Mapping[str, float]) -> tuple[pd.DataFrame, int]:
    """Sample every setting for one patient, one sampler call per guidance scale.

    ``flags`` are the patient's per-sample flags (its flag plan); their count is the number of samples
    per setting. Returns the long volume table (one row per setting × sample: ``patient_id``,
    ``scenario``, ``kind``, ``guidance_scale``, ``sample``, ``flag``, ``iph_ml``, ``ivh_ml``,
    ``total_ml``, ``baseline_iph_ml``, ``baseline_total_ml``) and the number of sampler calls.
    """
    n = len(flags)
    if n < 1:
        raise ValueError("need at least one sample per setting")
    rows, calls = [], 0
    for scale in dict.fromkeys(s.guidance_scale for s in settings):
        group = [s for s in settings if s.guidance_scale == scale]
        clin = [apply_scenario(clinical, s.scenario) for s in group for _ in range(n)]
        out = sampler(clin, [int(f) for _ in group for f in flags], [k for _ in group for k in range(n)], scale)
        calls += 1
        if len(out) != len(clin):
            raise ValueError(f"sampler returned {len(out)} results for {len(clin)} requested rows")
        for i, res in enumerate(out):
            s, k = group[i // n], i % n
            iph, ivh = float(res["iph_ml"]), float(res["ivh_ml"])
            rows.append({"patient_id": patient_id, "scenario": s.name, "kind": s.kind, "guidance_scale": scale,
                         "sample": k, "flag": int(flags[k]), "iph_ml": iph, "ivh_ml": ivh, "total_ml": iph + ivh,
                         "baseline_iph_ml": float(baseline_ml["iph"]), "baseline_total_ml": float(baseline_ml["total"])})
    return pd.DataFrame(rows), calls


# ---------------------------------------------------------------------------- summaries
def study_tables(volumes: pd.DataFrame, default_scale: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(scenario effects vs unperturbed at the default scale, guidance separation per scale)."""

    single = volumes[(volumes["kind"] == SINGLE) & (volumes["guidance_scale"] == float(default_scale))]
    effects = perturbation_effects(single.drop(columns="guidance_scale"), reference=UNPERTURBED)
    separation = guidance_separation(volumes[volumes["kind"] == PROFILE], reference="baseline")
    return effects, separation


def tidy_table(effects: pd.DataFrame, separation: pd.DataFrame, default_scale: float) -> pd.DataFrame:
    """One long table: ``analysis`` (perturbation | guidance), scale, quantity, n, mean and sd (mL)."""
    rows = [{"analysis": "perturbation", "guidance_scale": float(default_scale), "quantity": r.scenario,
             "n_patients": int(r.n_patients), "delta_ml_mean": r.delta_ml_mean, "delta_ml_sd": r.delta_ml_sd}
            for r in effects.itertuples(index=False)]
    for r in separation.to_dict("records"):
        for q in ("dv_favouring", "dv_stable", "separation"):
            rows.append({"analysis": "guidance", "guidance_scale": float(r["guidance_scale"]), "quantity": q,
                         "n_patients": int(r["n_patients"]), "delta_ml_mean": r[f"{q}_mean"],
                         "delta_ml_sd": r[f"{q}_sd"]})
    return pd.DataFrame(rows)


def study_numbers(tidy: pd.DataFrame) -> dict[str, float]:
    """Flat numbers (DVC/MLflow): ``perturbation.<scenario>.delta_ml_mean``, ``guidance.w<scale>.separation_mean``."""
    out: dict[str, float] = {}
    for r in tidy.itertuples(index=False):
        key = f"perturbation.{r.quantity}" if r.analysis == "perturbation" else f"guidance.w{r.guidance_scale:g}.{r.quantity}"
        for stat in ("mean", "sd"):
            value = getattr(r, f"delta_ml_{stat}")
            if np.isfinite(value):
                out[f"{key}.delta_ml_{stat}" if r.analysis == "perturbation" else f"{key}_{stat}"] = float(value)
    return out


def learned_vs_true_table(volumes: pd.DataFrame, clinical: pd.DataFrame, single: Mapping[str, Scenario],
                          law: Mapping[str, float], default_scale: float,
                          condition_on_flag: bool = False) -> pd.DataFrame:
    """Learned vs true effects on the synthetic cohort, two comparisons stacked (``comparison`` column):

    * ``scenario vs unperturbed (total)``: ΔV of each scenario, learned vs the law's expected change;
    * ``growth vs baseline (IPH)``: predicted IPH growth of every setting (unperturbed included) vs the
      law's expected growth (IPH: the law does not move IVH).

    ``condition_on_flag`` (a flag-conditioned variant): the truth is the law's expectation given the
    flags the samples were generated with, like with like (:func:`effects.true_patient_deltas`).
    """

    vols = volumes[(volumes["kind"] == SINGLE) & (volumes["guidance_scale"] == float(default_scale))]
    vols = vols[vols["patient_id"].isin(clinical["patient_id"])]
    a = learned_vs_true(vols, clinical, single, law, reference=UNPERTURBED, column="total_ml",
                        condition_on_flag=condition_on_flag)
    b = learned_vs_true(vols, clinical, single, law, reference="baseline", column="iph_ml",
                        condition_on_flag=condition_on_flag)
    return pd.concat([a.assign(comparison="scenario vs unperturbed (total)"),
                      b.assign(comparison="growth vs baseline (IPH)")], ignore_index=True)[
        ["comparison", *a.columns]]


# ---------------------------------------------------------------------------- the trained sampler
class BundleSampler:
    """:data:`SamplerFn` of one patient on the trained model (glue over :mod:`hemexp.sampling.sampler`).

    The baseline is encoded once; every call samples normalised Δz for all rows with
    :func:`hemexp.sampling.sampler.sample_deltas` (per-row clinical vectors and sample ids, so common random
    numbers hold across settings), decodes with the frozen VAE and measures IPH/IVH volumes of the
    reassembled follow-up exactly as ``volumes.tsv`` does (:func:`hemexp.sampling.products.assemble` +
    :func:`hemexp.core.clinical.mask_volume_ml`).

    Rows the model cannot tell apart are sampled once: the sampler is deterministic per (inputs,
    sample id) whatever the batch, so identical scaled clinical vectors (e.g. "GCS 15" for a patient
    at 15, a clamped change), or any clinical values at guidance 0 (null branch only), share one
    result. Written here, over the sampling stage's :func:`~hemexp.sampling.sampler.encode_baseline`
    and :func:`~hemexp.sampling.sampler.sample_deltas`, because
    :func:`hemexp.sampling.sampler.generate_followups` encodes the baseline on every call and returns
    CT volumes this study does not need.
    """

    def __init__(self, bundle: Any, baseline: dict[str, np.ndarray], spacing: Sequence[float], settings: Any,
                 z_margin_mm: float, mask_threshold: float, hu_window: Sequence[float],
                 decode_modes: Sequence[str] | None = None):

        self.bundle, self.baseline, self.spacing = bundle, baseline, tuple(float(s) for s in spacing)
        self.settings, self.threshold = settings, float(mask_threshold)
        enc = encode_baseline(bundle, baseline, self.spacing[2], z_margin_mm, hu_window, settings.decode_batch)
        self.zs, self.cond, self.centre = enc.zs, enc.cond, enc.centre
        # the first mode gives iph_ml/ivh_ml; every mode's volumes are under "by_mode" (one Δz, decoded each way)
        self.decode_modes = tuple(decode_modes or (settings.decode,))
        self.reference = (decode_reference(bundle, baseline, enc, hu_window, settings.decode_batch)
                          if "residual" in self.decode_modes else None)
        self.calls: list[dict[str, Any]] = []

    def __call__(self, clinical: Sequence[Mapping[str, float]], flags: Sequence[int], sample_ids: Sequence[int],
                 guidance_scale: float) -> list[dict[str, float]]:

        model = self.bundle.diffusion
        sees_clinical = model.uses_clinical and "cond" in branches(model, guidance_scale, self.settings.guidance_rule)
        vectors = [clinical_vector(r) for r in clinical]
        keys = [(tuple(v.tolist()) if sees_clinical else None, int(f) if model.uses_flag else 0, int(k))
                for v, f, k in zip(vectors, flags, sample_ids, strict=True)]
        unique = list(dict.fromkeys(keys))
        first = {key: keys.index(key) for key in unique}
        rows = [first[key] for key in unique]
        volumes = self._sample([vectors[i] for i in rows], [int(flags[i]) for i in rows],
                               [int(sample_ids[i]) for i in rows], guidance_scale)
        self.calls[-1]["requested_rows"] = len(keys)
        by_key = dict(zip(unique, volumes, strict=True))
        return [dict(by_key[key]) for key in keys]

    def using(self, **changes: Any) -> BundleSampler:
        """The same patient (encoded baseline, reference) sampled with other settings, e.g. another
        guidance rule: a shallow copy, so the baseline is not encoded again."""
        other = copy.copy(self)
        other.settings, other.calls = dataclasses.replace(self.settings, **changes), []
        return other

    def _sample(self, vectors: list[np.ndarray], flags: list[int], sample_ids: list[int],
                guidance_scale: float) -> list[dict[str, float]]:
        """Volumes of distinct rows: sample Δz, decode, reassemble onto the baseline, measure."""
        import torch


        settings = dataclasses.replace(self.settings, guidance_scale=float(guidance_scale))
        delta, info = sample_deltas(self.bundle.diffusion, self.bundle.sched_cfg, self.cond,
                                    torch.from_numpy(np.stack(vectors)), flags, settings, slice_ids=self.zs,
                                    sample_ids=sample_ids, slice_spacing_mm=self.spacing[2])
        self.calls.append({"rows": len(flags), "guidance_scale": float(guidance_scale), **info})
        z_fu = denormalise(self.centre.unsqueeze(0) + delta, self.bundle.stats).flatten(0, 1)
        n, s = len(flags), len(self.zs)
        by_mode = {}
        decoded = decode_followups_modes(self.bundle, z_fu, n, self.decode_modes, self.threshold,
                                         settings.decode_batch, self.reference)
        for mode, (_, iph, ivh) in decoded.items():
            iph, ivh = iph.reshape(n, s, *iph.shape[1:]), ivh.reshape(n, s, *ivh.shape[1:])
            by_mode[mode] = [{"iph_ml": mask_volume_ml(assemble(self.baseline["iph"], iph[k], self.zs), self.spacing),
                              "ivh_ml": mask_volume_ml(assemble(self.baseline["ivh"], ivh[k], self.zs), self.spacing)}
                             for k in range(n)]
        first = by_mode[self.decode_modes[0]]
        return [{**first[k], "by_mode": {m: v[k] for m, v in by_mode.items()}} for k in range(n)]


# ---------------------------------------------------------------------------- the study
@dataclass
class PatientStudy:
    """What the study needs of one patient: its sampler, raw clinical values, flags and baseline volumes."""

    patient_id: str
    sampler: SamplerFn
    clinical: dict[str, float]
    flags: tuple[int, ...]
    baseline_ml: dict[str, float]


@dataclass
class StudyResult:
    """Long volume table and bookkeeping of one study run."""

    volumes: pd.DataFrame
    seconds: dict[str, float]
    calls: dict[str, int]


def run_study(patients: Sequence[str], load: Callable[[str], PatientStudy], settings: Sequence[Setting]) -> StudyResult:
    """Run every setting for every patient; ``load`` builds a patient's :class:`PatientStudy` (injected)."""
    frames, seconds, calls = [], {}, {}
    for pid in patients:
        t0 = time.perf_counter()
        p = load(pid)
        frame, n_calls = perturb_patient(p.patient_id, p.clinical, p.flags, p.sampler, settings, p.baseline_ml)
        frames.append(frame)
        seconds[pid], calls[pid] = time.perf_counter() - t0, n_calls
        log.info("%s: %d settings x %d samples in %d sampler calls, %.1f s", pid, len(settings), len(p.flags),
                 n_calls, seconds[pid])
    return StudyResult(pd.concat(frames, ignore_index=True), seconds, calls)


def trained_loader(cfg: Mapping[str, Any], bundle: Any, sampler_settings: Any, n_samples: int
                   ) -> Callable[[str], PatientStudy]:
    """``load(patient_id)`` on the trained model: preprocessed baseline, clinical values, flag plan."""

    def load(pid: str) -> PatientStudy:
        pdir = Layout.of(cfg).preprocessed(pid)
        pre = read_summary(pid, pdir)
        plan = flag_plan_for(dict(cfg), pid, pre, cfg["sampling"]["flag_source"], n_samples)
        baseline, affine = load_baseline(PatientInput(pid, pdir, pre["clinical"]))
        spacing = affine_spacing_mm(affine)
        sampler = BundleSampler(bundle, baseline, spacing, sampler_settings, cfg["sampling"]["z_margin_mm"],
                                cfg["sampling"]["mask_threshold"], cfg["preprocess"]["hu_window"])
        return PatientStudy(pid, sampler, dict(pre["clinical"]), plan.flags,
                            baseline_volumes(baseline, spacing))

    return load


def write_study_products(cfg: Mapping[str, Any], variant: str, result: StudyResult, single: Mapping[str, Scenario],
                         default_scale: float) -> dict[str, Any]:
    """perturbation.{csv,md,json,html}, perturbation_volumes.csv, the Fig. 3 figure and, on the synthetic
    cohort, learned_vs_true.{csv,md,html} and its figure; returns the flat numbers."""


    out, figures = Layout.of(cfg).metrics_dir, Layout.of(cfg).figures_dir
    effects, separation = study_tables(result.volumes, default_scale)
    tidy = tidy_table(effects, separation, default_scale)
    n_samples = int(result.volumes.groupby(["patient_id", "scenario", "guidance_scale"]).size().max())
    write_csv(result.volumes, out / "perturbation_volumes.csv")
    write_csv(tidy, out / "perturbation.csv")
    numbers = {**study_numbers(tidy), "n_patients": float(result.volumes["patient_id"].nunique()),
               "n_samples": float(n_samples), "runtime_s": float(sum(result.seconds.values())),
               "sampler_calls": float(sum(result.calls.values()))}
    write_json(out / "perturbation.json", numbers)
    note = (f"{variant}: {n_samples} samples per patient and setting, common random numbers across settings; "
            f"single-variable ΔV vs unperturbed at guidance scale {default_scale:g}; guidance ΔV vs the baseline "
            "total volume, separation = ΔV(expansion-favouring) − ΔV(stable) per patient. Mean (sd) over patients, mL.")
    with atomic_path(out / "perturbation.md") as tmp:
        tmp.write_text(f"# Clinical guidance ({variant})\n\n## Single-variable perturbations\n\n"
                       + markdown_table(fmt_floats(effects)) + "\n## Guidance sweep\n\n" + markdown_table(fmt_floats(separation))
                       + f"\n{note}\n")
    write_html(out / "perturbation.html", f"Clinical guidance ({variant})",
               [("Single-variable perturbations", effects), ("Guidance sweep", separation)], [note])
    plot_guidance_and_perturbations(separation, effects, figures / "perturbation.png",
                                    title=f"{variant}: clinical guidance ({numbers['n_patients']:.0f} test patients)")
    truth = Layout.of(cfg).truth
    if cfg["cohort"]["source"] == "synthetic":
        conditioning = cfg["diffusion"]["variants"][variant]["conditioning"]
        table = write_learned_vs_true(truth, result.volumes, single, default_scale, out,
                                      condition_on_flag=uses_flag(conditioning))
        plot_learned_vs_true(table, figures / "learned_vs_true.png",
                             title=f"{variant}: learned vs true clinical effects (synthetic cohort)")
    return numbers


def write_learned_vs_true(truth_path: Any, volumes: pd.DataFrame, single: Mapping[str, Scenario],
                          default_scale: float, out: Any, condition_on_flag: bool = False) -> pd.DataFrame:
    """learned_vs_true.{csv,md,html} against the synthetic cohort's growth law (``truth.json``)."""

    law, clinical = read_truth(truth_path)
    table = learned_vs_true_table(volumes, clinical, single, law, default_scale, condition_on_flag)
    write_csv(table, out / "learned_vs_true.csv")
    given = (" given the expansion flags the samples were generated with (like with like: the flag is held "
             "fixed)" if condition_on_flag else "")
    note = ("True effects: the synthetic growth law's conditional expectation (before patient noise) under the "
            f"scenario's clinical values{given}, on the patients' manifest values; learned effects: mean over samples on "
            "the model grid. sign_agreement compares the two means; patient_sign_agreement the share of patients "
            "whose learned ΔV has the true sign.")
    with atomic_path(out / "learned_vs_true.md") as tmp:
        tmp.write_text("# Learned vs true clinical effects (synthetic cohort)\n\n" + markdown_table(fmt_floats(table))
                       + f"\n{note}\n")
    write_html(out / "learned_vs_true.html", "Learned vs true clinical effects (synthetic cohort)", [("", table)], [note])
    return table
