# Latent cache and conditional latent diffusion: encode every shard slice with the frozen VAE (one job
# per patient, so only changed patients re-encode), latent statistics on the training split, and one
# diffusion model per variant. Checkpoints (last.ckpt) live beside model.pt but are not declared
# outputs, so Snakemake never deletes them: a killed training job resumes where it stopped.
#
# freeze_models: an existing stats.json / model.pt is kept as it is — its rule is not defined, so the
# file is a plain input and new training patients change only the jobs that read it (an ancient()
# input would not do: Snakemake also reruns a job when its *set* of inputs changes).
import os
import re

from hemexp.core.config import config_hash

LATENTS = f"{RESULTS}/latents"
LATENT_STATS = f"{LATENTS}/stats.json"
DIFFUSION_DIR = f"{RESULTS}/models/diffusion"
DIFFUSION_MODEL = f"{DIFFUSION_DIR}/{{variant}}/model.pt"  # format with variant=...
TRAIN_LATENTS = [f"{LATENTS}/{p}.npz" for p in TRAIN]
_FROZEN = bool(config["freeze_models"])
STATS_FROZEN = _FROZEN and os.path.exists(LATENT_STATS)
TRAINABLE_VARIANTS = [v for v in VARIANTS
                      if not (_FROZEN and os.path.exists(DIFFUSION_MODEL.format(variant=v)))]


ENCODE_PATIENT_RE = PATIENT_ID_PATTERN  # not an ID alternation: that makes DAG building quadratic
TRAINABLE_RE = "|".join(re.escape(v) for v in sorted(TRAINABLE_VARIANTS)) or "NO_VARIANTS"
# Rerun trigger of one variant: its own spec and the shared training keys, not the other variants.
_SHARED_DIFFUSION = {k: v for k, v in config["diffusion"].items() if k != "variants"}
VARIANT_HASH = {v: config_hash({"diffusion": _SHARED_DIFFUSION, "seed": config["seed"],
                                "variant": config["diffusion"]["variants"][v]}) for v in VARIANTS}


rule encode:
    """Posterior-mean latents of every shard row (targets + context), baseline and follow-up."""
    input:
        shard=f"{RESULTS}/shards/{{patient}}.parquet",
        vae=VAE_MODEL,
    output:
        f"{LATENTS}/{{patient}}.npz",
    params:
        cfg=cfg_hash("preprocess"),
        config=RESOLVED_CONFIG,
    wildcard_constraints:
        patient=ENCODE_PATIENT_RE,
    threads: R("encode")["cpus_per_task"]  # exported as OMP_NUM_THREADS: torch uses no more cores
    resources:
        **R("encode"),
    conda:
        HEMEXP_ENV
    log:
        f"{RESULTS}/logs/encode/{{patient}}.log",
    shell:
        "hemexp encode {wildcards.patient} --config {params.config} > {log} 2>&1"


if not STATS_FROZEN:

    rule latent_stats:
        """Channel-wise latent mean/std over the training patients only (diffusion normalisation)."""
        input:
            TRAIN_LATENTS,
        output:
            LATENT_STATS,
        params:
            patients=" ".join(TRAIN),
            config=RESOLVED_CONFIG,
        resources:
            **R("latent_stats"),
        conda:
            HEMEXP_ENV
        log:
            f"{RESULTS}/logs/latent_stats.log",
        shell:
            "hemexp latent-stats --patients {params.patients} --config {params.config} > {log} 2>&1"


if TRAINABLE_VARIANTS:

    rule train_diffusion:
        """Train one diffusion variant (GPU rule): EMA weights in model.pt, a DDIM sample grid, MLflow run."""
        input:
            latents=TRAIN_LATENTS,
            stats=LATENT_STATS,
            vae=VAE_MODEL,
        output:
            model=DIFFUSION_MODEL,
            grid=report(f"{DIFFUSION_DIR}/{{variant}}/sample_grid.png", category="3. Diffusion",
                        subcategory="{variant}"),
            summary=f"{DIFFUSION_DIR}/{{variant}}/summary.json",
        params:
            cfg=lambda wildcards: VARIANT_HASH[wildcards.variant],
            config=RESOLVED_CONFIG,
        wildcard_constraints:
            variant=TRAINABLE_RE,
        threads: R("train_diffusion")["cpus_per_task"]  # capped by --cores; OMP_NUM_THREADS for torch
        resources:
            **R("train_diffusion"),
        conda:
            HEMEXP_ENV
        log:
            f"{RESULTS}/logs/train_diffusion/{{variant}}.log",
        shell:
            "hemexp train-diffusion {wildcards.variant} --config {params.config} > {log} 2>&1"


FINAL_TARGETS += [f"{LATENTS}/{p}.npz" for p in sorted(PATIENTS)] + [LATENT_STATS]
FINAL_TARGETS += [DIFFUSION_MODEL.format(variant=v) for v in VARIANTS]
