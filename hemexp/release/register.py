"""Register one variant as an MLflow model, and move aliases between its versions.

``register_variant`` assembles the bundle (:mod:`hemexp.release.bundle`), writes the model card,
logs both as one pyfunc model (:mod:`hemexp.release.pyfunc`) into the variant's training run (so the
registry links to the run's parameters and evaluation metrics), registers it as
``tracking.model_name`` (default ``hemexp-{variant}``), tags the version with its provenance and
points ``@candidate`` at it. ``@champion`` is never set automatically: :func:`promote` does it, on a
person's decision after reading the card and the study.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from hemexp.core.config import REPO_ROOT
from hemexp.core.files import atomic_dir, read_json, write_json
from hemexp.core.layout import Layout
from hemexp.io.dicom_seg import hemexp_version
from hemexp.release.bundle import assemble_bundle, file_hashes
from hemexp.release.card import write_card
from hemexp.tracking.registry import BUNDLE, ModelRef, model_version
from hemexp.tracking.runs import RUN_ID_FILE, data_version, git_commit, tracking_uri, use_experiment

CANDIDATE, CHAMPION = "candidate", "champion"
RUNTIME_EXCLUDE = {"snakemake", "snakemake-executor-plugin-slurm", "dvc", "pytest", "ruff", "snakefmt", "black"}
ARTIFACT_NAME = "hemexp_model"


def model_name(cfg: dict[str, Any], variant: str) -> str:
    return str(cfg["tracking"]["model_name"]).format(variant=variant)


def runtime_requirements(path: Path = REPO_ROOT / "requirements.txt") -> list[str]:
    """The pinned packages a served model needs (workflow and development tools left out)."""
    reqs = ["torch==2.13.0"]
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and re.split(r"[=<>~!]", line)[0].strip().lower() not in RUNTIME_EXCLUDE:
                reqs.append(line)
    return reqs


def _client(cfg: dict[str, Any]) -> Any:
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def register_variant(cfg: dict[str, Any], variant: str) -> dict[str, Any]:
    """Register ``variant``; returns ``registered.json`` (name, version, URI, aliases, provenance)."""
    import mlflow

    from hemexp.release import served_model
    from hemexp.release.pyfunc import signature
    from hemexp.tracking.runs import default_artifact_location

    layout = Layout.of(cfg)
    client = _client(cfg)
    name = model_name(cfg, variant)
    provenance = {"git_commit": git_commit(), "data_version": data_version(cfg), "hemexp_version": hemexp_version(),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    run_id = _training_run(client, layout.diffusion_dir(variant) / RUN_ID_FILE)
    envelope = read_json(layout.ood_envelope)
    release = layout.release_dir(variant)
    with atomic_dir(release) as tmp:
        bundle = tmp / BUNDLE
        info = assemble_bundle(cfg, variant, bundle, provenance)
        (bundle / "variant.txt").write_text(variant + "\n")
        meta = {"name": name, "version": "(assigned at registration)", "aliases": [CANDIDATE], "run_id": run_id,
                "config_hash": info["config_hash"], **provenance}
        write_card(cfg, variant, meta, envelope, bundle)
        write_json(bundle / "bundle.json", {**info, "files": file_hashes(bundle)})
        use_experiment(cfg["tracking"]["experiment"], default_artifact_location(cfg))
        with mlflow.start_run(run_id=run_id, run_name=None if run_id else f"release-{variant}") as run:
            logged = mlflow.pyfunc.log_model(
                name=ARTIFACT_NAME, python_model=served_model.__file__, artifacts={BUNDLE: str(bundle)},
                signature=signature(), pip_requirements=runtime_requirements(), registered_model_name=name,
                code_paths=[str(Path(__file__).resolve().parents[1])])
            run_id = run.info.run_id
        version = str(logged.registered_model_version)
        tags = {"variant": variant, "config_hash": info["config_hash"], **provenance}
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, str(value))
        client.set_registered_model_alias(name, CANDIDATE, version)
        meta.update(version=version, run_id=run_id)
        card = write_card(cfg, variant, meta, envelope, tmp)  # the card with its version, beside the bundle
        client.update_model_version(name, version, description=card.read_text())
        record = {"name": name, "version": version, "uri": f"models:/{name}/{version}", "aliases": [CANDIDATE],
                  "run_id": run_id, "model_card": "model_card.md", "tags": tags}
        write_json(tmp / "registered.json", record)
    return record


def _training_run(client: Any, run_file: Path) -> str | None:
    """The variant's training run, when its recorded id exists in this store (a model trained against
    another store, or a reset one, gets a release run of its own)."""
    from mlflow.exceptions import MlflowException

    if not run_file.is_file():
        return None
    run_id = run_file.read_text().strip()
    try:
        client.get_run(run_id)
    except MlflowException:
        return None
    return run_id


def promote(cfg: dict[str, Any], name: str, version: str | None, from_alias: str, alias: str) -> dict[str, Any]:
    """Point ``@alias`` (default champion) at a version (given, or the one ``@from_alias`` names) and
    return what was decided: the version, its tags and the evaluation metrics of its run."""
    client = _client(cfg)
    mv = model_version(cfg, ModelRef(name, None if version else from_alias, version))
    client.set_registered_model_alias(name, alias, mv.version)
    client.set_model_version_tag(name, mv.version, f"{alias}_since", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    metrics = {}
    if mv.run_id:
        run = client.get_run(mv.run_id)
        metrics = {k: v for k, v in sorted(run.data.metrics.items()) if k.startswith("eval")}
    return {"name": name, "version": mv.version, "alias": alias, "tags": dict(mv.tags), "metrics": metrics}
