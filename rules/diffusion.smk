# Latent cache and conditional latent diffusion: encode every shard slice with the frozen VAE (one job
# per patient, so only changed patients re-encode), latent statistics on the training split, and one
# diffusion model per variant. Checkpoints (last.ckpt) live beside model.pt but are not declared
# outputs, so Snakemake never deletes them: a killed training job resumes where it stopped.
#
# freeze_models: an existing stats.json / model.pt is kept as it is — its rule is not defined, so the
# file is a plain input and new training patients change only the jobs that read it (an ancient()
# input would not do: Snakemake also reruns a job when its *set* of inputs changes).
import os

from hemexp.core.config import config_hash

TRAIN_LATENTS = [str(L.latents(p)) for p in TRAIN]
STATS_FROZEN = FROZEN and os.path.exists(LATENT_STATS)
TRAINABLE_VARIANTS = [
    v for v in VARIANTS if not (FROZEN and os.path.exists(DIFFUSION_MODEL.format(variant=v)))
]


ENCODE_PATIENT_RE = PATIENT_ID_PATTERN  # not an ID alternation: that makes DAG building quadratic
TRAINABLE_RE = one_of(TRAINABLE_VARIANTS)
# Rerun trigger of one variant: its own spec and the shared training keys, not the other variants.
_SHARED_DIFFUSION = {k: v for k, v in config["diffusion"].items() if k != "variants"}
VARIANT_HASH = {
    v: config_hash(
        {
            "diffusion": _SHARED_DIFFUSION,
            "seed": config["seed"],
            "variant": config["diffusion"]["variants"][v],
        }
    )
    for v in VARIANTS
}


rule encode:
    """Posterior-mean latents of every shard row (targets + context), baseline and follow-up."""
    input:
        shard=str(L.shard("{patient}")),
        vae=VAE_MODEL,
    output:
        str(L.latents("{patient}")),
    log:
        str(L.log("encode", "{patient}")),
    benchmark:
        str(L.benchmark("encode", L.log("encode", "{patient}")))
    wildcard_constraints:
        patient=ENCODE_PATIENT_RE,
    conda:
        HEMEXP_ENV
    threads: R("encode")["cpus_per_task"]  # exported as OMP_NUM_THREADS: torch uses no more cores
    resources:
        **R("encode"),
    params:
        cfg=cfg_hash("preprocess"),
        config=RESOLVED_CONFIG,
    shell:
        "hemexp encode {wildcards.patient} --config {params.config} > {log} 2>&1"


if not STATS_FROZEN:

    rule latent_stats:
        """Channel-wise latent mean/std over the training patients only (diffusion normalisation)."""
        input:
            train_index("latents"),
        output:
            LATENT_STATS,
        log:
            str(L.log("latent_stats")),
        benchmark:
            str(L.benchmark("latent_stats", L.log("latent_stats")))
        conda:
            HEMEXP_ENV
        resources:
            **R("latent_stats"),
        params:
            patients=" ".join(TRAIN),
            config=RESOLVED_CONFIG,
        shell:
            "hemexp latent-stats --patients {params.patients} --config {params.config} > {log} 2>&1"


if TRAINABLE_VARIANTS:

    rule train_diffusion:
        """Train one diffusion variant (GPU rule): EMA weights in model.pt, a DDIM sample grid, MLflow run."""
        input:
            latents=train_index("latents"),
            stats=LATENT_STATS,
            vae=VAE_MODEL,
        output:
            model=DIFFUSION_MODEL,
            grid=report(
                str(L.diffusion_dir("{variant}") / "sample_grid.png"),
                category="3. Diffusion",
                subcategory="{variant}",
            ),
            summary=str(L.diffusion_dir("{variant}") / "summary.json"),
        log:
            str(L.log("train_diffusion", "{variant}")),
        benchmark:
            str(L.benchmark("train_diffusion", L.log("train_diffusion", "{variant}")))
        wildcard_constraints:
            variant=TRAINABLE_RE,
        conda:
            HEMEXP_ENV
        threads: R("train_diffusion")["cpus_per_task"]  # capped by --cores; OMP_NUM_THREADS for torch
        resources:
            **R("train_diffusion"),
        params:
            cfg=lambda wildcards: VARIANT_HASH[wildcards.variant],
            config=RESOLVED_CONFIG,
        shell:
            "hemexp train-diffusion {wildcards.variant} --config {params.config} > {log} 2>&1"


FINAL_TARGETS += [str(L.latents(p)) for p in sorted(PATIENTS)] + [LATENT_STATS]
FINAL_TARGETS += [DIFFUSION_MODEL.format(variant=v) for v in VARIANTS]
