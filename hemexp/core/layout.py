"""Where every product lives under ``results_dir``: the one owner of result paths.

A rule's output and the code that writes it must not spell a path twice, so both take it from here:
``rules/common.smk`` builds ``L = Layout.of(config)`` and every rule declares ``L.<product>(...)``;
the stage code that writes or reads a product calls the same method. Per-patient and per-variant
methods take the ID as an argument, so the rules pass Snakemake wildcards (``"{patient}"``) and the
package passes real IDs through the one definition.

The layout itself is unchanged from the flat package: every path under ``results/`` is where it was,
so a results folder built before the stage packages is still up to date.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# File names inside per-patient folders, shared by the stage that writes them and the ones that read them
# (the rules declare the folders: rules/common.smk, "Folder outputs").
BASELINE_FILES = ("bl_ct.nii.gz", "bl_iph.nii.gz", "bl_ivh.nii.gz")
FOLLOWUP_FILES = ("fu_ct.nii.gz", "fu_iph.nii.gz", "fu_ivh.nii.gz")
MAP_KINDS = ("iph", "ivh", "new")
SAMPLE_STRUCTURES = ("ct", "iph", "ivh")
SAMPLE_MASK = "samples/sample_{k:02d}_{structure}.nii.gz"
# Optional DICOM outputs of a sample folder (sampling.dicom_output; see hemexp.io.dicom_seg): not rule
# outputs, since whether they exist depends on the patient's input format.
DICOM_DIR = "dicom"
DICOM_CT_DIR = "ct"  # CT{k:04d}.dcm, one file per slice
DICOM_SEG_BINARY = "seg_median.dcm"
DICOM_SEG_FRACTIONAL = "seg_probability.dcm"
DICOM_SIDECAR = "dicom.json"


@dataclass(frozen=True)
class Layout:
    """Every product path of one results folder; arguments may be IDs or Snakemake wildcards."""

    root: Path

    @classmethod
    def of(cls, cfg: dict[str, Any]) -> Layout:
        return cls(Path(cfg["results_dir"]))

    # ------------------------------------------------------------------ cohort
    @property
    def raw(self) -> Path:
        """Where ``hemexp synth`` writes the synthetic cohort (raw DICOM/NIfTI + manifest)."""
        return self.root / "raw"

    @property
    def synthetic_manifest(self) -> Path:
        return self.raw / "manifest.tsv"

    @property
    def synthetic_clinical(self) -> Path:
        return self.raw / "clinical.tsv"

    @property
    def truth(self) -> Path:
        """The synthetic cohort's ground truth: growth law, per-patient draws (``truth.json``)."""
        return self.raw / "truth.json"

    @property
    def cohort_dir(self) -> Path:
        return self.root / "cohort"

    @property
    def manifest_check(self) -> Path:
        return self.cohort_dir / "manifest_check.json"

    def table1(self, ext: str) -> Path:
        return self.cohort_dir / f"table1.{ext}"

    @property
    def resolved_config(self) -> Path:
        """The merged config every job reads (written once per workflow start)."""
        return self.root / "config" / "resolved.yaml"

    # ------------------------------------------------------------------ preprocess
    def ingested(self, patient: str) -> Path:
        return self.root / "ingested" / patient

    def annotation_grid(self, patient: str, timepoint: str = "baseline") -> Path:
        """``hemexp export-grid``: the canonical ingested CT (HU) to draw masks on (no rule declares it)."""
        return self.root / "annotation" / f"{patient}_{timepoint}_ct.nii.gz"

    @property
    def template_dir(self) -> Path:
        return self.root / "template"

    def preprocessed(self, patient: str) -> Path:
        return self.root / "preprocessed" / patient

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    def shard(self, patient: str) -> Path:
        return self.shards_dir / f"{patient}.parquet"

    # ------------------------------------------------------------------ models
    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def vae_dir(self) -> Path:
        return self.models / "vae"

    @property
    def vae_model(self) -> Path:
        return self.vae_dir / "vae.pt"

    @property
    def latents_dir(self) -> Path:
        return self.root / "latents"

    def latents(self, patient: str) -> Path:
        return self.latents_dir / f"{patient}.npz"

    @property
    def latent_stats(self) -> Path:
        return self.latents_dir / "stats.json"

    def diffusion_dir(self, variant: str) -> Path:
        return self.models / "diffusion" / variant

    def diffusion_model(self, variant: str) -> Path:
        return self.diffusion_dir(variant) / "model.pt"

    @property
    def classifier_dir(self) -> Path:
        return self.models / "classifier"

    @property
    def classifier(self) -> Path:
        return self.classifier_dir / "classifier.joblib"

    @property
    def ood_envelope(self) -> Path:
        """The training envelope of the out-of-distribution gate (``hemexp fit-ood``)."""
        return self.models / "ood" / "envelope.json"

    def native_baseline_brain(self, patient: str) -> Path:
        """The ingested baseline's brain mask on the native grid (image-noise feature of the OOD gate)."""
        return self.ingested(patient) / "brain_bl.nii.gz"

    # ------------------------------------------------------------------ samples
    def samples_root(self, flag_source: str | None = None) -> Path:
        """``samples/`` for the configured flag source; ``samples_<source>/`` for an extra flag pass."""
        return self.root / ("samples" if flag_source is None else f"samples_{flag_source}")

    def samples(self, variant: str, patient: str, flag_source: str | None = None) -> Path:
        return self.samples_root(flag_source) / variant / patient

    def samples_dicom(self, variant: str, patient: str, flag_source: str | None = None) -> Path:
        """The optional ``dicom/`` folder of a sample set (de-identified CT series, SEGs, sidecar)."""
        return self.samples(variant, patient, flag_source) / DICOM_DIR

    def ingest_facts(self, patient: str) -> Path:
        """``ingest.json``: the source format of each timepoint (what ``sampling.dicom_output: auto`` reads)."""
        return self.ingested(patient) / "ingest.json"

    def native_baseline_ct(self, patient: str) -> Path:
        """The ingested baseline CT: the native grid that sample maps are mapped back to."""
        return self.ingested(patient) / "bl_ct.nii.gz"

    # ------------------------------------------------------------------ baselines
    @property
    def nnunet_dir(self) -> Path:
        return self.root / "nnunet"

    def baseline_masks(self, baseline: str, patient: str) -> Path:
        """A deterministic baseline's ``iph.nii.gz`` / ``ivh.nii.gz`` for one patient (model grid)."""
        return self.root / "baselines" / baseline / patient

    # ------------------------------------------------------------------ evaluation and reports
    @property
    def metrics_dir(self) -> Path:
        return self.root / "metrics"

    def metric(self, name: str) -> Path:
        return self.metrics_dir / name

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"

    def figure(self, name: str) -> Path:
        return self.figures_dir / name

    # ------------------------------------------------------------------ validity study
    @property
    def validity_dir(self) -> Path:
        """The ground-truth validity study (``hemexp validity-sample`` / ``validity-report``)."""
        return self.root / "validity"

    def validity_volumes(self, variant: str) -> Path:
        """Every sampled volume of one studied variant: calibration/adherence rows and effect rows."""
        return self.validity_dir / "samples" / f"{variant}.csv"

    def validity_diagnostics(self, variant: str) -> Path:
        """Conditioning sensitivity and VAE volume bias of one studied variant."""
        return self.validity_dir / "samples" / f"{variant}.diagnostics.json"

    def validity_product(self, name: str) -> Path:
        return self.validity_dir / name

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    # ------------------------------------------------------------------ training-split indexes
    INDEXED = ("shards", "latents", "summaries", "native")

    def indexed_file(self, family: str, patient: str) -> Path:
        """One patient's file of an indexed family (what a training rule reads of every patient)."""
        paths = {"shards": self.shard, "latents": self.latents,
                 "summaries": lambda p: self.preprocessed(p) / "summary.json", "native": self.native_baseline_ct}
        if family not in paths:
            raise ValueError(f"unknown index family {family!r}; choose one of {', '.join(self.INDEXED)}")
        return paths[family](patient)

    def index(self, family: str) -> Path:
        """``index/train_<family>.txt``: the training patients' files of one family, one per line. The
        training rules take this one file as input instead of thousands (rule gather_index). ``family``
        may be the wildcard ``{family}``."""
        if family not in (*self.INDEXED, "{family}"):
            raise ValueError(f"unknown index family {family!r}; choose one of {', '.join(self.INDEXED)}")
        return self.root / "index" / f"train_{family}.txt"

    # ------------------------------------------------------------------ bookkeeping
    def log(self, name: str, *keys: str) -> Path:
        """``logs/<name>.log`` or, per wildcard, ``logs/<name>/<k1>/.../<kn>.log``."""
        if not keys:
            return self.root / "logs" / f"{name}.log"
        return self.root / "logs" / name / Path(*keys[:-1]) / f"{keys[-1]}.log"

    def benchmark(self, rule: str, log: str | Path) -> Path:
        """``benchmarks/<rule>/<the job's log path below logs/>.tsv``: Snakemake's per-job time and memory
        record, keyed like the job's log so one file per job, grouped by rule for the time table."""
        relative = Path(log).relative_to(self.root / "logs")
        return self.root / "benchmarks" / rule / relative.with_suffix(".tsv")

    @property
    def benchmarks_dir(self) -> Path:
        return self.root / "benchmarks"

    @property
    def rule_times_table(self) -> Path:
        return self.root / "benchmarks" / "rule_times.tsv"

    @property
    def rule_times_rst(self) -> Path:
        return self.root / "benchmarks" / "rule_times.rst"

    @property
    def failures_dir(self) -> Path:
        return self.root / "qc" / "failures"

    @property
    def failures_table(self) -> Path:
        return self.root / "qc" / "failures.tsv"

    @property
    def failures_rst(self) -> Path:
        """The failure table as reStructuredText, included by the HTML report (``report/workflow.rst``)."""
        return self.root / "qc" / "failures.rst"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow" / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        """Artifact root of the default SQLite store (MLflow's own default, ``./mlruns``, would land
        outside ``results_dir``)."""
        return self.root / "mlflow" / "artifacts"

    @property
    def registry_cache(self) -> Path:
        """Registered models downloaded for ``--models models:/NAME@ALIAS`` (one folder per version)."""
        return self.root / "registry"

    def release_dir(self, variant: str) -> Path:
        """One variant's release: the registered bundle, its model card and ``registered.json``."""
        return self.root / "release" / variant


def raw_dir(cfg: dict[str, Any]) -> Path:
    """Where ``hemexp synth`` writes the synthetic cohort (raw DICOM/NIfTI + manifest)."""
    return Layout.of(cfg).raw


def synthetic_manifest_path(cfg: dict[str, Any]) -> Path:
    return Layout.of(cfg).synthetic_manifest


def manifest_path(cfg: dict[str, Any]) -> Path:
    """The manifest every stage reads: the user's, or the one ``hemexp synth`` writes."""
    if cfg["cohort"]["source"] == "synthetic":
        return synthetic_manifest_path(cfg)
    return Path(cfg["cohort"]["manifest"])
