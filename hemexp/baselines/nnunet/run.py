"""nnU-Net v2 baselines, the driving side: nnU-Net's own environment and its command line.

nnunetv2 pulls timm -> torchvision, whose only Linux build on PyPI is a CUDA build; next to HemExp's
CPU torch it breaks ``import monai.losses`` and ``import lightning``. nnU-Net therefore never enters
HemExp's environment: it lives in ``.venv-nnunet`` (created here on first use, from the pip list of
``envs/nnunet.yaml``) or, on clusters, in the conda env Snakemake builds from that file, and is called
only through its CLI (``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train``, ``nnUNetv2_predict``) as
subprocesses with ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` under
``<results>/nnunet/``.

nnU-Net writes into its folders in place; every stage here runs it against a staging folder beside the
final one and swaps the finished product in, so a killed job never leaves a half-written product.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from hemexp.baselines.nnunet.dataset import FILE_ENDING, PLANS, heldout_image_paths, layout
from hemexp.core.config import REPO_ROOT
from hemexp.core.files import atomic_path
from hemexp.core.runtime import get_logger

log = get_logger(__name__)

ENV_FILE = REPO_ROOT / "envs" / "nnunet.yaml"
CONSTRAINTS = REPO_ROOT / "constraints.txt"
TRAINER_PLUGIN = REPO_ROOT / "envs" / "nnunet_trainers" / "hemexp_trainers.py"
STAMP = ".installed"
PLANNED_CONFIGURATIONS = ("2d", "3d_fullres")  # both always: adding nnunet_3d later keeps the 2d model
MODEL_FILES = ("dataset.json", "plans.json", "dataset_fingerprint.json")  # what predict needs beside folds


def set_hemexp_python() -> str:
    """Export ``HEMEXP_PYTHON`` = this interpreter, for rules whose jobs run in nnU-Net's environment.

    Called by ``rules/baselines.smk`` at parse time: the interpreter parsing the workflow has hemexp
    installed, and every job process (local or on a cluster node) re-parses the workflow, so the
    variable is always set where the job's shell runs ``"$HEMEXP_PYTHON" -m hemexp.cli ...``.
    """
    os.environ["HEMEXP_PYTHON"] = sys.executable
    return sys.executable


class NnunetEnvError(RuntimeError):
    """nnU-Net's environment is missing and cannot be built (e.g. offline), or one of its tools failed."""


def pip_requirements(env_file: Path = ENV_FILE) -> list[str]:
    """The pip pins of ``envs/nnunet.yaml``: one list serves the conda env and the venv."""
    spec = yaml.safe_load(env_file.read_text())
    for dep in spec.get("dependencies", []):
        if isinstance(dep, dict) and "pip" in dep:
            return [str(r) for r in dep["pip"]]
    raise NnunetEnvError(f"{env_file}: no pip section")


def venv_path(cfg: dict[str, Any]) -> Path:
    """``nnunet.venv``; a relative path is relative to the repository (beside HemExp's own .venv)."""
    path = Path(cfg["nnunet"]["venv"])
    return path if path.is_absolute() else REPO_ROOT / path


def _run(cmd: Sequence[str | Path], env: dict[str, str] | None = None, what: str = "") -> None:
    log.info("running %s", " ".join(map(str, cmd)))
    result = subprocess.run([str(c) for c in cmd], env=env, check=False)
    if result.returncode != 0:
        raise NnunetEnvError(f"{what or Path(str(cmd[0])).name} failed with exit code {result.returncode}")


def create_venv(venv: Path, python: str = "python3.11", env_file: Path = ENV_FILE,
                constraints: Path = CONSTRAINTS) -> Path:
    """Create (or complete) the nnU-Net venv; return its ``bin`` folder.

    torch is installed first and alone so pip takes the local CPU wheel, then the rest under
    ``constraints.txt`` (which holds torch there). The stamp file, written last, records the pins: a
    killed install or changed pins make the next call install again.
    """
    requirements = pip_requirements(env_file)
    stamp = venv / STAMP
    if stamp.is_file() and stamp.read_text().split() == requirements:
        return venv / "bin"
    venv.mkdir(parents=True, exist_ok=True)  # `python -m venv` fills an existing folder
    # Two jobs building the venv at once would corrupt it (in the workflow the plan job builds it
    # before any other nnU-Net job runs, but `make nnunet-env` may run beside it): one at a time.
    with open(venv / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text().split() == requirements:
            return venv / "bin"
        return _install_venv(venv, python, requirements, constraints)


def _install_venv(venv: Path, python: str, requirements: list[str], constraints: Path) -> Path:
    interpreter = shutil.which(python)
    if interpreter is None:
        raise NnunetEnvError(f"{python} not found on PATH: cannot create {venv}")
    if not (venv / "bin" / "python").exists():
        _run([interpreter, "-m", "venv", venv], what="python -m venv")
    pip = [venv / "bin" / "python", "-m", "pip", "install", "--quiet"]
    torch_pins = [r for r in requirements if r.startswith("torch==")]
    rest = [r for r in requirements if r not in torch_pins]
    _run([*pip, *torch_pins], what="pip install torch (nnU-Net venv)")
    _run([*pip, "-c", constraints, *rest], what="pip install nnunetv2 (nnU-Net venv)")
    install_trainer_plugin(venv / "bin")
    (venv / STAMP).write_text("\n".join(requirements) + "\n")
    return venv / "bin"


def install_trainer_plugin(bin_dir: Path, plugin: Path = TRAINER_PLUGIN) -> Path:
    """Copy HemExp's trainer module into nnU-Net's trainer folder (refreshed when it changed).

    nnU-Net finds trainers only inside ``nnunetv2/training/nnUNetTrainer`` (its documented place for
    custom trainers) or, after searching there, in ``nnUNet_extTrainer``; the search there already
    fails for every variant trainer when torchvision is broken, see the plugin's docstring.
    """
    probe = subprocess.run(
        [str(bin_dir / "python"), "-c", "import os, nnunetv2; print(os.path.dirname(nnunetv2.__file__))"],
        capture_output=True, text=True, check=False,
    )
    if probe.returncode != 0:
        raise NnunetEnvError(f"nnunetv2 is not importable with {bin_dir / 'python'}: {probe.stderr.strip()[-500:]}")
    target = Path(probe.stdout.strip()) / "training" / "nnUNetTrainer" / plugin.name
    if not target.is_file() or target.read_bytes() != plugin.read_bytes():
        with atomic_path(target) as tmp:
            shutil.copyfile(plugin, tmp)
        log.info("installed %s into %s", plugin.name, target.parent)
    return target


def nnunet_bin(cfg: dict[str, Any]) -> Path:
    """Folder holding nnU-Net's CLI: an activated environment that has it on PATH (Snakemake's conda
    deployment), else ``nnunet.venv``, built on first use. Either way HemExp's trainer module is
    (re)installed into it."""
    on_path = shutil.which("nnUNetv2_train")
    bin_dir = Path(on_path).parent if on_path else create_venv(venv_path(cfg))
    install_trainer_plugin(bin_dir)
    return bin_dir


def resolve_device(setting: str, bin_dir: Path) -> str:
    """``nnunet.device``: ``auto`` asks nnU-Net's own torch whether it sees a GPU."""
    if setting != "auto":
        return setting
    probe = subprocess.run([str(bin_dir / "python"), "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, check=False)
    return "cuda" if probe.stdout.strip() == "True" else "cpu"


def nnunet_environ(cfg: dict[str, Any], bin_dir: Path, *, preprocessed: Path | None = None,
                   results: Path | None = None, training: bool = False) -> dict[str, str]:
    """Environment for one nnU-Net call: its three folders, its worker counts, nothing of HemExp's venv."""
    lay = layout(cfg)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["nnUNet_raw"] = str(lay.raw.resolve())
    env["nnUNet_preprocessed"] = str((preprocessed or lay.preprocessed).resolve())
    env["nnUNet_results"] = str((results or lay.trained).resolve())
    # nnU-Net's default pool size (8) for integrity checks, validation export etc.; on a small machine
    # spawning 8 workers that each import torch costs minutes.
    env["nnUNet_def_n_proc"] = str(cfg["nnunet"]["num_processes"])
    if training:  # not while planning: nnU-Net 2.8.1's planner calls torch.set_num_threads(n_proc_DA), 0 fails
        env["nnUNet_n_proc_DA"] = str(cfg["nnunet"]["n_proc_da"])
    return env


@contextlib.contextmanager
def staging(parent: Path, tag: str) -> Iterator[Path]:
    """A temporary folder inside ``parent`` (same file system, so products move in by rename)."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{tag}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_in(produced: Path, final: Path) -> None:
    """Replace ``final`` by the finished ``produced`` folder (rename; no half state is left behind)."""
    if not produced.exists():
        raise NnunetEnvError(f"nnU-Net did not produce {produced}")
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final)
    produced.replace(final)


def plan(cfg: dict[str, Any], train_ids: Sequence[str]) -> Path:
    """``nnUNetv2_plan_and_preprocess`` for 2d and 3d_fullres, then the cross-validation split.

    The split is written here with nnU-Net's own function (same seed and keys as it would use), not
    left to the first training job: parallel fold jobs would otherwise race to write it.
    """
    lay, bin_dir = layout(cfg), nnunet_bin(cfg)
    n_proc = str(cfg["nnunet"]["num_processes"])
    with staging(lay.preprocessed, "plan") as tmp:
        env = nnunet_environ(cfg, bin_dir, preprocessed=tmp)
        _run([bin_dir / "nnUNetv2_plan_and_preprocess", "-d", str(cfg["nnunet"]["dataset_id"]),
              "-c", *PLANNED_CONFIGURATIONS, "-np", *[n_proc] * len(PLANNED_CONFIGURATIONS),
              "-npfp", n_proc, "--verify_dataset_integrity"], env=env)
        if len(train_ids) >= 5:  # nnU-Net's 5-fold split; with fewer cases only fold "all" can train
            write_crossval_split(bin_dir, sorted(train_ids), tmp / lay.dataset / "splits_final.json")
        swap_in(tmp / lay.dataset, lay.preprocessed_dataset)
    return lay.preprocessed_dataset


def write_crossval_split(bin_dir: Path, train_ids: list[str], out: Path) -> None:
    """nnU-Net's seeded 5-fold split (``generate_crossval_split``), computed in nnU-Net's environment."""
    code = ("import json, sys; from nnunetv2.utilities.crossval_split import generate_crossval_split as g; "
            "ids = json.load(sys.stdin); json.dump(g(ids, seed=12345, n_splits=5), open(sys.argv[1], 'w'), indent=2)")
    result = subprocess.run([str(bin_dir / "python"), "-c", code, str(out)], input=json.dumps(train_ids),
                            text=True, capture_output=True, check=False)
    if result.returncode != 0:
        raise NnunetEnvError(f"writing the cross-validation split failed: {result.stderr.strip()[-500:]}")


def train(cfg: dict[str, Any], configuration: str, fold: int | str) -> Path:
    """``nnUNetv2_train`` one fold into a staging ``nnUNet_results``, then move the fold into place."""
    lay, bin_dir = layout(cfg), nnunet_bin(cfg)
    trainer = cfg["nnunet"]["trainer"]
    device = resolve_device(cfg["nnunet"]["device"], bin_dir)
    with staging(lay.trained, f"train-{configuration}-{fold}") as tmp:
        env = nnunet_environ(cfg, bin_dir, results=tmp, training=True)
        _run([bin_dir / "nnUNetv2_train", str(cfg["nnunet"]["dataset_id"]), configuration, str(fold),
              "-tr", trainer, "-p", PLANS, "-device", device], env=env)
        produced_model = tmp / lay.model_dir(trainer, configuration).relative_to(lay.trained)
        if not (produced_model / f"fold_{fold}" / "checkpoint_final.pth").is_file():
            raise NnunetEnvError(f"nnUNetv2_train finished without {produced_model}/fold_{fold}/checkpoint_final.pth")
        final_model = lay.model_dir(trainer, configuration)
        for name in MODEL_FILES:  # identical for every fold; copied atomically so concurrent folds are safe
            with atomic_path(final_model / name) as dst:
                shutil.copyfile(produced_model / name, dst)
        swap_in(produced_model / f"fold_{fold}", lay.fold_dir(trainer, configuration, fold))
    return lay.fold_dir(trainer, configuration, fold)


def predict(cfg: dict[str, Any], configuration: str, patient_id: str) -> Path:
    """``nnUNetv2_predict`` one test patient with the configured folds (several folds = their ensemble).

    One patient per call, like HemExp's sampling, so adding a test patient adds only its own jobs;
    nnU-Net's CLI takes a folder, so the patient's ``imagesTs`` files are linked into a staging one.
    Returns ``<results>/nnunet/predictions/<configuration>/<p>.nii.gz``.
    """
    lay, bin_dir = layout(cfg), nnunet_bin(cfg)
    nn = cfg["nnunet"]
    device = resolve_device(nn["device"], bin_dir)
    final = lay.prediction(configuration, patient_id)
    with staging(final.parent, f"predict-{patient_id}") as tmp:
        (tmp / "in").mkdir()
        for image in heldout_image_paths(cfg, patient_id):
            if not image.is_file():
                raise NnunetEnvError(f"missing exported test image {image}")
            (tmp / "in" / image.name).symlink_to(image.resolve())
        cmd = [bin_dir / "nnUNetv2_predict", "-i", tmp / "in", "-o", tmp / "out",
               "-d", str(nn["dataset_id"]), "-c", configuration, "-tr", nn["trainer"], "-p", PLANS,
               "-f", *[str(f) for f in nn["folds"]], "-device", device,
               "-npp", "1", "-nps", "1", "--disable_progress_bar"]
        if not nn["tta"]:
            cmd.append("--disable_tta")
        _run(cmd, env=nnunet_environ(cfg, bin_dir))
        produced = tmp / "out" / f"{patient_id}{FILE_ENDING}"
        if not produced.is_file():
            raise NnunetEnvError(f"nnUNetv2_predict wrote no prediction for {patient_id}")
        produced.replace(final)
    return final
