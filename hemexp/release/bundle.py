"""Assemble one variant's release bundle: everything ``hemexp simulate`` needs, in one folder.

Layout (``<results>/release/<variant>/bundle/``, logged as the MLflow model's ``bundle`` artifact):

    models/vae/vae.pt                      frozen multi-head VAE
    models/diffusion/<variant>/model.pt    EMA weights of the diffusion variant (+ summary.json)
    models/latents/stats.json              channel statistics of the latents (normalisation)
    models/classifier/classifier.joblib    built-in HE classifier (when trained)
    models/ood/envelope.json               training envelope of the out-of-distribution gate
    models/template/template{,_mask}.nii.gz  the CT template the models' grid is defined on
    config.yaml                            the resolved training config, paths reduced to names
    model_card.md (+ card/ figures)        :mod:`hemexp.release.card`
    bundle.json                            provenance and the SHA-256 of every file

``models/`` is laid out like ``results/models`` so one reader (:func:`hemexp.sampling.simulate.model_files`)
serves a results folder and a registry download alike. Files are hard-linked when the filesystem
allows (no second copy of the weights under ``results/``), else copied.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from hemexp.core.config import config_hash
from hemexp.core.deid import shareable_path
from hemexp.core.layout import Layout, manifest_path
from hemexp.preprocess.template import template_paths


class BundleError(FileNotFoundError):
    """A product the release needs is missing (the message names it and the rule that makes it)."""


def bundle_sources(cfg: dict[str, Any], variant: str) -> dict[str, Path]:
    """Bundle-relative path -> source file, for every file a release of ``variant`` carries."""
    layout = Layout.of(cfg)
    template, mask = template_paths(cfg)
    sources = {
        "models/vae/vae.pt": layout.vae_model,
        f"models/diffusion/{variant}/model.pt": layout.diffusion_model(variant),
        f"models/diffusion/{variant}/summary.json": layout.diffusion_dir(variant) / "summary.json",
        "models/latents/stats.json": layout.latent_stats,
        "models/ood/envelope.json": layout.ood_envelope,
        "models/template/template.nii.gz": template,
    }
    if mask is not None:
        sources["models/template/template_mask.nii.gz"] = mask
    if layout.classifier.is_file():
        sources["models/classifier/classifier.joblib"] = layout.classifier
        sources["models/classifier/metrics.json"] = layout.classifier.with_name("metrics.json")
    missing = [f"{rel} (from {shareable_path(src, None, cfg['results_dir'])})" for rel, src in sources.items()
               if not Path(src).is_file()]
    if missing:
        raise BundleError(f"release of {variant}: missing {', '.join(missing)}; run the workflow up to "
                          "train_diffusion, fit_ood and the template first")
    return {rel: Path(src) for rel, src in sources.items()}


def shareable_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The resolved config with every absolute path reduced to its shareable form: a released model
    must not carry the training site's folder names (docs/deidentification.md)."""
    manifest_dir = manifest_path(cfg).parent
    results = cfg["results_dir"]

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, str) and os.path.isabs(value):
            return shareable_path(value, manifest_dir, results)
        return value

    out = clean(cfg)
    out["results_dir"] = "results"
    out["tracking"]["uri"] = None  # the training site's store (a URI, not a path) is not the receiver's
    return out


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _place(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dest)


def assemble_bundle(cfg: dict[str, Any], variant: str, dest: Path, provenance: dict[str, Any]) -> dict[str, Any]:
    """Fill ``dest`` (an empty folder) with the files of ``variant``'s bundle; returns its provenance.

    The caller adds the model card, then ``bundle.json`` with :func:`file_hashes`.
    """
    for rel, src in bundle_sources(cfg, variant).items():
        _place(src, dest / rel)
    trained = shareable_config(cfg)
    trained["preprocess"]["template"] = trained["preprocess"]["template_mask"] = None  # models/template/ serves it
    (dest / "config.yaml").write_text(yaml.safe_dump(trained, sort_keys=True))
    return {"variant": variant, "config_hash": config_hash(cfg), **provenance}


def file_hashes(dest: Path) -> dict[str, str]:
    """Bundle-relative path -> SHA-256 of every file (``bundle.json``: a download can be verified)."""
    return {p.relative_to(dest).as_posix(): sha256(p) for p in sorted(dest.rglob("*"))
            if p.is_file() and p.name != "bundle.json"}
