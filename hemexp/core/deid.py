"""De-identification of what HemExp writes: shareable paths, scrubbed text, the DICOM whitelist.

The policy is ``docs/deidentification.md`` (modelled on DICOM PS3.15 Annex E). In short: the only patient
identifier in any output is the manifest's ``patient_id``; a path in a shared product (``ingest.json``,
``summary.json``, the failure table and records, logs, MLflow params) is relative to the manifest's
folder or to ``results_dir``, or else only a file name, never absolute; of a DICOM header only the
technical attributes of :data:`DICOM_OUTPUT_ATTRIBUTES` may reach an output, and coded values only in the
forms :func:`modality_term`, :func:`kernel_code` and :func:`standard_uid` let through.

Error *objects* keep full paths (a traceback in the user's own terminal is theirs); the boundaries that
write shared text (the failure record and stderr line of :class:`~hemexp.core.errors.PatientInputError`,
product JSON, printed product paths) pass it through :func:`shareable_path` / :func:`scrub_text`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath

# DICOM attributes HemExp parses at all (hemexp.io.dicom reads headers with ``specific_tags``; the pixel
# read parses the whole file but keeps only pixel data and the rescale). Everything else, the patient,
# study, equipment-identity and free-text attributes included, is never read into a returned object.
# Two are read for a decision and then dropped: SeriesDescription (a kernel hint when ConvolutionKernel
# is not recognised; only the kernel class leaves) and PatientID (compared, as a salted in-process hash,
# to refuse a folder holding two patients' series).
DICOM_READ_ATTRIBUTES = (
    "SOPClassUID", "Modality", "ImageType", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
    "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns",
    "SliceThickness", "ConvolutionKernel", "InstanceNumber", "NumberOfFrames", "PatientID",
)
# Of those, the attributes whose (sanitised) values may appear in outputs. SeriesInstanceUID groups
# files only; ImagePositionPatient/ImageOrientationPatient/PixelSpacing reach outputs only as the
# derived affine, spacing, tilt and axial angle; ImageType only as the ``localizer`` flag.
DICOM_OUTPUT_ATTRIBUTES = frozenset({
    "SOPClassUID",  # standard (class) UIDs only, in a rejection reason: :func:`standard_uid`
    "Modality",  # a defined term or OTHER: :func:`modality_term`
    "SeriesNumber", "Rows", "Columns", "SliceThickness", "NumberOfFrames",  # numbers
    "ConvolutionKernel",  # a short vendor kernel code or "other": :func:`kernel_code`
})

# PS3.3 C.7.3.1.1.1 defined terms for Modality (current and retired); anything else becomes OTHER.
MODALITY_TERMS = frozenset(
    "AR ASMT AU BDUS BI BMD CR CT CTPROTOCOL DG DOC DX ECG EPS ES FID GM HC HD IO IOL IVOCT IVUS KER KO LEN "
    "LS MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PLAN PR PT PX REG RESP RF RG RTDOSE RTIMAGE "
    "RTPLAN RTRECORD RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA XC "
    "CD CF CP CS DD DF DM DS EC FA FS LP MA MS OPR ST VF".split()
)
# Reconstruction kernels: vendor codes (Siemens H30s/Br40d/Hr38\3, Canon FC43, Philips UB/YC) or
# GE's names. A kernel value of any other form (free text, a name typed into the field) is "other".
_KERNEL_CODE = re.compile(r"(?:[A-Z]{1,2}[a-z]?\d{1,3}[a-z]?(?:\\\d)?|[A-Z]{1,2})")
KERNEL_WORDS = frozenset({"STANDARD", "SOFT", "SMOOTH", "BONE", "BONEPLUS", "LUNG", "DETAIL", "EDGE", "CHEST",
                          "SHARP", "ULTRA", "EXPERIMENTAL7"})
_STANDARD_UID = re.compile(r"1\.2\.840\.10008(?:\.\d+)+")

# An absolute POSIX path (not preceded by a word character, so "mm/s" or "and/or" stay), or a Windows
# drive path. Used only after the known roots have been made relative.
_ABS_PATH = re.compile(r"(?<![\w.:/~-])(?:/[^\s'\"`,;:()\[\]{}<>|]+|[A-Za-z]:[\\/][^\s'\"`,;()\[\]{}<>|]*)")


def modality_term(value: object) -> str:
    """Modality as a PS3.3 defined term (upper case), ``OTHER`` for anything else, ``""`` when missing."""
    text = str(value or "").strip().upper()
    if not text:
        return ""
    return text if text in MODALITY_TERMS else "OTHER"


def kernel_code(value: object) -> str:
    """ConvolutionKernel when every value is a short vendor code or a known kernel name, else ``other``
    (``""`` when absent). Multi-valued kernels are joined with a backslash as DICOM stores them."""
    parts = [p.strip() for p in (value if isinstance(value, (list, tuple)) else [value]) if str(p or "").strip()]
    if not parts:
        return ""
    text = "\\".join(str(p) for p in parts)
    if len(text) <= 16 and (_KERNEL_CODE.fullmatch(text) or text.upper() in KERNEL_WORDS):
        return text
    return "other"


def standard_uid(value: object) -> str:
    """A DICOM-defined UID (SOP class, transfer syntax: the 1.2.840.10008 root) as is; any other UID
    (instance UIDs, private roots) or text as ``a non-standard UID``."""
    text = str(value or "").strip()
    return text if _STANDARD_UID.fullmatch(text) else "a non-standard UID"


def _forms(path: str | os.PathLike) -> set[str]:
    """The absolute spelling and the symlink-resolved spelling of a path (either may be what a caller has)."""
    text = os.fspath(path)
    return {os.path.normpath(os.path.abspath(text)), os.path.realpath(text)}


def _roots(manifest_dir: str | os.PathLike | None, results_dir: str | os.PathLike | None) -> list[str]:
    """Every spelling of the two roots, deepest first (a path under both is shown relative to the inner)."""
    found = {form for root in (manifest_dir, results_dir) if root not in (None, "") for form in _forms(root)}
    return sorted(found, key=lambda r: (-len(r), r))


def _under(path: str, root: str) -> str | None:
    if path == root:
        return "."
    prefix = root if root.endswith(os.sep) else root + os.sep
    return PurePosixPath(*Path(path[len(prefix):]).parts).as_posix() if path.startswith(prefix) else None


def shareable_path(path: str | os.PathLike | None, manifest_dir: str | os.PathLike | None = None,
                   results_dir: str | os.PathLike | None = None) -> str:
    """``path`` as a shared product may show it: relative to ``results_dir`` or to the manifest's folder
    (whichever is deeper and holds it; POSIX separators), else only its file name. ``""`` for no path.

    A relative ``path`` is taken relative to the working directory, as the process would open it.
    """
    if path is None or os.fspath(path) == "":
        return ""
    forms = _forms(path)
    for root in _roots(manifest_dir, results_dir):
        for form in forms:
            rel = _under(form, root)
            if rel is not None:
                return rel
    text = os.fspath(path)
    name = PureWindowsPath(text).name if re.match(r"[A-Za-z]:[\\/]", text) else Path(text).name
    return name or "."


def scrub_text(text: str, manifest_dir: str | os.PathLike | None = None, results_dir: str | os.PathLike | None = None,
               known: Mapping[str, str] | None = None) -> str:
    """Free text (an error message, a log line) with every absolute path made shareable.

    ``known`` maps exact strings to their replacement first (an error's own ``file`` to its shareable
    form); then each spelling of the two roots followed by a separator is cut off (the rest is
    root-relative, even when it contains spaces); then any remaining absolute path is reduced to its
    file name.
    """
    out = str(text)
    for raw, safe in sorted((known or {}).items(), key=lambda kv: -len(kv[0])):
        if raw:
            for form in {raw, *(_forms(raw) if os.path.isabs(raw) else ())}:
                out = out.replace(form, safe)
    for root in _roots(manifest_dir, results_dir):
        out = out.replace(root.rstrip(os.sep) + os.sep, "")
    return _ABS_PATH.sub(lambda m: shareable_path(m.group(0)) or m.group(0), out)


def scrub_values(values: Iterable[tuple[str, object]], manifest_dir: str | os.PathLike | None = None,
                 results_dir: str | os.PathLike | None = None) -> dict[str, object]:
    """``(key, value)`` pairs with every absolute-path string value made shareable (MLflow params)."""
    return {k: shareable_path(v, manifest_dir, results_dir) if isinstance(v, str) and os.path.isabs(v) else v
            for k, v in values}
