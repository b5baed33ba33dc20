"""MLflow conventions: where runs go, how they are tagged, how evaluation finds a model's run.

One MLflow run per trained model; evaluation metrics are logged into the run of the model they
evaluate, so runs compare side by side in the UI and in ``hemexp compare``. The store defaults to a
SQLite file under the results folder (no server needed on a laptop); ``MLFLOW_TRACKING_URI`` or
``tracking.uri`` points it at a team server.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hemexp.core.config import REPO_ROOT, config_hash
from hemexp.core.deid import scrub_values
from hemexp.core.layout import Layout, manifest_path

RUN_ID_FILE = "mlflow_run_id.txt"


def tracking_uri(cfg: dict[str, Any]) -> str:
    """``MLFLOW_TRACKING_URI`` > ``tracking.uri`` > sqlite store under ``results_dir``."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if cfg["tracking"].get("uri"):
        return cfg["tracking"]["uri"]
    db = Layout.of(cfg).mlflow_db.resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{db}"
    _initialise_sqlite(uri, db)
    return uri


_READY: set[str] = set()


def _initialise_sqlite(uri: str, db: Path) -> None:
    """Create the SQLite store's tables once, under a file lock. Two jobs opening a fresh store at once
    both run MLflow's schema creation and the loser fails ("table ... already exists"), or its
    experiment falls back to ``./mlruns``; the lock makes the first job create it and the rest wait."""
    import fcntl

    if uri in _READY:
        return
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            from mlflow import MlflowClient

            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _READY.add(uri)


def git_commit() -> str:
    """Commit of the code that produced a run, ``+dirty`` when tracked files differ from it
    ('unknown' outside a git checkout): a run from uncommitted code must not pass for that commit."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = head.stdout.strip() if head.returncode == 0 else ""
    if not commit:
        return "unknown"
    return commit + ("+dirty" if status.returncode == 0 and status.stdout.strip() else "")


def dvc_hash(dvc_file: Path) -> str | None:
    """The content hash DVC recorded for the first output of a ``.dvc`` file (``<md5>.dir`` for a folder)."""
    import yaml

    try:
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
    except (OSError, yaml.YAMLError):
        return None
    for out in outs:
        value = out.get("md5") or out.get("etag") or out.get("checksum")
        if value:
            return str(value)
    return None


def data_version(cfg: dict[str, Any]) -> str:
    """Version of the input data: ``dvc:<hash>`` of the raw folder when it is tracked with ``dvc add``
    (``<raw>.dvc`` beside it, the manifest's folder), else ``manifest:<sha256[:12]>`` of the manifest
    (which names every input file), else 'unknown' (the synthetic cohort before ``hemexp synth``)."""

    manifest = manifest_path(cfg)
    raw = manifest.resolve().parent
    for dvc_file in (raw.with_name(raw.name + ".dvc"), manifest.with_name(manifest.name + ".dvc")):
        if dvc_file.exists() and (value := dvc_hash(dvc_file)):
            return "dvc:" + value
    if manifest.exists():
        return "manifest:" + hashlib.sha256(manifest.read_bytes()).hexdigest()[:12]
    return "unknown"


def run_tags(cfg: dict[str, Any], stage: str, variant: str | None = None) -> dict[str, str]:
    """The tags that make runs comparable (``hemexp compare``, MLflow filters like ``tags.stage='vae'``)."""
    return {
        "stage": stage,
        "variant": variant or "",
        "config_hash": config_hash(cfg),
        "git_commit": git_commit(),
        "data_version": data_version(cfg),
    }


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``a.b.c`` params (MLflow params are flat strings)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def default_artifact_location(cfg: dict[str, Any]) -> str | None:
    """Where a new experiment of the default SQLite store keeps its artifacts: under ``results_dir``
    (MLflow would use ``./mlruns`` in the working directory); None for a configured store, whose
    server or URI decides."""
    default = f"sqlite:///{Layout.of(cfg).mlflow_db.resolve()}"
    if tracking_uri(cfg) != default:  # (mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI)
        return None
    return Layout.of(cfg).mlflow_artifacts.resolve().as_uri()


def use_experiment(name: str, artifact_location: str | None = None) -> str:
    """Make experiment ``name`` the active one (created when missing, with ``artifact_location``) and
    return its id.

    ``mlflow.set_experiment(name)`` alone is not safe when several jobs create the experiment at once
    (SLURM jobs starting together): the process that loses the creation race gets the experiment back
    without it being made active, so its run lands silently in the ``Default`` experiment (seen with
    MLflow 3.17 in tests/test_tracking_concurrency.py). Setting it again by id activates it in every case.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    for _ in range(3):
        if artifact_location is None or mlflow.get_experiment_by_name(name) is not None:
            break
        try:
            mlflow.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # another job created it first (checked again above)
            time.sleep(0.2)
    experiment_id = mlflow.set_experiment(name).experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


@contextlib.contextmanager
def start_run(cfg: dict[str, Any], stage: str, run_dir: str | Path, variant: str | None = None,
              params: dict[str, Any] | None = None) -> Iterator[Any]:
    """Open (or, after a resume, reopen) the MLflow run of one model and record its id in ``run_dir``.

    ``params`` (default: the whole resolved config) are logged flat, absolute paths made shareable
    (:func:`hemexp.core.deid.scrub_values`); tags follow :func:`run_tags`.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    use_experiment(cfg["tracking"]["experiment"], default_artifact_location(cfg))
    id_file = Path(run_dir) / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else None
    name = f"{stage}-{variant}" if variant else stage
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else name) as run:
        if run_id is None:
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run.info.run_id)
            # absolute paths (results_dir, the manifest, templates) as docs/deidentification.md allows
            flat = scrub_values(flatten(params if params is not None else cfg).items(),
                                manifest_path(cfg).parent, cfg["results_dir"])
            for i in range(0, len(flat), 90):  # MLflow limits params per batch
                mlflow.log_params(dict(list(flat.items())[i : i + 90]))
        mlflow.set_tags(run_tags(cfg, stage, variant))
        yield run


def log_to_model_run(cfg: dict[str, Any], run_dir: str | Path, metrics: dict[str, float],
                     artifacts: list[str | Path] = (), artifact_path: str | None = None) -> None:
    """Log evaluation metrics/artifacts into the run of the model trained in ``run_dir``."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    run_id = (Path(run_dir) / RUN_ID_FILE).read_text().strip()
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        for path in artifacts:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)
