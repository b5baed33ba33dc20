"""DICOM outputs of a sample set: a de-identified baseline CT series and DICOM SEGs that reference it.

Why a CT series of our own: a DICOM SEG is only useful beside the images it segments (viewers such as
3D Slicer or OHIF place it through the referenced SOP Instance UIDs and the shared Frame of
Reference). The project's no-PHI policy (``docs/deidentification.md``) never carries the original
UIDs, names or dates into a product, so the SEGs cannot point at the hospital's series; instead the
native baseline NIfTI (the ingested, tilt-corrected grid that :func:`hemexp.preprocess.register.to_native`
maps to) is written as a fresh CT Image Storage series with *new* UIDs and the manifest patient ID as
the only identifier, and the SEGs reference that series.

Written into one folder (atomically, :func:`hemexp.core.files.atomic_dir`)::

    ct/CT{k:04d}.dcm          baseline CT, one file per slice (int16 HU, slope 1, intercept 0)
    seg_median.dcm            BINARY SEG: the median sample's IPH and IVH masks (segments 1, 2)
    seg_probability.dcm       FRACTIONAL (PROBABILITY) SEG: one segment per probability map kind
    dicom.json                sidecar: volumes, intervals, P(HE), P(IVH), model, config hash, UIDs

Geometry: NIfTI affines are RAS, DICOM is LPS, so x and y are negated. Pixel ``(row r, column c)`` of
slice ``k`` is voxel ``(I-1-c, J-1-r, k)``: for a canonical RAS volume rows then run towards the
patient's left and columns towards posterior, the radiological display viewers expect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from hemexp.core.files import atomic_dir, write_json
from hemexp.core.layout import DICOM_CT_DIR as CT_DIR
from hemexp.core.layout import DICOM_SEG_BINARY as SEG_BINARY
from hemexp.core.layout import DICOM_SEG_FRACTIONAL as SEG_FRACTIONAL
from hemexp.core.layout import DICOM_SIDECAR as SIDECAR

DICOM_OUTPUT_SETTINGS = ("auto", True, False)
MANUFACTURER = "HemExp"
MAX_FRACTIONAL_VALUE = 255
DUMMY_DATE, DUMMY_TIME = "19000101", "000000"  # Annex E "D": a type 1 date replaced by a dummy value
LPS = np.diag([-1.0, -1.0, 1.0])  # RAS -> LPS (and back: its own inverse)

# Segment descriptions (CID 7150 category, CID 7151 type; SNOMED CT codes from pydicom's dictionary).
_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
_HEMORRHAGE = codes.SCT.Hemorrhage
MASK_LABELS = {"iph": "IPH", "ivh": "IVH"}
MAP_LABELS = {"iph": "P(IPH)", "ivh": "P(IVH)", "new": "P(new hemorrhage)"}
_REGIONS = {"iph": codes.SCT.Brain, "ivh": hd.sr.CodedConcept("35764002", "SCT", "Cerebral ventricle")}


def dicom_output_enabled(setting: Any, input_format: str | None) -> bool:
    """``sampling.dicom_output``: ``true``/``false`` as given; ``auto`` on when the baseline CT was DICOM
    (a site that sends DICOM wants DICOM back; a NIfTI user gets no unasked-for extra files)."""
    if setting not in DICOM_OUTPUT_SETTINGS:
        raise ValueError(f"sampling.dicom_output must be auto, true or false, got {setting!r}")
    if setting == "auto":
        return input_format == "dicom"
    return bool(setting)


@dataclass(frozen=True)
class SliceGeometry:
    """DICOM plane geometry of a NIfTI grid: one orientation and spacing, one position per slice."""

    shape: tuple[int, int, int]
    orientation: tuple[float, ...]  # ImageOrientationPatient (row direction, column direction), LPS
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    thickness: float  # spacing along the slice normal, mm
    positions: tuple[tuple[float, float, float], ...]  # ImagePositionPatient per slice, LPS

    @classmethod
    def of(cls, affine: np.ndarray, shape: Sequence[int]) -> SliceGeometry:
        """The planes of a 3D NIfTI grid (any in-plane orientation; slices along the third array axis)."""
        a = np.asarray(affine, dtype=np.float64)
        ni, nj, nk = (int(s) for s in shape[:3])
        m = LPS @ a[:3, :3]
        col_i, col_j, col_k = m[:, 0], m[:, 1], m[:, 2]
        row_dir = -col_i / np.linalg.norm(col_i)  # column index c runs along -i
        col_dir = -col_j / np.linalg.norm(col_j)  # row index r runs along -j
        normal = np.cross(row_dir, col_dir)
        origin = LPS @ (a[:3, :3] @ np.array([ni - 1, nj - 1, 0.0]) + a[:3, 3])
        positions = tuple(tuple(float(v) for v in origin + k * col_k) for k in range(nk))
        return cls(shape=(ni, nj, nk), orientation=tuple(float(v) for v in (*row_dir, *col_dir)),
                   pixel_spacing=(float(np.linalg.norm(col_j)), float(np.linalg.norm(col_i))),
                   thickness=float(abs(normal @ col_k)), positions=positions)

    def to_frames(self, vol: np.ndarray) -> np.ndarray:
        """``[X, Y, Z]`` volume -> ``[Z, rows, columns]`` frames in this geometry."""
        return np.ascontiguousarray(np.transpose(np.asarray(vol)[::-1, ::-1, :], (2, 1, 0)))

    def from_frames(self, frames: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_frames` (a reader's check that a SEG lands on the NIfTI voxels)."""
        return np.ascontiguousarray(np.transpose(np.asarray(frames), (2, 1, 0))[::-1, ::-1, :])


@dataclass(frozen=True)
class SeriesUIDs:
    """New UIDs of one written output set (nothing derived from the source scan's UIDs)."""

    study: str
    frame_of_reference: str
    ct_series: str
    ct_instances: tuple[str, ...]
    seg_binary_series: str
    seg_binary_instance: str
    seg_fractional_series: str
    seg_fractional_instance: str

    @classmethod
    def new(cls, n_slices: int) -> SeriesUIDs:
        return cls(study=generate_uid(), frame_of_reference=generate_uid(), ct_series=generate_uid(),
                   ct_instances=tuple(generate_uid() for _ in range(n_slices)), seg_binary_series=generate_uid(),
                   seg_binary_instance=generate_uid(), seg_fractional_series=generate_uid(),
                   seg_fractional_instance=generate_uid())


def _patient_study(ds: Dataset, patient_id: str, uids: SeriesUIDs) -> None:
    """Patient and study modules with the manifest pseudonym only: type 2 attributes present but empty
    (no dates, no names, no accession), and the de-identification flags of PS3.15 set."""
    ds.PatientName = f"{patient_id}^"  # the pseudonym as family name (a single-component name)
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "HemExp: re-encoded NIfTI, new UIDs, pseudonym only"
    ds.StudyInstanceUID = uids.study
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""


def ct_slice(hu: np.ndarray, k: int, geom: SliceGeometry, patient_id: str, uids: SeriesUIDs) -> Dataset:
    """One CT Image Storage instance (slice ``k``; ``hu`` is that slice's ``[rows, columns]`` frame)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uids.ct_instances[k]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uids.ct_instances[k]
    _patient_study(ds, patient_id, uids)
    ds.Modality = "CT"
    ds.SeriesInstanceUID = uids.ct_series
    ds.SeriesNumber = 1
    ds.BodyPartExamined = "HEAD"  # an unpaired body part: Laterality (2C) is then absent
    ds.PatientPosition = ""  # type 2C: the acquisition's position is not kept by ingest
    ds.SeriesDescription = "HemExp baseline CT (de-identified, native grid)"
    ds.FrameOfReferenceUID = uids.frame_of_reference
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = MANUFACTURER
    ds.InstanceNumber = k + 1
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.KVP = ""
    ds.ImageOrientationPatient = [round(v, 8) for v in geom.orientation]
    ds.ImagePositionPatient = [round(v, 6) for v in geom.positions[k]]
    ds.PixelSpacing = [round(v, 6) for v in geom.pixel_spacing]
    ds.SliceThickness = round(geom.thickness, 6)
    ds.SpacingBetweenSlices = round(geom.thickness, 6)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(v) for v in hu.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 80
    ds.BurnedInAnnotation = "NO"
    ds.PixelData = np.clip(np.rint(hu), -32768, 32767).astype("<i2").tobytes()
    return ds


def write_ct_series(ct: nib.Nifti1Image, out_dir: Path, patient_id: str, uids: SeriesUIDs) -> list[Dataset]:
    """Write the baseline CT as one file per slice into ``out_dir``; returns the datasets in slice order
    (the SEGs' source images)."""
    geom = SliceGeometry.of(ct.affine, ct.shape)
    frames = geom.to_frames(np.asarray(ct.dataobj, dtype=np.float32))
    out_dir.mkdir(parents=True, exist_ok=True)
    series = []
    for k, frame in enumerate(frames):
        ds = ct_slice(frame, k, geom, patient_id, uids)
        ds.save_as(out_dir / f"CT{k + 1:04d}.dcm", enforce_file_format=True)
        series.append(ds)
    return series


def hemexp_version() -> str:
    """The installed package's version (the SEGs' software and algorithm version), read from package
    metadata because the io layer may not import the top-level package."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hemexp")
    except PackageNotFoundError:
        return "unknown"


def _algorithm() -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(name="HemExp", version=hemexp_version(),
                                              family=codes.DCM.ArtificialIntelligence)


def _segments(kinds: Sequence[str], labels: Mapping[str, str]) -> list[hd.seg.SegmentDescription]:
    return [hd.seg.SegmentDescription(
        segment_number=n, segment_label=labels[kind], segmented_property_category=_CATEGORY,
        segmented_property_type=_HEMORRHAGE, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(), tracking_uid=generate_uid(), tracking_id=labels[kind],
        anatomic_regions=[_REGIONS.get(kind, codes.SCT.Brain)])
        for n, kind in enumerate(kinds, start=1)]


def _stack(vols: Mapping[str, np.ndarray], kinds: Sequence[str], geom: SliceGeometry, dtype: type) -> np.ndarray:
    """``[frames, rows, columns, segments]`` in the CT series' frame order."""
    return np.stack([geom.to_frames(np.asarray(vols[k])).astype(dtype) for k in kinds], axis=-1)


def make_seg(source: Sequence[Dataset], vols: Mapping[str, np.ndarray], geom: SliceGeometry, fractional: bool,
             series_uid: str, instance_uid: str, series_number: int, description: str) -> hd.seg.Segmentation:
    """A BINARY SEG of masks (``vols`` {iph, ivh}) or a FRACTIONAL/PROBABILITY SEG of maps in [0, 1]."""
    kinds = list(vols)
    labels = MAP_LABELS if fractional else MASK_LABELS
    pixels = _stack(vols, kinds, geom, np.float32) if fractional else (_stack(vols, kinds, geom, np.uint8) > 0)
    if fractional:
        pixels = np.clip(pixels, 0.0, 1.0)
    extra: dict[str, Any] = {}
    if fractional:
        extra = {"fractional_type": hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
                 "max_fractional_value": MAX_FRACTIONAL_VALUE}
    return hd.seg.Segmentation(
        source_images=list(source), pixel_array=pixels,
        segmentation_type=(hd.seg.SegmentationTypeValues.FRACTIONAL if fractional else hd.seg.SegmentationTypeValues.BINARY),
        segment_descriptions=_segments(kinds, labels), series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=instance_uid, instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name="HemExp", software_versions=hemexp_version(), device_serial_number="0",
        content_description=description, content_label="HEMEXP", series_description=description,
        omit_empty_frames=bool(pixels.any()), **extra)


def strip_dates(ds: Dataset) -> Dataset:
    """No dates in outputs (``docs/deidentification.md``): highdicom stamps the write time into the SEG.
    Type 3 stamps are removed; Content Date/Time (type 1 in a SEG) get PS3.15's dummy-value treatment."""
    for key in ("InstanceCreationDate", "InstanceCreationTime", "SeriesDate", "SeriesTime"):
        if key in ds:
            delattr(ds, key)
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            del item.ContributionDateTime
    ds.ContentDate, ds.ContentTime = DUMMY_DATE, DUMMY_TIME
    ds.LongitudinalTemporalInformationModified = "REMOVED"
    return ds


def write_dicom_outputs(out_dir: str | Path, ct: nib.Nifti1Image, masks: Mapping[str, np.ndarray],
                        maps: Mapping[str, np.ndarray], patient_id: str, sidecar: Mapping[str, Any]) -> dict[str, Any]:
    """Write the de-identified CT series, the binary and fractional SEGs and ``dicom.json`` into
    ``out_dir`` (swapped in whole); ``masks``/``maps`` must lie on ``ct``'s grid. Returns the sidecar."""
    shape = tuple(ct.shape[:3])
    for name, vol in {**masks, **maps}.items():
        if tuple(np.shape(vol)) != shape:
            raise ValueError(f"{name} has shape {np.shape(vol)}, not the baseline CT grid {shape}")
    geom = SliceGeometry.of(ct.affine, shape)
    uids = SeriesUIDs.new(shape[2])
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        source = write_ct_series(ct, tmp / CT_DIR, patient_id, uids)
        for fractional, vols, file, series, instance, number, text in (
                (False, masks, SEG_BINARY, uids.seg_binary_series, uids.seg_binary_instance, 2,
                 "HemExp median simulated follow-up IPH/IVH"),
                (True, maps, SEG_FRACTIONAL, uids.seg_fractional_series, uids.seg_fractional_instance, 3,
                 "HemExp voxel-wise follow-up probability")):
            seg = make_seg(source, vols, geom, fractional, series, instance, number, text)
            strip_dates(seg).save_as(tmp / file)
        info = {**dict(sidecar), "patient_id": patient_id,
                "files": {"ct_series": f"{CT_DIR}/", "seg_binary": SEG_BINARY, "seg_fractional": SEG_FRACTIONAL},
                "segments": {"seg_binary": [MASK_LABELS[k] for k in masks],
                             "seg_fractional": [MAP_LABELS[k] for k in maps]},
                "max_fractional_value": MAX_FRACTIONAL_VALUE,
                "uids": {"study": uids.study, "frame_of_reference": uids.frame_of_reference,
                         "ct_series": uids.ct_series, "ct_instances": list(uids.ct_instances),
                         "seg_binary_series": uids.seg_binary_series, "seg_binary_instance": uids.seg_binary_instance,
                         "seg_fractional_series": uids.seg_fractional_series,
                         "seg_fractional_instance": uids.seg_fractional_instance}}
        write_json(tmp / SIDECAR, info)
    return info
