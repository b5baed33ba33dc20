"""The model card of a released variant (``model_card.md``), written from the run's own products.

Every number in the card comes from a file the workflow wrote (Table 1, VAE fidelity, Table 2,
adherence, calibration, learned-vs-true effects, the OOD envelope), copied in as it is, so the card
cannot drift from the tables. A product that is missing is named as missing, not papered over.
Sections follow the model-card practice of MONAI's model zoo and Hugging Face: details, intended
use, training data, evaluation, out-of-distribution envelope, limitations, licence.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hemexp.core.config import REPO_ROOT
from hemexp.core.layout import Layout
from hemexp.preprocess.template import template_paths

CODE_LICENCE = "Apache-2.0"
FIGURES = ("vae_reconstructions.png", "pit.png", "learned_vs_true.png", "perturbation.png")
STUDY_FIGURES = ("learned_vs_true.png", "perturbation.png")  # only the perturbation variant's card
INTENDED_USE = """\
- **For:** research on hematoma expansion after intracerebral hemorrhage: simulating distributions
  of follow-up non-contrast CT (IPH and IVH masks, volumes, voxel-wise expansion probability) from a
  baseline scan and clinical values, and exploring how the distributions shift when clinical inputs
  are changed (`hemexp simulate --set ...`).
- **Not for:** diagnosis, treatment decisions or any patient care. The model is not a medical device
  and has not been validated prospectively. Its samples are draws from a learned model, not
  predictions of one patient's course.
- **Inputs it expects:** a baseline head NCCT like its training scans (see the out-of-distribution
  envelope below; `summary.json` → `ood` says when an input lies outside it), with IPH (and IVH)
  masks on the scan's grid, and the seven clinical values within the training ranges.
"""
GENERIC_LIMITS = """\
- Sampled volumes inherit the VAE's reconstruction error (see fidelity) and the diffusion model's
  calibration (see calibration): read intervals together with their measured coverage.
- Clinical effects are only as good as the learned-vs-true check shows; a variable whose effect the
  model did not learn moves samples little or the wrong way.
- Inputs outside the training envelope (slice thickness, field of view, noise, registration quality,
  VAE reconstruction error, latent norm, clinical ranges) are scored and warned about, not refused.
"""


def _demote(markdown: str, levels: int = 3) -> str:
    """Headings of an included table file pushed below the card's own section headings."""
    return re.sub(r"^(#+) ", lambda m: "#" * min(6, len(m.group(1)) + levels) + " ", markdown, flags=re.M)


def _include(path: Path, what: str) -> str:
    if not path.is_file():
        return f"*{what}: not available ({path.name} was not produced by this run).*\n"
    return _demote(path.read_text().strip()) + "\n"


def readme_limits(readme: Path = REPO_ROOT / "README.md") -> str | None:
    """The README's "Reading the demo's results" section: the measured facts about what the demo
    model does and does not learn (None when the README is not beside the package)."""
    if not readme.is_file():
        return None
    text = readme.read_text()
    m = re.search(r"^## Reading the demo's results\n(.*?)(?=^## )", text, flags=re.S | re.M)
    return m.group(1).strip() + "\n" if m else None


def template_licence(cfg: dict[str, Any]) -> str:
    """Where the template came from and its licence: a DESCRIPTION/LICENSE file beside a configured
    template is read (the shared SCCT template says GPL-2); a template built from training baselines
    carries the training data's terms."""
    template, _ = template_paths(cfg)
    if not cfg["preprocess"].get("template"):
        return ("built by HemExp from the training baselines (`results/template/`): it carries the terms of the "
                "training data" + (" (the built-in synthetic cohort: generated data, no third-party rights)"
                                   if cfg["cohort"]["source"] == "synthetic" else "") + ".")
    for name in ("DESCRIPTION.txt", "DESCRIPTION", "LICENSE", "LICENSE.txt", "LICENCE"):
        info = template.parent / name
        if info.is_file():
            text = info.read_text(errors="replace")
            found = re.search(r"^Licen[cs]e:\s*(.+)$", text, flags=re.M)
            title = re.search(r"^(?:Package|Title):\s*(.+)$", text, flags=re.M)
            if found:
                return (f"`{template.name}` ({title.group(1).strip() if title else template.parent.name}): "
                        f"{found.group(1).strip()} (from {name} beside the template).")
            return f"`{template.name}`: see {name} beside the template."
    return f"`{template.name}`: licence unknown; state it before sharing this model."


def _ood_table(envelope: Mapping[str, Any]) -> str:
    rows = ["| feature | training min | training max | warns below | warns above |", "|---|---|---|---|---|"]
    for name, f in envelope.get("features", {}).items():
        if not f.get("n"):
            continue

        def show(v: float | None) -> str:
            return "–" if v is None else f"{v:.4g}"

        rows.append(f"| {name} | {show(f['min'])} | {show(f['max'])} | {show(f['lo'])} | {show(f['hi'])} |")
    clinical = ", ".join(f"{k} [{v['min']:g}, {v['max']:g}]" for k, v in envelope.get("clinical", {}).items())
    return "\n".join(rows) + f"\n\nClinical training ranges: {clinical or 'not recorded'}.\n"


def _details(cfg: dict[str, Any], variant: str, meta: Mapping[str, Any]) -> str:
    v = cfg["diffusion"]["variants"][variant]
    vae, unet = cfg["vae"], cfg["diffusion"]["unet"]
    lines = [
        f"- **Registered as:** `{meta['name']}` version {meta['version']} (aliases: {', '.join(meta['aliases']) or 'none'})",
        f"- **Variant:** `{variant}`: context {v['context']} slice(s), conditioning `{v['conditioning']}` "
        "(i = baseline image, c = clinical vector, e = expansion flag)",
        f"- **VAE:** channels {vae['channels']}, {vae['latent_channels']} latent channels, {vae['max_steps']} steps",
        f"- **Diffusion:** U-Net channels {unet['channels']}, {cfg['diffusion']['timesteps']} timesteps "
        f"({cfg['diffusion']['beta_schedule']}), {cfg['diffusion']['prediction']}, min-SNR "
        f"{cfg['diffusion']['min_snr_gamma']}, {v.get('max_steps') or cfg['diffusion']['max_steps']} steps, EMA {cfg['diffusion']['ema_decay']}",
        f"- **Model grid:** {cfg['preprocess']['crop']} in-plane at {cfg['preprocess']['spacing_mm']} mm; "
        f"HU window {cfg['preprocess']['hu_window']}",
        f"- **Sampling defaults:** {cfg['sampling']['n_samples']} samples, {cfg['sampling']['ddim_steps']} {cfg['sampling']['solver']} steps, "
        f"guidance {cfg['sampling']['guidance_scale']}",
        f"- **Provenance:** git `{meta['git_commit']}`, config hash `{meta['config_hash']}`, data version "
        f"`{meta['data_version']}`, HemExp {meta['hemexp_version']}, MLflow run `{meta.get('run_id') or 'n/a'}`",
    ]
    return "\n".join(lines) + "\n"


def _training_data(cfg: dict[str, Any], layout: Layout) -> str:
    coh = cfg["cohort"]
    if coh["source"] == "synthetic":
        syn = coh["synthetic"]
        law = ", ".join(f"{k} {v:g}" for k, v in syn["law"].items())
        head = (f"The built-in synthetic cohort: {syn['n_patients']} patients, sites {syn['sites']}, test sites "
                f"{syn['test_sites']}, seed {syn['seed']}; ground-truth growth law: {law}.\n\n")
    else:
        head = "The cohort of the manifest (Table 1 below; patient identifiers are not part of the release).\n\n"
    return head + _include(layout.table1("md"), "Table 1")


def write_card(cfg: dict[str, Any], variant: str, meta: Mapping[str, Any], envelope: Mapping[str, Any],
               dest: Path) -> Path:
    """Write ``dest/model_card.md`` and copy the card's figures into ``dest/card/``; returns the card."""
    layout = Layout.of(cfg)
    figures = dest / "card"
    figures.mkdir(parents=True, exist_ok=True)
    shown = []
    study = cfg["evaluation"].get("perturbation_variant")
    for name in FIGURES:
        if name in STUDY_FIGURES and variant != study:
            continue  # another variant's clinical-guidance study
        if layout.figure(name).is_file():
            shutil.copy2(layout.figure(name), figures / name)
            shown.append(f"![{name}](card/{name})")
    limits = readme_limits() if cfg["cohort"]["source"] == "synthetic" else None
    sections = [
        f"# HemExp model card: {meta['name']} v{meta['version']}\n",
        "## Model details\n", _details(cfg, variant, meta),
        "## Intended use\n", INTENDED_USE,
        "## Training data\n", _training_data(cfg, layout),
        "## Evaluation (held-out test patients)\n",
        "### VAE fidelity\n", _include(layout.metric("vae_fidelity.md"), "VAE fidelity"),
        "### Table 2: follow-up masks and volumes\n", _include(layout.metric("table2.md"), "Table 2"),
        "### Expansion-flag adherence\n", _include(layout.metric("adherence.md"), "Adherence"),
        "### Calibration\n", _include(layout.metric("calibration.md"), "Calibration"),
        "### Learned versus true clinical effects\n",
        (_include(layout.metric("learned_vs_true.md"), "Learned vs true effects (synthetic cohort only)")
         if variant == study else f"*The clinical-guidance study ran on `{study}` "
                                  "(`evaluation.perturbation_variant`), not on this variant.*\n"),
        "### Figures\n", ("\n\n".join(shown) or "*No figures were produced by this run.*") + "\n",
        "## Out-of-distribution envelope (fitted on the training split)\n", _ood_table(envelope),
        "## Limitations\n", GENERIC_LIMITS,
        *(["\n### What the demo model does and does not learn (README, *Reading the demo's results*)\n", limits]
          if limits else []),
        "## Licence\n",
        f"- Code and weights: {CODE_LICENCE} (HemExp).\n- CT template: {template_licence(cfg)}\n",
    ]
    card = dest / "model_card.md"
    card.write_text("\n".join(s.rstrip("\n") + "\n" for s in sections))
    return card
