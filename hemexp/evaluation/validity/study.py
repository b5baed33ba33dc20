"""Sampling for the ground-truth validity study: every volume one studied variant is scored on.

Per test patient and variant, at the default guidance scale unless stated:

* **calibration / adherence rows** (``part = calibration``): ``sampling.n_samples`` samples of the
  unperturbed patient with flag 1 and as many with flag 0. The samples under the patient's *true*
  flag are its predictive distribution (coverage, PIT, CRPS); the share of each flag's samples that
  expand by the paper's rule is adherence. A variant without the flag samples one set (the sampler
  cannot tell the two flags apart and samples identical rows once).
* **decode modes**: the same Δz draws are decoded absolutely and as a change to the baseline
  (:func:`hemexp.sampling.sampler.decode_followups`), a ``decode`` column; each is an ablation row.
* **effect rows** (``part = effect``): every single-variable scenario at the default scale and both
  guidance profiles at every scale, ``evaluation.validity.effect_samples`` samples each, under the
  patient's true flag, with common random numbers across settings (the guidance study's
  :func:`~hemexp.evaluation.guidance.run.perturb_patient`, reused as is).
* **guidance rules**: every row is sampled under ``sampling.guidance_rule``; each further rule of
  ``evaluation.validity.guidance_rules`` resamples the profile sweep (same noise), so the guidance table
  compares the rules on the same draws. A ``guidance_rule`` column says which.

The per-patient sampler is the guidance study's :class:`~hemexp.evaluation.guidance.run.BundleSampler`
(baseline encoded once, volumes measured exactly as ``volumes.tsv`` does), so the study measures the
product users run, not a re-implementation of it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from tqdm import tqdm

from hemexp.core.files import write_json
from hemexp.core.layout import FOLLOWUP_FILES, Layout
from hemexp.core.runtime import get_logger
from hemexp.core.tables import write_csv
from hemexp.diffusion.latents import load_latents
from hemexp.diffusion.train import LatentPairs, training_latents
from hemexp.evaluation.guidance.run import PROFILE, BundleSampler, Setting, perturb_patient, study_settings
from hemexp.evaluation.validity.diagnostics import (
    conditioning_sensitivity,
    denoising_fit,
    fit_summary,
    summarise,
    truth_as_sampled,
    vae_volume_bias_ml,
)
from hemexp.evaluation.validity.names import CALIBRATION, EFFECT
from hemexp.io.nifti import affine_spacing_mm
from hemexp.preprocess.pipeline import read_summary
from hemexp.sampling.products import baseline_volumes
from hemexp.sampling.sampler import DECODE_MODES, EncodedBaseline, SamplerSettings, load_bundle
from hemexp.sampling.scenarios import UNPERTURBED, scenarios_from_config
from hemexp.sampling.simulate import PatientInput, load_baseline, load_grid_scan
from hemexp.vae.data import step_slices_from_config

log = get_logger(__name__)


class DecodeModes:
    """One sampling run, every decode mode: each distinct request runs the multi-mode
    :class:`BundleSampler` once, and :meth:`view` serves one mode's volumes as a plain sampler, so the
    same Δz draws are scored decoded absolutely and as a change to the baseline (an ablation at no
    sampling cost)."""

    def __init__(self, sampler: BundleSampler):
        self.sampler = sampler
        self._done: dict[tuple, list[dict[str, Any]]] = {}

    def view(self, mode: str) -> Callable[..., list[dict[str, float]]]:
        def call(clinical: Sequence[Mapping[str, float]], flags: Sequence[int], sample_ids: Sequence[int],
                 scale: float) -> list[dict[str, float]]:
            key = (tuple(tuple(sorted(c.items())) for c in clinical), tuple(flags), tuple(sample_ids), float(scale))
            if key not in self._done:
                self._done[key] = self.sampler(clinical, flags, sample_ids, scale)
            return [r["by_mode"][mode] for r in self._done[key]]

        return call


def calibration_rows(patient_id: str, clinical: Mapping[str, float], sampler: Callable[..., Any], n: int,
                     scale: float, baseline_ml: Mapping[str, float]) -> pd.DataFrame:
    """``n`` unperturbed samples with flag 1 and ``n`` with flag 0 (one sampler call)."""
    flags = [1] * n + [0] * n
    out = sampler([dict(clinical)] * (2 * n), flags, list(range(n)) * 2, scale)
    return pd.DataFrame([{"patient_id": patient_id, "part": CALIBRATION, "scenario": UNPERTURBED, "kind": "scenario",
                          "guidance_scale": float(scale), "sample": i % n, "flag": f,
                          "iph_ml": float(r["iph_ml"]), "ivh_ml": float(r["ivh_ml"]),
                          "total_ml": float(r["iph_ml"]) + float(r["ivh_ml"]),
                          "baseline_iph_ml": float(baseline_ml["iph"]), "baseline_total_ml": float(baseline_ml["total"])}
                         for i, (f, r) in enumerate(zip(flags, out, strict=True))])


@dataclass
class PatientRun:
    """One test patient's validity rows and what the diagnostics need of it."""

    rows: pd.DataFrame
    encoded: EncodedBaseline
    clinical: dict[str, float]
    flag: int
    vae_bias_ml: float
    truth_iph_ml: dict[str, float]  # the true follow-up measured as a sample is (diagnostics.truth_as_sampled)
    baseline_iph_ml: float


def study_patient(cfg: Mapping[str, Any], bundle: Any, sampler_settings: Any, patient_id: str,
                  settings: Sequence[Setting]) -> PatientRun:
    """All validity rows of one test patient for one variant (see the module docstring)."""
    pdir = Layout.of(cfg).preprocessed(patient_id)
    pre = read_summary(patient_id, pdir)
    patient = PatientInput(patient_id, pdir, pre["clinical"])
    baseline, affine = load_baseline(patient)
    spacing = affine_spacing_mm(affine)
    bundle_sampler = BundleSampler(bundle, baseline, spacing, sampler_settings, cfg["sampling"]["z_margin_mm"],
                                   cfg["sampling"]["mask_threshold"], cfg["preprocess"]["hu_window"],
                                   decode_modes=DECODE_MODES)
    modes = DecodeModes(bundle_sampler)
    base_ml = baseline_volumes(baseline, spacing)
    scale = float(cfg["sampling"]["guidance_scale"])
    main_rule, *other_rules = cfg["evaluation"]["validity"]["guidance_rules"]
    flags = [int(pre["expansion"])] * int(cfg["evaluation"]["validity"]["effect_samples"])
    frames = []
    for mode in DECODE_MODES:
        sampler = modes.view(mode)
        frames.append(calibration_rows(patient_id, pre["clinical"], sampler, int(cfg["sampling"]["n_samples"]),
                                       scale, base_ml).assign(decode=mode, guidance_rule=main_rule))
        if bundle.diffusion.uses_clinical:
            effect, _ = perturb_patient(patient_id, pre["clinical"], flags, sampler, settings, base_ml)
            frames.append(effect.assign(part=EFFECT, decode=mode, guidance_rule=main_rule))
    profiles = [s for s in settings if s.kind == PROFILE]
    for rule in other_rules if bundle.diffusion.uses_clinical else ():
        rule_modes = DecodeModes(bundle_sampler.using(guidance_rule=rule))
        for mode in DECODE_MODES:
            effect, _ = perturb_patient(patient_id, pre["clinical"], flags, rule_modes.view(mode), profiles, base_ml)
            frames.append(effect.assign(part=EFFECT, decode=mode, guidance_rule=rule))
    encoded = EncodedBaseline(zs=bundle_sampler.zs, cond=bundle_sampler.cond, centre=bundle_sampler.centre)
    bias = vae_volume_bias_ml(bundle_sampler.reference, float(cfg["sampling"]["mask_threshold"]), spacing)
    truth = truth_as_sampled(bundle_sampler, load_grid_scan(patient, FOLLOWUP_FILES, "follow-up")[0],
                             cfg["preprocess"]["hu_window"])
    return PatientRun(pd.concat(frames, ignore_index=True), encoded, dict(pre["clinical"]), int(pre["expansion"]),
                      bias, truth, float(base_ml["iph"]))


def run_validity_sampling(cfg: Mapping[str, Any], variant: str, patient_ids: Sequence[str],
                          device: str | None = None) -> pd.DataFrame:
    """Sample every test patient for one variant and write ``validity/samples/<variant>.csv``."""
    layout = Layout.of(cfg)
    bundle = load_bundle(layout.vae_model, layout.diffusion_model(variant), layout.latent_stats, device)
    single, profiles = scenarios_from_config(cfg["evaluation"])
    settings = study_settings(single, profiles, cfg["evaluation"]["guidance_scales"],
                              float(cfg["sampling"]["guidance_scale"]))
    sampler_settings = SamplerSettings.from_config(cfg["sampling"])
    runs = [study_patient(cfg, bundle, sampler_settings, pid, settings)
            for pid in tqdm(patient_ids, desc=f"validity {variant}", unit="patient")]
    table = pd.concat([r.rows for r in runs], ignore_index=True).assign(variant=variant)
    diagnostics = [{"patient_id": pid, "vae_bias_ml": r.vae_bias_ml, "true_flag": r.flag,
                    "baseline_iph_ml": r.baseline_iph_ml, "truth_iph_ml": r.truth_iph_ml,
                    "sensitivity": conditioning_sensitivity(bundle, r.encoded, runs[(i + 1) % len(runs)].encoded,
                                                            r.clinical, r.flag, seed=i)}
                   for i, (pid, r) in enumerate(zip(patient_ids, runs, strict=True))]
    fit = split_fits(cfg, bundle, patient_ids)
    write_json(layout.validity_diagnostics(variant), {"variant": variant, **summarise(diagnostics), "fit": fit,
                                                      "patients": diagnostics})
    write_csv(table, layout.validity_volumes(variant))
    log.info("%s: %d validity rows for %d patients", variant, len(table), len(patient_ids))
    return table


def split_fits(cfg: Mapping[str, Any], bundle: Any, test_ids: Sequence[str]) -> dict[str, Any]:
    """Denoising fit (:func:`~hemexp.evaluation.validity.diagnostics.denoising_fit`) on the training
    patients' and the test patients' cached latents, each with its summary: the memorisation check."""
    layout, model = Layout.of(cfg), bundle.diffusion
    train_lats, _, _ = training_latents(cfg)  # the training stage's own choice and checks of its patients
    out: dict[str, Any] = {}
    for split, lats in (("train", train_lats), ("test", [load_latents(layout.latents(pid)) for pid in test_ids])):
        pairs = LatentPairs(lats, bundle.stats, model.context, step_slices_from_config(cfg))
        fit = denoising_fit(model, bundle.sched_cfg, pairs, seed=int(cfg["evaluation"]["validity"]["seed"]))
        out[split] = {"n_items": len(pairs), **fit, **fit_summary(fit)}
    return out
