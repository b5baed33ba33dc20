# Sampling: N simulated follow-ups per test patient and sampled variant (one GPU job per patient, so
# adding a test patient adds only its own jobs), and the built-in HE classifier that supplies the
# expansion flag when sampling.flag_source is 'classifier'. The classifier trains on the training
# split only (its test AUC is a separate rule), so adding a test patient never retrains it.
import os
import re

SAMPLES = f"{RESULTS}/samples"
SAMPLE_DIR = f"{SAMPLES}/{{variant}}/{{patient}}"
CLASSIFIER_DIR = f"{RESULTS}/models/classifier"
CLASSIFIER = f"{CLASSIFIER_DIR}/classifier.joblib"
CLASSIFIER_FROZEN = bool(config["freeze_models"]) and os.path.exists(CLASSIFIER)
USES_CLASSIFIER = str(config["sampling"]["flag_source"]) == "classifier"
N_SAMPLES = int(config["sampling"]["n_samples"])
SAMPLE_FILES = [f"samples/sample_{k:02d}_{m}.nii.gz" for k in range(N_SAMPLES) for m in ("ct", "iph", "ivh")]
MAP_FILES = [f"maps/{kind}_prob.nii.gz" for kind in ("iph", "ivh", "new")]
NATIVE_FILES = [f"native/{kind}_prob.nii.gz" for kind in ("iph", "ivh", "new")]
# wildcard regex matching exactly one of the names (also used by rules/evaluation.smk)
_one_of = lambda names: "|".join(re.escape(n) for n in sorted(names)) or "NO_MATCH"  # noqa: E731


if not CLASSIFIER_FROZEN:

    rule train_classifier:
        """Built-in HE classifier (logistic regression) on the training split: model + CV AUC. The
        manifest is read but not an input (a new manifest file for an added test patient must not
        retrain it); a changed manifest row reruns that patient's preprocess, whose summary is an input."""
        input:
            summaries=[f"{RESULTS}/preprocessed/{p}/summary.json" for p in TRAIN],
        output:
            model=CLASSIFIER,
            metrics=f"{CLASSIFIER_DIR}/metrics.json",
        params:
            cfg=cfg_hash("evaluation", "seed"),
            patients=" ".join(TRAIN),
            config=RESOLVED_CONFIG,
        resources:
            **R("train_classifier"),
        conda:
            HEMEXP_ENV
        log:
            f"{RESULTS}/logs/train_classifier.log",
        shell:
            "hemexp train-classifier --patients {params.patients} --config {params.config} > {log} 2>&1"


rule eval_classifier:
    """Held-out performance of the built-in HE classifier (AUC, sensitivity, specificity) + predictions."""
    input:
        model=CLASSIFIER,
        summaries=[f"{RESULTS}/preprocessed/{p}/summary.json" for p in TRAIN + TEST],
    output:
        metrics=f"{RESULTS}/metrics/classifier.json",
        predictions=f"{RESULTS}/metrics/classifier_predictions.tsv",
    params:
        patients=" ".join(TRAIN + TEST),
        config=RESOLVED_CONFIG,
    resources:
        **R("eval_classifier"),
    conda:
        HEMEXP_ENV
    log:
        f"{RESULTS}/logs/eval_classifier.log",
    shell:
        "hemexp eval-classifier --patients {params.patients} --config {params.config} > {log} 2>&1"


rule sample:
    """N follow-ups of one test patient (DDIM + guidance, batched): NIfTI samples and probability maps on
    the model grid and in native space, volumes.tsv, summary.json, figure.png."""
    input:
        preprocessed=[f"{RESULTS}/preprocessed/{{patient}}/{f}" for f in PREPROCESSED_FILES],
        model=DIFFUSION_MODEL,
        vae=VAE_MODEL,
        stats=LATENT_STATS,
        classifier=[CLASSIFIER] if USES_CLASSIFIER else [],
    output:
        summary=f"{SAMPLE_DIR}/summary.json",
        volumes=f"{SAMPLE_DIR}/volumes.tsv",
        figure=report(f"{SAMPLE_DIR}/figure.png", category="4. Samples", subcategory="{variant}",
                      labels={"variant": "{variant}", "patient": "{patient}"}),
        maps=[f"{SAMPLE_DIR}/{f}" for f in MAP_FILES],
        native=[f"{SAMPLE_DIR}/{f}" for f in NATIVE_FILES],
        samples=[f"{SAMPLE_DIR}/{f}" for f in SAMPLE_FILES],
    params:
        cfg=cfg_hash("sampling"),
        config=RESOLVED_CONFIG,
    wildcard_constraints:
        variant=_one_of(SAMPLED),
        patient=PATIENT_ID_PATTERN,
    resources:
        **R("sample"),
    conda:
        HEMEXP_ENV
    log:
        f"{RESULTS}/logs/sample/{{variant}}/{{patient}}.log",
    shell:
        "hemexp sample {wildcards.variant} {wildcards.patient} --config {params.config} > {log} 2>&1"


FINAL_TARGETS += [f"{SAMPLES}/{v}/{p}/{f}" for v in SAMPLED for p in TEST
                  for f in ("summary.json", "volumes.tsv", "figure.png")]
FINAL_TARGETS += [CLASSIFIER, rules.eval_classifier.output.metrics]
if not CLASSIFIER_FROZEN:
    FINAL_TARGETS += [rules.train_classifier.output.metrics]
