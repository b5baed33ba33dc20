# nnU-Net v2 baselines (paper Table 2: nnUNet-2D, nnUNet-3D), active only when config `baselines`
# lists nnunet_2d / nnunet_3d: export the training split as an nnU-Net raw dataset -> plan and
# preprocess (2d + 3d_fullres) -> train each fold (GPU) -> per test patient: export to imagesTs,
# predict (ensemble of the folds), iph/ivh masks on the model grid that evaluation scores like one
# HemExp sample. Training depends on training patients only: adding a test patient adds its own jobs.
#
# nnU-Net lives in its own environment (docs/nnunet.md): the plan/train/predict rules declare
# envs/nnunet.yaml for `--sw-deployment-method conda`; there the job's PATH leads to nnU-Net's CLI, and
# HemExp itself is run by $HEMEXP_PYTHON, the interpreter that parses this workflow (it has hemexp: the
# Snakefile imports it; every job process re-parses the workflow and sets it again). An environment
# variable rather than a rule parameter, so a different launcher path never retrains nnU-Net, and
# rather than `hemexp` on PATH, which `conda activate` may drop. Without conda, hemexp builds and uses
# .venv-nnunet.
import re

from hemexp.core.config import config_hash
from hemexp.baselines.nnunet.dataset import active_baselines, heldout_image_paths
from hemexp.baselines.nnunet.dataset import layout as nnunet_layout
from hemexp.baselines.nnunet.run import set_hemexp_python

NNUNET_BASELINES = active_baselines(config)  # e.g. {"nnunet_2d": "2d", "nnunet_3d": "3d_fullres"}

if NNUNET_BASELINES and TEST:
    NNUNET = nnunet_layout(config)
    NNUNET_ENV = "../envs/nnunet.yaml"
    set_hemexp_python()  # $HEMEXP_PYTHON runs HemExp inside jobs whose environment is nnU-Net's
    NNUNET_TRAINER = config["nnunet"]["trainer"]
    NNUNET_FOLDS = [str(f) for f in config["nnunet"]["folds"]]
    NNUNET_TEST_RE = "|".join(re.escape(p) for p in TEST)

    rule nnunet_export:
        """The training split as nnU-Net raw dataset: imagesTr, labelsTr (follow-up labels), dataset.json."""
        input:
            [preprocessed_dir(p) for p in TRAIN],
        output:
            images=directory(str(NNUNET.raw_dataset / "imagesTr")),
            labels=directory(str(NNUNET.raw_dataset / "labelsTr")),
            dataset_json=str(NNUNET.raw_dataset / "dataset.json"),
        log:
            str(L.log("nnunet", "export")),
        benchmark:
            str(L.benchmark("nnunet_export", L.log("nnunet", "export")))
        conda:
            HEMEXP_ENV
        resources:
            **R("nnunet_export"),
        params:
            train=config_hash({"train": TRAIN}),
            config=RESOLVED_CONFIG,
        shell:
            "hemexp nnunet-export --config {params.config} > {log} 2>&1"

    rule nnunet_export_test:
        """One test patient's baseline CT/IPH/IVH as imagesTs/<p>_0000..0002 (per patient: adding a test
        patient re-plans nothing)."""
        input:
            preprocessed_dir("{patient}"),
        output:
            [str(p) for p in heldout_image_paths(config, "{patient}")],
        log:
            str(L.log("nnunet", "export_test_{patient}")),
        benchmark:
            str(L.benchmark("nnunet_export_test", L.log("nnunet", "export_test_{patient}")))
        wildcard_constraints:
            patient=NNUNET_TEST_RE,
        conda:
            HEMEXP_ENV
        resources:
            **R("nnunet_export_test"),
        params:
            config=RESOLVED_CONFIG,
        shell:
            "hemexp nnunet-export-test {wildcards.patient} --config {params.config} > {log} 2>&1"

    rule nnunet_plan:
        """nnUNetv2_plan_and_preprocess for 2d and 3d_fullres, plus nnU-Net's seeded 5-fold split."""
        input:
            rules.nnunet_export.output,
        output:
            directory(str(NNUNET.preprocessed_dataset)),
        log:
            str(L.log("nnunet", "plan")),
        benchmark:
            str(L.benchmark("nnunet_plan", L.log("nnunet", "plan")))
        conda:
            NNUNET_ENV
        resources:
            **R("nnunet_plan"),
        params:
            config=RESOLVED_CONFIG,
        shell:
            '"$HEMEXP_PYTHON" -m hemexp.cli nnunet-plan --config {params.config} > {log} 2>&1'

    rule nnunet_train:
        """nnUNetv2_train one configuration and fold (GPU when available, else -device cpu)."""
        input:
            rules.nnunet_plan.output,
        output:
            directory(str(NNUNET.fold_dir(NNUNET_TRAINER, "{configuration}", "{fold}"))),
        log:
            str(L.log("nnunet", "train_{configuration}_fold{fold}")),
        benchmark:
            str(L.benchmark("nnunet_train", L.log("nnunet", "train_{configuration}_fold{fold}")))
        wildcard_constraints:
            configuration="2d|3d_fullres",
            fold="all|[0-4]",
        conda:
            NNUNET_ENV
        resources:
            **R("nnunet_train"),
        params:
            device=config["nnunet"]["device"],
            config=RESOLVED_CONFIG,
        shell:
            '"$HEMEXP_PYTHON" -m hemexp.cli nnunet-train {wildcards.configuration} {wildcards.fold} --config {params.config} > {log} 2>&1'

    rule nnunet_predict:
        """nnUNetv2_predict one test patient with every configured fold (their ensemble)."""
        input:
            images=[str(p) for p in heldout_image_paths(config, "{patient}")],
            folds=[str(NNUNET.fold_dir(NNUNET_TRAINER, "{configuration}", f)) for f in NNUNET_FOLDS],
        output:
            str(NNUNET.prediction("{configuration}", "{patient}")),
        log:
            str(L.log("nnunet", "predict_{configuration}_{patient}")),
        benchmark:
            str(L.benchmark("nnunet_predict", L.log("nnunet", "predict_{configuration}_{patient}")))
        wildcard_constraints:
            configuration="2d|3d_fullres",
            patient=NNUNET_TEST_RE,
        conda:
            NNUNET_ENV
        resources:
            **R("nnunet_predict"),
        params:
            tta=config["nnunet"]["tta"],
            config=RESOLVED_CONFIG,
        shell:
            '"$HEMEXP_PYTHON" -m hemexp.cli nnunet-predict {wildcards.configuration} {wildcards.patient} --config {params.config} > {log} 2>&1'

    rule nnunet_masks:
        """One test patient's nnU-Net label map as iph/ivh masks (uint8, model grid) for evaluation."""
        input:
            prediction=lambda w: str(NNUNET.prediction(NNUNET_BASELINES[w.baseline], w.patient)),
            reference=preprocessed_dir("{patient}"),
        output:
            iph=str(L.baseline_masks("{baseline}", "{patient}") / "iph.nii.gz"),
            ivh=str(L.baseline_masks("{baseline}", "{patient}") / "ivh.nii.gz"),
        log:
            str(L.log("nnunet", "masks_{baseline}_{patient}")),
        benchmark:
            str(L.benchmark("nnunet_masks", L.log("nnunet", "masks_{baseline}_{patient}")))
        wildcard_constraints:
            baseline="|".join(NNUNET_BASELINES),
            patient=NNUNET_TEST_RE,
        conda:
            HEMEXP_ENV
        resources:
            **R("nnunet_masks"),
        params:
            config=RESOLVED_CONFIG,
        shell:
            "hemexp nnunet-masks {wildcards.baseline} {wildcards.patient} --config {params.config} > {log} 2>&1"

    FINAL_TARGETS += [
        str(L.baseline_masks(b, p) / f"{m}.nii.gz")
        for b in NNUNET_BASELINES
        for p in TEST
        for m in ("iph", "ivh")
    ]
