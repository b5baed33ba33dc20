# Evaluation: Table 2 (MAE / ASSD / COV by expansion status vs copy-baseline and nnU-Net), adherence,
# calibration + PIT of every sampled variant, and the clinical-guidance study (Fig. 3) of one variant.
# Extra flag-source passes (evaluation.flag_source_passes, e.g. the classifier flag for 2D-ice) sample
# the flag-conditioned variants again under results/samples_<source>/; each is one Table 2 row.
from hemexp.workflow.report import build_report
from hemexp.evaluation.collect import flag_source_passes, nnunet_baselines

REPORT = f"{RESULTS}/report.html"  # written by build_report(workflow, REPORT) in the Snakefile's onsuccess
METRICS = f"{RESULTS}/metrics"
FIGURES = f"{RESULTS}/figures"
EVAL_CAT = "5. Evaluation"
GUIDANCE_CAT = "6. Clinical guidance"
FLAG_PASSES = flag_source_passes(config)  # source -> variants; a bad entry fails here, before any job
EVAL_MASKS = [f"samples/sample_{k:02d}_{m}.nii.gz" for k in range(N_SAMPLES) for m in ("iph", "ivh")]
FLAG_PASS_DIR = f"{RESULTS}/samples_{{source}}/{{variant}}/{{patient}}"
PASS_DIRS = [f"{SAMPLES}/{v}" for v in SAMPLED] + [f"{RESULTS}/samples_{s}/{v}" for s, vs in FLAG_PASSES.items() for v in vs]
EVAL_NNUNET = list(nnunet_baselines(config))  # nnU-Net baselines Table 2 reads (rules/baselines.smk makes them)
PERTURB_VARIANT = config["evaluation"]["perturbation_variant"]
if PERTURB_VARIANT and "c" not in config["diffusion"]["variants"][PERTURB_VARIANT]["conditioning"]:
    raise ValueError(f"evaluation.perturbation_variant: {PERTURB_VARIANT!r} has no clinical conditioning "
                     "(conditioning without 'c'), so perturbing clinical inputs cannot change its samples")


if FLAG_PASSES:

    rule sample_flag_source:
        """Sample a flag-conditioned variant again with another expansion-flag source (Table 2 row,
        adherence), same settings and products as rule sample."""
        input:
            preprocessed=[f"{RESULTS}/preprocessed/{{patient}}/{f}" for f in PREPROCESSED_FILES],
            model=DIFFUSION_MODEL,
            vae=VAE_MODEL,
            stats=LATENT_STATS,
            classifier=lambda w: [CLASSIFIER] if w.source == "classifier" else [],
        output:
            summary=f"{FLAG_PASS_DIR}/summary.json",
            volumes=f"{FLAG_PASS_DIR}/volumes.tsv",
            figure=report(f"{FLAG_PASS_DIR}/figure.png", category="4. Samples",
                          subcategory="{variant} ({source} flag)", caption="../report/samples.rst",
                          labels={"variant": "{variant}", "flag": "{source}", "patient": "{patient}"}),
            maps=[f"{FLAG_PASS_DIR}/{f}" for f in MAP_FILES],
            native=[f"{FLAG_PASS_DIR}/{f}" for f in NATIVE_FILES],
            samples=[f"{FLAG_PASS_DIR}/{f}" for f in SAMPLE_FILES],
        params:
            cfg=cfg_hash("sampling"),
            out=lambda w: FLAG_PASS_DIR.format(source=w.source, variant=w.variant, patient=w.patient),
            config=RESOLVED_CONFIG,
        wildcard_constraints:
            source=_one_of(FLAG_PASSES),
            variant=_one_of({v for vs in FLAG_PASSES.values() for v in vs}),
            patient=PATIENT_ID_PATTERN,
        resources:
            **R("sample"),
        conda:
            HEMEXP_ENV
        log:
            f"{RESULTS}/logs/sample_{{source}}/{{variant}}/{{patient}}.log",
        shell:
            "hemexp sample {wildcards.variant} {wildcards.patient} --flag-source {wildcards.source} "
            "--out {params.out} --config {params.config} > {log} 2>&1"


if TEST:

    rule evaluate:
        """Table 2, adherence and calibration (+ PIT) of every sampled variant and flag pass on the test
        split; each variant's numbers are logged into its MLflow run."""
        input:
            samples=[f"{d}/{p}/{f}" for d in PASS_DIRS for p in TEST for f in ("volumes.tsv", "summary.json", *EVAL_MASKS)],
            preprocessed=[f"{RESULTS}/preprocessed/{p}/{f}" for p in TEST
                          for f in ("summary.json", "bl_iph.nii.gz", "bl_ivh.nii.gz", "fu_iph.nii.gz", "fu_ivh.nii.gz")],
            baselines=[f"{RESULTS}/baselines/{b}/{p}/{s}.nii.gz" for b in EVAL_NNUNET for p in TEST for s in ("iph", "ivh")],
        output:
            table2=f"{METRICS}/table2.csv",
            table2_md=f"{METRICS}/table2.md",
            table2_json=f"{METRICS}/table2.json",
            table2_html=report(f"{METRICS}/table2.html", category=EVAL_CAT, subcategory="Table 2",
                               caption="../report/table2.rst"),
            per_sample=f"{METRICS}/metrics_per_sample.csv",
            adherence=f"{METRICS}/adherence.csv",
            adherence_md=f"{METRICS}/adherence.md",
            adherence_json=f"{METRICS}/adherence.json",
            adherence_html=report(f"{METRICS}/adherence.html", category=EVAL_CAT, subcategory="Adherence",
                                  caption="../report/adherence.rst"),
            calibration=f"{METRICS}/calibration.csv",
            calibration_md=f"{METRICS}/calibration.md",
            calibration_json=f"{METRICS}/calibration.json",
            calibration_html=report(f"{METRICS}/calibration.html", category=EVAL_CAT, subcategory="Calibration",
                                    caption="../report/calibration.rst"),
            calibration_patients=f"{METRICS}/calibration_per_patient.csv",
            pit=report(f"{FIGURES}/pit.png", category=EVAL_CAT, subcategory="Calibration", caption="../report/pit.rst"),
        params:
            cfg=cfg_hash("evaluation", "sampling", "baselines"),
            patients=" ".join(TEST),
            config=RESOLVED_CONFIG,
        resources:
            **R("evaluate"),
        conda:
            HEMEXP_ENV
        log:
            f"{RESULTS}/logs/evaluate.log",
        shell:
            "hemexp evaluate --patients {params.patients} --config {params.config} > {log} 2>&1"

    FINAL_TARGETS += list(rules.evaluate.output)


if PERTURB_VARIANT and TEST:
    LEARNED_VS_TRUE = ([f"{METRICS}/learned_vs_true.{x}" for x in ("csv", "md", "html")]
                       + [f"{FIGURES}/learned_vs_true.png"] if config["cohort"]["source"] == "synthetic" else [])

    rule perturb:
        """Clinical-guidance study of one variant (Fig. 3): single-variable perturbations and the
        guidance-scale sweep, batched per patient and scale; learned vs true effects on the synthetic cohort."""
        input:
            preprocessed=[f"{RESULTS}/preprocessed/{p}/{f}" for p in TEST
                          for f in ("summary.json", "bl_ct.nii.gz", "bl_iph.nii.gz", "bl_ivh.nii.gz")],
            model=DIFFUSION_MODEL.format(variant=PERTURB_VARIANT),
            vae=VAE_MODEL,
            stats=LATENT_STATS,
            classifier=[CLASSIFIER] if USES_CLASSIFIER else [],
            truth=[f"{RESULTS}/raw/truth.json"] if LEARNED_VS_TRUE else [],
        output:
            table=f"{METRICS}/perturbation.csv",
            md=f"{METRICS}/perturbation.md",
            json=f"{METRICS}/perturbation.json",
            html=report(f"{METRICS}/perturbation.html", category=GUIDANCE_CAT, subcategory="Perturbations",
                        caption="../report/perturbation_table.rst"),
            volumes=f"{METRICS}/perturbation_volumes.csv",
            figure=report(f"{FIGURES}/perturbation.png", category=GUIDANCE_CAT, subcategory="Perturbations",
                          caption="../report/perturbation.rst"),
            learned=[report(f, category=GUIDANCE_CAT, subcategory="Learned vs true",
                            caption="../report/learned_vs_true.rst") if f.endswith((".html", ".png")) else f
                     for f in LEARNED_VS_TRUE],
        params:
            cfg=cfg_hash("evaluation", "sampling"),
            variant=PERTURB_VARIANT,
            patients=" ".join(TEST),
            config=RESOLVED_CONFIG,
        resources:
            **R("sample"),
        conda:
            HEMEXP_ENV
        log:
            f"{RESULTS}/logs/perturb.log",
        shell:
            "hemexp perturb {params.variant} --patients {params.patients} --config {params.config} > {log} 2>&1"

    FINAL_TARGETS += list(rules.perturb.output)

