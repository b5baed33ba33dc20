# Sampling: N simulated follow-ups per test patient and sampled variant (one GPU job per patient, so
# adding a test patient adds only its own jobs), and the built-in HE classifier that supplies the
# expansion flag when sampling.flag_source is 'classifier'. The classifier trains on the training
# split only (its test AUC is a separate rule), so adding a test patient never retrains it.
import os

SAMPLE_DIR = str(L.samples("{variant}", "{patient}"))
FLAG_PASS_DIR = str(L.samples("{variant}", "{patient}", flag_source="{source}"))
CLASSIFIER_FROZEN = FROZEN and os.path.exists(CLASSIFIER)
OOD_FROZEN = FROZEN and os.path.exists(OOD_ENVELOPE)


if not CLASSIFIER_FROZEN:

    rule train_classifier:
        """Built-in HE classifier (logistic regression) on the training split: model + CV AUC. The
        manifest is read but not an input (a new manifest file for an added test patient must not
        retrain it); a changed manifest row reruns that patient's preprocess, whose summary is an input.
        """
        input:
            summaries=train_index("summaries"),
        output:
            model=CLASSIFIER,
            metrics=str(L.classifier_dir / "metrics.json"),
        log:
            str(L.log("train_classifier")),
        benchmark:
            str(L.benchmark("train_classifier", L.log("train_classifier")))
        conda:
            HEMEXP_ENV
        resources:
            **R("train_classifier"),
        params:
            cfg=cfg_hash("evaluation", "seed"),
            patients=" ".join(TRAIN),
            config=RESOLVED_CONFIG,
        shell:
            "hemexp train-classifier --patients {params.patients} --config {params.config} > {log} 2>&1"


if not OOD_FROZEN:

    rule fit_ood:
        """The out-of-distribution gate's training envelope: fitted ranges of acquisition, registration
        and VAE features over the training split (hemexp/sampling/ood.py); rule sample scores against it.
        """
        input:
            summaries=train_index("summaries"),
            native=train_index("native"),
            vae=VAE_MODEL,
            stats=LATENT_STATS,
        output:
            OOD_ENVELOPE,
        log:
            str(L.log("fit_ood")),
        benchmark:
            str(L.benchmark("fit_ood", L.log("fit_ood")))
        conda:
            HEMEXP_ENV
        resources:
            **R("fit_ood"),
        params:
            cfg=cfg_hash("preprocess"),
            ood=lambda wildcards: str(config["sampling"]["ood"]),
            patients=" ".join(TRAIN),
            config=RESOLVED_CONFIG,
        shell:
            "hemexp fit-ood --patients {params.patients} --config {params.config} > {log} 2>&1"


rule eval_classifier:
    """Held-out performance of the built-in HE classifier (AUC, sensitivity, specificity) + predictions."""
    input:
        model=CLASSIFIER,
        summaries=[preprocessed_dir(p) for p in TRAIN + TEST],
    output:
        metrics=str(L.metric("classifier.json")),
        predictions=str(L.metric("classifier_predictions.tsv")),
    log:
        str(L.log("eval_classifier")),
    benchmark:
        str(L.benchmark("eval_classifier", L.log("eval_classifier")))
    conda:
        HEMEXP_ENV
    resources:
        **R("eval_classifier"),
    params:
        patients=" ".join(TRAIN + TEST),
        config=RESOLVED_CONFIG,
    shell:
        "hemexp eval-classifier --patients {params.patients} --config {params.config} > {log} 2>&1"


rule sample:
    """N follow-ups of one test patient (DDIM + guidance, batched): NIfTI samples and probability maps on
    the model grid and in native space, volumes.tsv, summary.json, figure.png."""
    input:
        preprocessed=preprocessed_dir("{patient}"),
        ingested=ingested_dir("{patient}"),  # the native grid and source format (dicom/ outputs)
        model=DIFFUSION_MODEL,
        vae=VAE_MODEL,
        stats=LATENT_STATS,
        ood=OOD_ENVELOPE,
        classifier=[CLASSIFIER] if USES_CLASSIFIER else [],
    output:
        summary=f"{SAMPLE_DIR}/summary.json",
        volumes=f"{SAMPLE_DIR}/volumes.tsv",
        figure=report(
            f"{SAMPLE_DIR}/figure.png",
            category="4. Samples",
            subcategory="{variant}",
            labels={"variant": "{variant}", "patient": "{patient}"},
        ),
        maps=directory(f"{SAMPLE_DIR}/maps"),  # {iph,ivh,new}_prob.nii.gz on the model grid
        native=directory(f"{SAMPLE_DIR}/native"),  # the same on the baseline scan
        samples=directory(f"{SAMPLE_DIR}/samples"),  # N x 3 NIfTIs, declared as one folder
    log:
        str(L.log("sample", "{variant}", "{patient}")),
    benchmark:
        str(L.benchmark("sample", L.log("sample", "{variant}", "{patient}")))
    wildcard_constraints:
        variant=one_of(SAMPLED),
        patient=PATIENT_ID_PATTERN,
    conda:
        HEMEXP_ENV
    resources:
        **R("sample"),
    params:
        cfg=cfg_hash("sampling"),
        config=RESOLVED_CONFIG,
    shell:
        "hemexp sample {wildcards.variant} {wildcards.patient} --config {params.config} > {log} 2>&1"


if FLAG_PASSES:

    rule sample_flag_source:
        """Sample a flag-conditioned variant again with another expansion-flag source (Table 2 row,
        adherence), same settings and products as rule sample."""
        input:
            preprocessed=preprocessed_dir("{patient}"),
            ingested=ingested_dir("{patient}"),
            model=DIFFUSION_MODEL,
            vae=VAE_MODEL,
            stats=LATENT_STATS,
            ood=OOD_ENVELOPE,
            classifier=lambda w: [CLASSIFIER] if w.source == "classifier" else [],
        output:
            summary=f"{FLAG_PASS_DIR}/summary.json",
            volumes=f"{FLAG_PASS_DIR}/volumes.tsv",
            figure=report(
                f"{FLAG_PASS_DIR}/figure.png",
                category="4. Samples",
                subcategory="{variant} ({source} flag)",
                caption="../report/samples.rst",
                labels={"variant": "{variant}", "flag": "{source}", "patient": "{patient}"},
            ),
            maps=directory(f"{FLAG_PASS_DIR}/maps"),
            native=directory(f"{FLAG_PASS_DIR}/native"),
            samples=directory(f"{FLAG_PASS_DIR}/samples"),
        log:
            str(L.log("sample_{source}", "{variant}", "{patient}")),
        benchmark:
            str(L.benchmark("sample_flag_source", L.log("sample_{source}", "{variant}", "{patient}")))
        wildcard_constraints:
            source=one_of(FLAG_PASSES),
            variant=one_of({v for vs in FLAG_PASSES.values() for v in vs}),
            patient=PATIENT_ID_PATTERN,
        conda:
            HEMEXP_ENV
        resources:
            **R("sample_flag_source"),
        params:
            cfg=cfg_hash("sampling"),
            out=lambda w: FLAG_PASS_DIR.format(source=w.source, variant=w.variant, patient=w.patient),
            config=RESOLVED_CONFIG,
        shell:
            "hemexp sample {wildcards.variant} {wildcards.patient} --flag-source {wildcards.source} "
            "--out {params.out} --config {params.config} > {log} 2>&1"


FINAL_TARGETS += [
    str(L.samples(v, p) / f)
    for v in SAMPLED
    for p in TEST
    for f in ("summary.json",)  # one output stands for its job (the others are its outputs too)
]
FINAL_TARGETS += [CLASSIFIER, rules.eval_classifier.output.metrics, OOD_ENVELOPE]
if not CLASSIFIER_FROZEN:
    FINAL_TARGETS += [rules.train_classifier.output.metrics]
