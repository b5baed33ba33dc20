"""nnU-Net v2 baselines, the data side: the raw dataset export and the conversion of predictions back.

The paper compares HemExp with nnU-Net trained to predict the follow-up hematoma from the baseline
scan. nnU-Net itself (planning, training, inference) is run unchanged through its CLI in its own
environment (:mod:`hemexp.baselines.nnunet.run`); what no library does is written here by hand:

* the export of our preprocessed cohort (``results/preprocessed/{p}/``, already on the model grid) as an
  nnU-Net v2 raw dataset: channel ``_0000`` = baseline CT in HU, ``_0001`` = baseline IPH mask,
  ``_0002`` = baseline IVH mask; target = the follow-up label map (0 background, 1 IPH, 2 IVH);
  ``imagesTr``/``labelsTr`` hold the training split (one export), ``imagesTs`` the test split (held-out
  site; one export per patient, so adding a test patient never re-plans or retrains nnU-Net);
* the merge of the two follow-up masks into one label map: where IPH and IVH overlap, **IPH wins**
  (IPH is the quantity the expansion rule and the paper's primary metrics are about; an overlap is a
  delineation conflict, and counting it as IPH keeps follow-up IPH volume identical to the source mask);
* the conversion of a predicted label map back into HemExp's mask format
  (``results/baselines/nnunet_{2d,3d}/{p}/{iph,ivh}.nii.gz``, uint8 on the model grid), so the evaluation
  scores nnU-Net exactly like one deterministic HemExp sample.

nnU-Net picks a normalisation per channel from the channel *name*: ``"CT"`` gets its CT normalisation
(clip to foreground percentiles, z-score with foreground statistics), ``"noNorm"`` passes the {0, 1}
masks through. The names therefore have to be those keys; what each channel holds is recorded in the
extra ``hemexp_channels`` entry of ``dataset.json`` (nnU-Net ignores keys it does not know).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from hemexp.core.errors import PatientInputError
from hemexp.core.files import atomic_dir, atomic_path, write_json
from hemexp.core.layout import Layout
from hemexp.io.masks import read_mask
from hemexp.io.nifti import grid_mismatch, read_volume


@dataclass(frozen=True)
class NnunetBaseline:
    """One nnU-Net baseline: its name in config ``baselines``, the nnU-Net configuration it trains and
    its Table 2 row label."""

    name: str
    configuration: str
    method: str


# The one table of nnU-Net baselines: the workflow (rules/baselines.smk) trains what it lists, the
# evaluation scores it under ``method``; a new baseline is one line here.
NNUNET_BASELINES: dict[str, NnunetBaseline] = {
    b.name: b for b in (NnunetBaseline("nnunet_2d", "2d", "nnUNet-2D"), NnunetBaseline("nnunet_3d", "3d_fullres", "nnUNet-3D"))
}
# Baseline name in config ``baselines`` -> nnU-Net configuration it trains.
BASELINE_CONFIGURATIONS: dict[str, str] = {b.name: b.configuration for b in NNUNET_BASELINES.values()}
IMAGE_FILES: tuple[str, ...] = ("bl_ct", "bl_iph", "bl_ivh")  # channel order _0000, _0001, _0002
LABEL_FILES: tuple[str, ...] = ("fu_iph", "fu_ivh")
CHANNEL_NAMES: dict[str, str] = {"0": "CT", "1": "noNorm", "2": "noNorm"}
CHANNEL_MEANING: dict[str, str] = {"0": "baseline CT (HU)", "1": "baseline IPH mask", "2": "baseline IVH mask"}
LABELS: dict[str, int] = {"background": 0, "IPH": 1, "IVH": 2}
FILE_ENDING = ".nii.gz"
PLANS = "nnUNetPlans"


def dataset_name(dataset_id: int) -> str:
    """nnU-Net's folder name for our dataset, e.g. ``Dataset501_HemExp``."""
    return f"Dataset{int(dataset_id):03d}_HemExp"


@dataclass(frozen=True)
class NnunetLayout:
    """Where nnU-Net's three folders (its ``nnUNet_raw`` etc. variables) and our products live."""

    root: Path
    dataset: str

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def preprocessed(self) -> Path:
        return self.root / "preprocessed"

    @property
    def trained(self) -> Path:
        return self.root / "trained"

    @property
    def raw_dataset(self) -> Path:
        return self.raw / self.dataset

    @property
    def preprocessed_dataset(self) -> Path:
        return self.preprocessed / self.dataset

    def model_dir(self, trainer: str, configuration: str) -> Path:
        """nnU-Net's own naming of a trained model: ``<trainer>__<plans>__<configuration>``."""
        return self.trained / self.dataset / f"{trainer}__{PLANS}__{configuration}"

    def fold_dir(self, trainer: str, configuration: str, fold: int | str) -> Path:
        return self.model_dir(trainer, configuration) / f"fold_{fold}"

    def prediction(self, configuration: str, patient_id: str) -> Path:
        return self.root / "predictions" / configuration / f"{patient_id}{FILE_ENDING}"


def layout(cfg: dict[str, Any]) -> NnunetLayout:
    return NnunetLayout(Layout.of(cfg).nnunet_dir, dataset_name(cfg["nnunet"]["dataset_id"]))


def _listed(cfg: Mapping[str, Any]) -> list[NnunetBaseline]:
    """The nnU-Net baselines listed in config ``baselines``, in config order ("copy" needs no model)."""
    return [NNUNET_BASELINES[b] for b in cfg["baselines"] if b in NNUNET_BASELINES]


def active_baselines(cfg: Mapping[str, Any]) -> dict[str, str]:
    """The nnU-Net baselines listed in config ``baselines``, mapped to their nnU-Net configuration."""
    return {b.name: b.configuration for b in _listed(cfg)}


def baseline_methods(cfg: Mapping[str, Any]) -> dict[str, str]:
    """The nnU-Net baselines listed in config ``baselines``, mapped to their Table 2 row label."""
    return {b.name: b.method for b in _listed(cfg)}


def dataset_json(n_training: int) -> dict[str, Any]:
    """nnU-Net v2's ``dataset.json`` for our three-channel input and IPH/IVH target."""
    return {
        "name": "HemExp",
        "description": "Follow-up IPH/IVH from baseline CT + baseline IPH/IVH masks on the HemExp model grid; "
        "follow-up overlap of IPH and IVH is labelled IPH",
        "channel_names": dict(CHANNEL_NAMES),
        "hemexp_channels": dict(CHANNEL_MEANING),
        "labels": dict(LABELS),
        "numTraining": int(n_training),
        "file_ending": FILE_ENDING,
    }


def follow_up_label(iph: np.ndarray, ivh: np.ndarray) -> np.ndarray:
    """Merge the binary follow-up masks into nnU-Net's label map; IPH wins where both are set."""
    label = np.zeros(iph.shape, dtype=np.uint8)
    label[ivh > 0] = LABELS["IVH"]
    label[iph > 0] = LABELS["IPH"]
    return label


def _load_checked(patient_id: str, folder: Path, names: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read a case's files (name -> (array, affine)) and check they share one grid and that masks are binary.

    nnU-Net would fail on a mismatched case much later (or, worse, silently resample it), so the
    problem is raised here, naming patient and file. Masks go through the one mask reader
    (:func:`hemexp.io.masks.read_mask`, {0,1} only: the files are byte-copied into nnU-Net's input).
    """
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in names:
        path = folder / f"{name}{FILE_ENDING}"
        if not path.is_file():
            raise PatientInputError(patient_id, path, "missing preprocessed file")
        arrays[name] = read_volume(path, patient_id, name) if name == "bl_ct" else read_mask(path, patient_id, name)
    ref_name = names[0]
    ref_shape, ref_affine = arrays[ref_name][0].shape, arrays[ref_name][1]
    for name, (data, affine) in arrays.items():
        problem = grid_mismatch(data.shape, affine, ref_shape, ref_affine, what=name, ref_what=ref_name)
        if problem:
            raise PatientInputError(patient_id, folder / f"{name}{FILE_ENDING}", problem)
    return arrays


def _channel_files(patient_id: str, src: Path, images_dir: Path) -> None:
    """Byte copies of the three input files as ``<p>_0000``..``_0002``: geometry equal to the source."""
    for channel, name in enumerate(IMAGE_FILES):
        with atomic_path(images_dir / f"{patient_id}_{channel:04d}{FILE_ENDING}") as tmp:
            shutil.copyfile(src / f"{name}{FILE_ENDING}", tmp)


def export_training_case(patient_id: str, src: Path, images_dir: Path, labels_dir: Path) -> None:
    """One training case: its three channel files and the follow-up label map (IPH wins overlaps)."""
    arrays = _load_checked(patient_id, src, IMAGE_FILES + LABEL_FILES)
    _channel_files(patient_id, src, images_dir)
    iph, ivh = (arrays[n][0] for n in LABEL_FILES)
    ref = nib.load(src / f"fu_iph{FILE_ENDING}")  # header only (nibabel reads voxels lazily)
    label = nib.Nifti1Image(follow_up_label(iph, ivh), ref.affine, ref.header)
    label.set_data_dtype(np.uint8)
    label.header.set_slope_inter(1, 0)
    nib.save(label, labels_dir / f"{patient_id}{FILE_ENDING}")


def heldout_image_paths(cfg: dict[str, Any], patient_id: str) -> list[Path]:
    """A test case's channel files in ``imagesTs`` (what nnU-Net predicts from)."""
    folder = layout(cfg).raw_dataset / "imagesTs"
    return [folder / f"{patient_id}_{c:04d}{FILE_ENDING}" for c in range(len(IMAGE_FILES))]


def export_heldout_case(cfg: dict[str, Any], patient_id: str) -> list[Path]:
    """One test case into ``imagesTs``, on its own: adding a test patient touches no training product."""
    src = Layout.of(cfg).preprocessed(patient_id)
    _load_checked(patient_id, src, IMAGE_FILES)
    out = heldout_image_paths(cfg, patient_id)
    _channel_files(patient_id, src, out[0].parent)
    return out


def export_training(cfg: dict[str, Any], train_ids: list[str]) -> list[PatientInputError]:
    """The training split as ``imagesTr``/``labelsTr`` + ``dataset.json`` of ``Dataset<id>_HemExp``.

    Both folders are built in temp dirs and swapped in, then ``dataset.json`` is written (last, so its
    presence marks a complete export). Every patient is checked; the bad ones are returned together
    (not raised one at a time) so the caller can record all of them; then nothing is swapped in.
    """
    if not train_ids:
        raise ValueError("nnU-Net export: the cohort has no training patients")
    lay = layout(cfg)
    (lay.raw_dataset / "dataset.json").unlink(missing_ok=True)
    errors: list[PatientInputError] = []
    try:
        with atomic_dir(lay.raw_dataset / "imagesTr") as images, atomic_dir(lay.raw_dataset / "labelsTr") as labels:
            for pid in sorted(train_ids):
                try:
                    export_training_case(pid, Layout.of(cfg).preprocessed(pid), images, labels)
                except PatientInputError as err:
                    errors.append(err)
            if errors:
                raise _ExportAborted
    except _ExportAborted:
        return errors  # atomic_dir has discarded the half-built folders
    write_json(lay.raw_dataset / "dataset.json", dataset_json(len(train_ids)))
    return errors


class _ExportAborted(Exception):
    """Raised inside :func:`export_training` so ``atomic_dir`` discards folders with bad patients."""


def prediction_to_masks(patient_id: str, prediction: Path, reference: Path, out_dir: Path) -> dict[str, float]:
    """Split a predicted label map into ``iph.nii.gz`` / ``ivh.nii.gz`` (uint8) on the reference grid.

    The reference is the patient's preprocessed baseline CT: nnU-Net exports predictions in the
    geometry of its input, which was that file, so a grid mismatch means a stale or foreign prediction.
    Returns the voxel counts (for the log).
    """
    for path in (prediction, reference):
        if not path.is_file():
            raise PatientInputError(patient_id, path, "file not found")
    pred, ref = nib.load(prediction), nib.load(reference)
    problem = grid_mismatch(pred.shape, pred.affine, ref.shape, ref.affine, what="prediction", ref_what="the model")
    if problem:
        raise PatientInputError(patient_id, prediction, problem)
    label = np.asanyarray(pred.dataobj)
    values = set(np.unique(label).tolist())
    if not values <= set(LABELS.values()):
        raise PatientInputError(patient_id, prediction, f"unexpected label values {sorted(values)}")
    counts = {}
    for name, value in (("iph", LABELS["IPH"]), ("ivh", LABELS["IVH"])):
        mask = nib.Nifti1Image((label == value).astype(np.uint8), ref.affine, ref.header)
        mask.set_data_dtype(np.uint8)
        mask.header.set_slope_inter(1, 0)
        with atomic_path(out_dir / f"{name}{FILE_ENDING}") as tmp:
            nib.save(mask, tmp)
        counts[name] = float(np.count_nonzero(label == value))
    return counts
