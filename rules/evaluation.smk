# Evaluation: Table 2 (MAE / ASSD / COV by expansion status vs copy-baseline and nnU-Net), adherence,
# calibration + PIT of every sampled variant, and the clinical-guidance study (Fig. 3) of one variant.
# Extra flag-source passes (evaluation.flag_source_passes, e.g. the classifier flag for 2D-ice) sample
# the flag-conditioned variants again under results/samples_<source>/; each is one Table 2 row.
from hemexp.baselines.nnunet.dataset import baseline_methods
from hemexp.evaluation.validity.names import PRODUCTS as VALIDITY_TABLES
from hemexp.evaluation.validity.names import studied_variants

EVAL_CAT = "5. Evaluation"
GUIDANCE_CAT = "6. Clinical guidance"
PASS_DIRS = [L.samples_root() / v for v in SAMPLED] + [
    L.samples_root(s) / v for s, vs in FLAG_PASSES.items() for v in vs
]
# nnU-Net baselines Table 2 reads (rules/baselines.smk makes them)
EVAL_NNUNET = list(baseline_methods(config))
# Clinical-guidance study variant (the config validator checks it has clinical conditioning)
PERTURB_VARIANT = config["evaluation"]["perturbation_variant"]


if TEST:

    rule evaluate:
        """Table 2, adherence and calibration (+ PIT) of every sampled variant and flag pass on the test
        split; each variant's numbers are logged into its MLflow run."""
        input:
            samples=[
                str(d / p / f)
                for d in PASS_DIRS
                for p in TEST
                for f in ("volumes.tsv", "summary.json", "samples")
            ],
            preprocessed=[preprocessed_dir(p) for p in TEST],
            baselines=[
                str(L.baseline_masks(b, p) / f"{s}.nii.gz")
                for b in EVAL_NNUNET
                for p in TEST
                for s in ("iph", "ivh")
            ],
        output:
            table2=str(L.metric("table2.csv")),
            table2_md=str(L.metric("table2.md")),
            table2_json=str(L.metric("table2.json")),
            table2_html=report(
                str(L.metric("table2.html")),
                category=EVAL_CAT,
                subcategory="Table 2",
                caption="../report/table2.rst",
            ),
            per_sample=str(L.metric("metrics_per_sample.csv")),
            adherence=str(L.metric("adherence.csv")),
            adherence_md=str(L.metric("adherence.md")),
            adherence_json=str(L.metric("adherence.json")),
            adherence_html=report(
                str(L.metric("adherence.html")),
                category=EVAL_CAT,
                subcategory="Adherence",
                caption="../report/adherence.rst",
            ),
            calibration=str(L.metric("calibration.csv")),
            calibration_md=str(L.metric("calibration.md")),
            calibration_json=str(L.metric("calibration.json")),
            calibration_html=report(
                str(L.metric("calibration.html")),
                category=EVAL_CAT,
                subcategory="Calibration",
                caption="../report/calibration.rst",
            ),
            calibration_patients=str(L.metric("calibration_per_patient.csv")),
            pit=report(
                str(L.figure("pit.png")),
                category=EVAL_CAT,
                subcategory="Calibration",
                caption="../report/pit.rst",
            ),
        log:
            str(L.log("evaluate")),
        benchmark:
            str(L.benchmark("evaluate", L.log("evaluate")))
        conda:
            HEMEXP_ENV
        resources:
            **R("evaluate"),
        params:
            cfg=cfg_hash("evaluation", "sampling", "baselines"),
            patients=" ".join(TEST),
            config=RESOLVED_CONFIG,
        shell:
            "hemexp evaluate --patients {params.patients} --config {params.config} > {log} 2>&1"

    FINAL_TARGETS += list(rules.evaluate.output)


if PERTURB_VARIANT and TEST:
    LEARNED_VS_TRUE = (
        [str(L.metric(f"learned_vs_true.{x}")) for x in ("csv", "md", "html")]
        + [str(L.figure("learned_vs_true.png"))]
        if config["cohort"]["source"] == "synthetic"
        else []
    )

    rule perturb:
        """Clinical-guidance study of one variant (Fig. 3): single-variable perturbations and the
        guidance-scale sweep, batched per patient and scale; learned vs true effects on the synthetic cohort.
        """
        input:
            preprocessed=[preprocessed_dir(p) for p in TEST],
            model=DIFFUSION_MODEL.format(variant=PERTURB_VARIANT),
            vae=VAE_MODEL,
            stats=LATENT_STATS,
            classifier=[CLASSIFIER] if USES_CLASSIFIER else [],
            truth=[str(L.truth)] if LEARNED_VS_TRUE else [],
        output:
            table=str(L.metric("perturbation.csv")),
            md=str(L.metric("perturbation.md")),
            json=str(L.metric("perturbation.json")),
            html=report(
                str(L.metric("perturbation.html")),
                category=GUIDANCE_CAT,
                subcategory="Perturbations",
                caption="../report/perturbation_table.rst",
            ),
            volumes=str(L.metric("perturbation_volumes.csv")),
            figure=report(
                str(L.figure("perturbation.png")),
                category=GUIDANCE_CAT,
                subcategory="Perturbations",
                caption="../report/perturbation.rst",
            ),
            learned=[
                (
                    report(
                        f,
                        category=GUIDANCE_CAT,
                        subcategory="Learned vs true",
                        caption="../report/learned_vs_true.rst",
                    )
                    if f.endswith((".html", ".png"))
                    else f
                )
                for f in LEARNED_VS_TRUE
            ],
        log:
            str(L.log("perturb")),
        benchmark:
            str(L.benchmark("perturb", L.log("perturb")))
        conda:
            HEMEXP_ENV
        resources:
            **R("perturb"),
        params:
            cfg=cfg_hash("evaluation", "sampling"),
            variant=PERTURB_VARIANT,
            patients=" ".join(TEST),
            config=RESOLVED_CONFIG,
        shell:
            "hemexp perturb {params.variant} --patients {params.patients} --config {params.config} > {log} 2>&1"

    FINAL_TARGETS += list(rules.perturb.output)


# Ground-truth validity study (config/validity.yaml, `make validity`; README "Validity study"): not
# part of `rule all`, a named target `validity`. One sampling job per studied variant (an ablation
# row each), then one report scoring every variant against the synthetic cohort's law.
VALIDITY_VARIANTS = studied_variants(config)

if TEST and config["cohort"]["source"] == "synthetic":

    rule validity_sample:
        """Validity samples of one variant for every test patient: calibration/adherence sets under flag
        1 and flag 0, and the clinical scenarios and guidance profiles under the true flag."""
        input:
            preprocessed=[preprocessed_dir(p) for p in TEST],
            # the follow-up: the truth measured as a sample is (diagnostics)
            latents=[str(L.latents(p)) for p in TRAIN + TEST],  # the denoising-fit diagnostic
            model=DIFFUSION_MODEL,
            vae=VAE_MODEL,
            stats=LATENT_STATS,
        output:
            samples=str(L.validity_volumes("{variant}")),
            diagnostics=str(L.validity_diagnostics("{variant}")),
        log:
            str(L.log("validity_sample", "{variant}")),
        benchmark:
            str(L.benchmark("validity_sample", L.log("validity_sample", "{variant}")))
        wildcard_constraints:
            variant=one_of(VALIDITY_VARIANTS),
        conda:
            HEMEXP_ENV
        resources:
            **R("validity_sample"),
        params:
            cfg=cfg_hash("evaluation", "sampling"),
            patients=" ".join(TEST),
            config=RESOLVED_CONFIG,
        shell:
            "hemexp validity-sample {wildcards.variant} --patients {params.patients} --config {params.config} "
            "> {log} 2>&1"

    rule validity:
        """The validity study's tables, targets and figure over every studied variant."""
        input:
            samples=[str(L.validity_volumes(v)) for v in VALIDITY_VARIANTS],
            diagnostics=[str(L.validity_diagnostics(v)) for v in VALIDITY_VARIANTS],
            truth=str(L.truth),
            preprocessed=[preprocessed_dir(p) for p in TEST],
        output:
            tables=[str(L.validity_product(f"{t}.csv")) for t in VALIDITY_TABLES],
            md=str(L.validity_product("study.md")),
            json=str(L.validity_product("study.json")),
            figure=report(
                str(L.validity_product("validity.png")),
                category="7. Validity study",
                caption="../report/validity.rst",
            ),
        log:
            str(L.log("validity")),
        benchmark:
            str(L.benchmark("validity", L.log("validity")))
        conda:
            HEMEXP_ENV
        resources:
            **R("validity"),
        params:
            cfg=cfg_hash("evaluation"),
            patients=" ".join(TEST),
            config=RESOLVED_CONFIG,
        shell:
            "hemexp validity-report --patients {params.patients} --config {params.config} > {log} 2>&1"
