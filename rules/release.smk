# Release: each sampled variant as one registered MLflow model (VAE, diffusion weights, latent
# statistics, classifier, OOD envelope, template, config and model card), alias @candidate. The card
# is written from the run's own tables, so registration waits for the evaluation. @champion is set by
# a person with `hemexp promote` after reading the card (README, Sharing a trained model).
from hemexp.preprocess.template import template_paths

RELEASE_DIR = str(L.release_dir("{variant}"))
RELEASE_TEMPLATE = [str(p) for p in template_paths(config) if p]
RELEASE_EVAL = list(rules.evaluate.output) if TEST else []
RELEASE_TABLES = [str(L.table1("md")), str(L.metric("vae_fidelity.md"))]


rule register_model:
    """Register one variant in the MLflow model registry (pyfunc + bundle + model card), alias @candidate."""
    input:
        model=DIFFUSION_MODEL,
        vae=VAE_MODEL,
        stats=LATENT_STATS,
        ood=OOD_ENVELOPE,
        classifier=CLASSIFIER,
        template=RELEASE_TEMPLATE,
        tables=[ancient(t) for t in RELEASE_TABLES],  # descriptive: rewritten tables make no new version
        evaluation=RELEASE_EVAL,
        study=lambda w: release_study(w.variant),  # rules/common.smk
    output:
        registered=f"{RELEASE_DIR}/registered.json",
        card=report(
            f"{RELEASE_DIR}/model_card.md",
            category="7. Release",
            subcategory="{variant}",
        ),
    log:
        str(L.log("register_model", "{variant}")),
    benchmark:
        str(L.benchmark("register_model", L.log("register_model", "{variant}")))
    wildcard_constraints:
        variant=one_of(SAMPLED),
    conda:
        HEMEXP_ENV
    resources:
        **R("register_model"),
    params:
        config=RESOLVED_CONFIG,
    shell:
        "hemexp register-model {wildcards.variant} --config {params.config} > {log} 2>&1"


FINAL_TARGETS += [str(L.release_dir(v) / "registered.json") for v in SAMPLED]
