"""The MLflow model registry as a source of trained models: ``--models models:/NAME@ALIAS``.

A released HemExp model (``hemexp register-model``, :mod:`hemexp.release`) is one MLflow model whose
artifact ``bundle/`` holds a model folder laid out like ``results/models`` (VAE, diffusion variant,
latent statistics, classifier, OOD envelope, template) plus the resolved config it was trained with
and its model card. :func:`resolve_models` turns a ``models:/`` URI into that folder, downloading a
version once into ``<results_dir>/registry/<name>/v<version>/`` (atomically: a half-finished
download is never used), so ``hemexp simulate`` runs from the registry exactly as from a results
folder. Any other value is a plain folder path, as before.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hemexp.core.layout import Layout
from hemexp.tracking.runs import tracking_uri

URI_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))$")
BUNDLE = "bundle"  # artifact folder of a released model
MODELS = "models"  # the model folder inside the bundle
COMPLETE = ".complete"  # marker of a finished download


class RegistryError(ValueError):
    """A ``models:/`` reference that does not name a registered model version."""


@dataclass(frozen=True)
class ModelRef:
    name: str
    alias: str | None
    version: str | None

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def is_registry_uri(value: str | Path | None) -> bool:
    return isinstance(value, str) and value.startswith("models:/")


def parse_uri(value: str) -> ModelRef:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> :class:`ModelRef`; anything else raises."""
    m = URI_RE.match(value.strip())
    if not m:
        raise RegistryError(f"{value!r} is not a registered-model reference: expected models:/NAME@ALIAS "
                            "or models:/NAME/VERSION")
    return ModelRef(m["name"], m["alias"], m["version"])


def model_version(cfg: dict[str, Any], ref: ModelRef) -> Any:
    """The registry's ModelVersion for ``ref`` (a clear error naming the store when it is not there)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        if ref.alias:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        return client.get_model_version(ref.name, ref.version)
    except MlflowException as err:
        known = sorted(m.name for m in client.search_registered_models())
        raise RegistryError(f"{ref}: not found in the model registry at {uri} ({err.message.splitlines()[0]}); "
                            f"registered models: {', '.join(known) or 'none'}") from None


def resolve_models(value: str | Path | None, cfg: dict[str, Any]) -> Path:
    """The model folder a ``--models`` value names: ``None`` -> ``<results_dir>/models``, a
    ``models:/`` URI -> the downloaded bundle's ``models/`` (cached per version), else the path."""
    if value is None:
        return Layout.of(cfg).models
    if not is_registry_uri(value):
        return Path(value)
    return download_bundle(cfg, parse_uri(str(value))) / MODELS


def download_bundle(cfg: dict[str, Any], ref: ModelRef) -> Path:
    """Download one registered version's ``bundle/`` (once) and return its local folder."""
    import mlflow

    mv = model_version(cfg, ref)
    dest = Layout.of(cfg).registry_cache / ref.name / f"v{mv.version}"
    if (dest / COMPLETE).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.", dir=dest.parent) as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{ref.name}/{mv.version}", dst_path=tmp))
        found = sorted(local.rglob(f"{BUNDLE}/{MODELS}"))
        if not found:
            raise RegistryError(f"{ref} (version {mv.version}) has no {BUNDLE}/{MODELS}/ artifact: not a HemExp model")
        staged = Path(tmp) / "staged"
        shutil.move(str(found[0].parent), staged)
        (staged / COMPLETE).write_text(f"{ref.name} v{mv.version}\n")
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)
    return dest


def bundle_config(models_dir: Path) -> dict[str, Any] | None:
    """The resolved config a released bundle was trained with (``bundle/config.yaml``), if any."""
    import yaml

    path = Path(models_dir).parent / "config.yaml"
    if Path(models_dir).name != MODELS or not path.is_file():
        return None
    return yaml.safe_load(path.read_text())
