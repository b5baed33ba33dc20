# Multi-head VAE: train on the train split's target slices (baseline + follow-up), then measure its
# fidelity (CT SSIM, IPH/IVH Dice) on train and test. Checkpoints (last.ckpt) live beside vae.pt but
# are not declared outputs, so Snakemake never deletes them: a killed job resumes where it stopped.
import os

VAE_DIR = f"{RESULTS}/models/vae"
VAE_MODEL = f"{VAE_DIR}/vae.pt"
# freeze_models: an existing VAE is kept as it is (no training rule), so new training patients
# change only the jobs that read it.
VAE_FROZEN = bool(config["freeze_models"]) and os.path.exists(VAE_MODEL)

if not VAE_FROZEN:

    rule train_vae:
        """Train the multi-head VAE (GPU rule); resumes from last.ckpt after a kill."""
        input:
            [f"{RESULTS}/shards/{p}.parquet" for p in TRAIN],
        output:
            VAE_MODEL,
        params:
            cfg=cfg_hash("vae", "seed", "preprocess", "shards"),
            config=RESOLVED_CONFIG,
        resources:
            **R("train_vae"),
        conda:
            HEMEXP_ENV
        log:
            f"{RESULTS}/logs/train_vae.log",
        shell:
            "hemexp train-vae --config {params.config} > {log} 2>&1"


rule eval_vae:
    """VAE fidelity in the paper's layout (rows Train/Test) + reconstruction figure; logged to MLflow."""
    input:
        model=VAE_MODEL,
        shards=[f"{RESULTS}/shards/{p}.parquet" for p in TRAIN + TEST],
    output:
        csv=f"{RESULTS}/metrics/vae_fidelity.csv",
        md=report(f"{RESULTS}/metrics/vae_fidelity.md", category="2. VAE"),
        json=f"{RESULTS}/metrics/vae_fidelity.json",
        figure=report(f"{RESULTS}/figures/vae_reconstructions.png", category="2. VAE"),
    params:
        cfg=cfg_hash("preprocess"),
        config=RESOLVED_CONFIG,
    resources:
        **R("eval_vae"),
    conda:
        HEMEXP_ENV
    log:
        f"{RESULTS}/logs/eval_vae.log",
    shell:
        "hemexp eval-vae --config {params.config} > {log} 2>&1"


FINAL_TARGETS += [VAE_MODEL, rules.eval_vae.output.csv, rules.eval_vae.output.md, rules.eval_vae.output.json,
                  rules.eval_vae.output.figure]
