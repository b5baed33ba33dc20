# Multi-head VAE: train on the train split's target slices (baseline + follow-up), then measure its
# fidelity (CT SSIM, IPH/IVH Dice) on train and test. Checkpoints (last.ckpt) live beside vae.pt but
# are not declared outputs, so Snakemake never deletes them: a killed job resumes where it stopped.
import os

# freeze_models: an existing VAE is kept as it is (no training rule), so new training patients
# change only the jobs that read it.
VAE_FROZEN = FROZEN and os.path.exists(VAE_MODEL)

if not VAE_FROZEN:

    rule train_vae:
        """Train the multi-head VAE (GPU rule); resumes from last.ckpt after a kill."""
        input:
            train_index("shards"),
        output:
            VAE_MODEL,
        log:
            str(L.log("train_vae")),
        benchmark:
            str(L.benchmark("train_vae", L.log("train_vae")))
        conda:
            HEMEXP_ENV
        threads: R("train_vae")["cpus_per_task"]  # capped by --cores; OMP_NUM_THREADS for torch (else 1)
        resources:
            **R("train_vae"),
        params:
            cfg=cfg_hash("vae", "seed", "preprocess", "shards"),
            config=RESOLVED_CONFIG,
        shell:
            "hemexp train-vae --config {params.config} > {log} 2>&1"


rule eval_vae:
    """VAE fidelity in the paper's layout (rows Train/Test) + reconstruction figure; logged to MLflow."""
    input:
        model=VAE_MODEL,
        shards=[str(L.shard(p)) for p in TRAIN + TEST],
    output:
        csv=str(L.metric("vae_fidelity.csv")),
        md=report(str(L.metric("vae_fidelity.md")), category="2. VAE"),
        json=str(L.metric("vae_fidelity.json")),
        figure=report(str(L.figure("vae_reconstructions.png")), category="2. VAE"),
    log:
        str(L.log("eval_vae")),
    benchmark:
        str(L.benchmark("eval_vae", L.log("eval_vae")))
    conda:
        HEMEXP_ENV
    resources:
        **R("eval_vae"),
    params:
        cfg=cfg_hash("preprocess"),
        config=RESOLVED_CONFIG,
    shell:
        "hemexp eval-vae --config {params.config} > {log} 2>&1"


FINAL_TARGETS += [
    VAE_MODEL,
    rules.eval_vae.output.csv,
    rules.eval_vae.output.md,
    rules.eval_vae.output.json,
    rules.eval_vae.output.figure,
]
