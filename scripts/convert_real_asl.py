"""Rebuild the real BIDS-ASL data sets (public runs) from local clones of public repositories.

The project trains and validates on seven real ASL runs that it does not ship (the bundle and its tests must
not need them), so a user rebuilds them: six Siemens Prisma runs are converted from the DICOM in
neurolabusc/dcm_qa_asl with dcm2niix (``pip install dcm2niix``), and one already subtracted Oxford run is copied
from physimals/svb_models_asl. Two Philips runs of a phantom (neurolabusc/dcm_qa_philips_asl: no perfusion, a
vendor the model never saw) are for the no-harm checks only, never for training: convert them into a data set of
their own. Every parameter choice (protocol values, assumed values, label/control order, the volumes left out)
lives in ``RUNS`` below, each with where it came from, so the data sets are reproducible.

    python scripts/convert_real_asl.py --dcm_qa_asl PATH/dcm_qa_asl --svb_models_asl PATH/svb_models_asl \
        --output_dir data/real-asl [--subjects prisma2dpasl oxfordmpld]
    python scripts/convert_real_asl.py --dcm_qa_philips_asl PATH/dcm_qa_philips_asl --output_dir data/real-phantom
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

# The versions the reference data set was built with; other versions are used but a warning is printed.
TESTED_DCM2NIIX = "v1.0.20260724"


class ConvertError(Exception):
    """A problem the user can fix (missing clone, missing dcm2niix, unexpected conversion output)."""


@dataclass(frozen=True)
class Source:
    """A public repository the user clones; its licence travels with the data converted from it."""

    url: str
    licence: str  # SPDX identifier, for dataset_description.json
    tested_commit: str  # commit the reference data set was built from


SOURCES: dict[str, Source] = {
    "dcm_qa_asl": Source(
        "https://github.com/neurolabusc/dcm_qa_asl", "BSD-2-Clause", "01143b4351fce1d8f31cc532169298ddf3a14126"
    ),
    "svb_models_asl": Source(
        "https://github.com/physimals/svb_models_asl", "Apache-2.0", "70acbf9d0e8d118648b82149b325f2c03ec64d63"
    ),
    "dcm_qa_philips_asl": Source(
        "https://github.com/neurolabusc/dcm_qa_philips_asl", "BSD-2-Clause", "f8fe78ad1321be9a0637d12a40454bab335f729e"
    ),
}


@dataclass(frozen=True)
class Run:
    """One subject: where its images are, how its volumes are ordered, and its fixed BIDS-ASL fields."""

    source: str  # key of SOURCES
    image: str  # DICOM folder, or a NIfTI file, inside the source clone
    sequence: str  # for the README table
    unit: tuple[str, ...]  # volume types of one repeat: ("label", "control"), ("control", "label"), ("deltam",)
    repeats: int  # repeats per PLD
    plds: tuple[float, ...]  # s; for PASL the inversion time TI
    sidecar: dict[str, Any]  # fixed *_asl.json fields (PostLabelingDelay and TotalAcquiredPairs are derived)
    head: tuple[str, ...] = ()  # volume types before the repeats (an included M0)
    plds_blocked: bool = False  # True: all repeats of one PLD, then the next; False: PLDs cycle within a repeat
    drop: tuple[int, ...] = ()  # volumes of the converted series that are left out
    m0_image: str | None = None  # separate M0 DICOM folder
    m0_sidecar: dict[str, Any] = field(default_factory=dict)  # fixed *_m0scan.json fields
    mask: str | None = None  # brain mask NIfTI shipped with the run
    phantom: bool = False  # a phantom (no perfusion): for no-harm checks, never for training

    @property
    def is_dicom(self) -> bool:
        """DICOM runs go through dcm2niix; NIfTI runs are copied."""
        return not self.image.endswith((".nii", ".nii.gz"))


PLDS_6 = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # s; the six PLDs of the three multi-PLD runs (README table)

# One entry per subject of the README of shared/real-asl ("README" below), which took the protocol values from
# the protocol printouts in dcm_qa_asl (Product_Wang_Protocols.pdf, Oxford_Protocols.pdf) and dcm2niix's JSON.
# "dcm2niix" means the value is in dcm2niix's JSON for that series; "assumed" marks the README's assumed values.
RUNS: dict[str, Run] = {
    "prisma2dpasl": Run(
        source="dcm_qa_asl",
        image="In/PASL2D/3_pasl_2d",  # README table
        sequence="Siemens Prisma 3 T, 2D EPI PASL PICORE Q2TIPS, TI 2.0 s, TI1 0.8 s",
        head=("m0scan",),  # README: M0 "Included (volume 0)"
        unit=("label", "control"),  # README: "42 (label first)"
        repeats=42,  # README: 42 pairs
        plds=(2.0,),  # dcm2niix InversionTime (TI 2.0 s)
        sidecar={
            "ArterialSpinLabelingType": "PASL",  # dcm2niix
            "PASLType": "PICORE",  # dcm2niix PASLType
            "MRAcquisitionType": "2D",  # dcm2niix
            "MagneticFieldStrength": 3,  # dcm2niix
            "BolusCutOffFlag": True,  # README: Q2TIPS
            "BolusCutOffTechnique": "Q2TIPS",  # README / protocol printout
            "BolusCutOffDelayTime": 0.8,  # dcm2niix BolusDuration (TI1 0.8 s)
            "BackgroundSuppression": False,  # assumed (README)
            "RepetitionTimePreparation": 3.1,  # dcm2niix RepetitionTime
            "EchoTime": 0.014,  # dcm2niix
            "M0Type": "Included",  # README: volume 0
        },
    ),
    "prisma2dpcasl": Run(
        source="dcm_qa_asl",
        image="In/pCASL2D/9_pcasl_2d",  # README table
        m0_image="In/pCASL2D/10_pcasl_2d_m0",  # README table: "+ 10_pcasl_2d_m0"
        sequence="2D EPI pCASL, PLD 0.2 s (a short-PLD test protocol: much of deltaM is arterial), labeling 1.51 s",
        unit=("label", "control"),  # README: "51 (label first)"
        repeats=51,  # README: 51 pairs
        plds=(0.2,),  # dcm2niix PostLabelingDelay
        sidecar={
            "ArterialSpinLabelingType": "PCASL",  # dcm2niix
            "MRAcquisitionType": "2D",  # dcm2niix
            "MagneticFieldStrength": 3,  # dcm2niix
            "LabelingDuration": 1.5088,  # dcm2niix LabelingDuration
            "BackgroundSuppression": False,  # assumed (README)
            "RepetitionTimePreparation": 2.54,  # dcm2niix RepetitionTimePreparation (written in ms: 2540)
            "EchoTime": 0.014,  # dcm2niix
            "M0Type": "Separate",  # README: M0 "Separate"
        },
        m0_sidecar={
            "RepetitionTimePreparation": 2.0,  # dcm2niix of the M0 series (written in ms: 2000)
            "EchoTime": 0.014,  # dcm2niix of the M0 series; BIDS requires it for m0scan (not in the README's copy)
        },
    ),
    "prisma2dmpld": Run(
        source="dcm_qa_asl",
        image="In/pCASL2Dve/11_to_ep2d_PCASL",  # README table
        sequence="2D EPI multi-PLD pCASL, PLDs 0.25-1.5 s x 6, labeling 1.4 s, background suppression",
        head=("m0scan",),  # README: M0 "Included" (volume 0; PostLabelingDelay 0 there)
        unit=("label", "control"),  # README's aslcontext: label first
        repeats=8,  # README: "8 per PLD"
        plds=PLDS_6,  # dcm2niix PostLabelingDelay; each pair at one PLD, PLDs cycling within a repeat
        sidecar={
            "ArterialSpinLabelingType": "PCASL",  # dcm2niix
            "MRAcquisitionType": "2D",  # dcm2niix
            "MagneticFieldStrength": 3,  # dcm2niix
            "LabelingDuration": 1.4,  # dcm2niix TagDuration
            "BackgroundSuppression": True,  # README / Oxford_Protocols.pdf
            "RepetitionTimePreparation": 4.1,  # dcm2niix RepetitionTimePreparation (written in ms: 4100)
            "EchoTime": 0.014,  # dcm2niix
            "M0Type": "Included",  # README
        },
    ),
    "prisma3dpcasl": Run(
        source="dcm_qa_asl",
        image="In/pCASL3D/15_pcasl_3d",  # README table
        sequence="3D GRASE pCASL, PLD 1.2 s, background suppression",
        head=("m0scan",),  # README: M0 "Included" (volume 0)
        drop=(1,),  # README: "The 3D pCASL run's unpaired control (its volume 1) is left out"
        unit=("label", "control"),  # README's aslcontext: label first
        repeats=8,  # README: 8 pairs
        plds=(1.2,),  # dcm2niix writes this run's PLD as its LabelingDuration (README)
        sidecar={
            "ArterialSpinLabelingType": "PCASL",  # dcm2niix
            "MRAcquisitionType": "3D",  # dcm2niix
            "MagneticFieldStrength": 3,  # dcm2niix
            "LabelingDuration": 1.5088,  # assumed (README): as the 2D pCASL run
            "BackgroundSuppression": True,  # README / Product_Wang_Protocols.pdf
            "RepetitionTimePreparation": 3.48,  # dcm2niix RepetitionTimeExcitation (per-shot TR)
            "EchoTime": 0.02822,  # dcm2niix
            "M0Type": "Included",  # README
        },
    ),
    "prisma3dpasl": Run(
        source="dcm_qa_asl",
        image="In/PASL3D/11_pasl_3d",  # README table
        sequence="3D GRASE PASL FAIR QUIPSS II, TI 1.99 s, TI1 0.7 s, background suppression",
        unit=("control", "label"),  # README: "6 (control first)"
        repeats=6,  # README: 6 pairs
        plds=(1.99,),  # dcm2niix InversionTime
        sidecar={
            "ArterialSpinLabelingType": "PASL",  # dcm2niix
            "PASLType": "FAIR",  # dcm2niix PASLType "FAIR QII"
            "MRAcquisitionType": "3D",  # dcm2niix
            "MagneticFieldStrength": 3,  # dcm2niix
            "BolusCutOffFlag": True,  # README: QUIPSS II
            "BolusCutOffTechnique": "QUIPSSII",  # README / dcm2niix PASLType "FAIR QII"
            "BolusCutOffDelayTime": 0.7,  # dcm2niix BolusDuration (TI1 0.7 s)
            "BackgroundSuppression": True,  # README / Product_Wang_Protocols.pdf
            "RepetitionTimePreparation": 3.6,  # dcm2niix RepetitionTimeExcitation (per-shot TR)
            "EchoTime": 0.03958,  # dcm2niix
            "M0Type": "Absent",  # README (its separate M0 series, 13_pasl_3d_m0, is not used)
        },
    ),
    "prisma3dmpld": Run(
        source="dcm_qa_asl",
        image="In/pCASL3Dve/20_jw_tgse_PCASL_singleShot_6PLDs_8Averages",  # README table
        sequence="3D GRASE multi-PLD pCASL, PLDs 0.25-1.5 s x 6",
        unit=("label", "control"),  # README's aslcontext: label first
        repeats=8,  # README: "8 per PLD"
        plds=PLDS_6,  # dcm2niix InitialPostLabelDelay; PLDs cycling within a repeat
        sidecar={
            "ArterialSpinLabelingType": "PCASL",  # dcm2niix
            "MRAcquisitionType": "3D",  # dcm2niix
            "MagneticFieldStrength": 3,  # dcm2niix
            "LabelingDuration": 1.4,  # dcm2niix Tag0
            "BackgroundSuppression": True,  # README / Oxford_Protocols.pdf
            "RepetitionTimePreparation": 3.71,  # dcm2niix RepetitionTime
            "EchoTime": 0.03654,  # dcm2niix
            "M0Type": "Absent",  # README
        },
    ),
    "oxfordmpld": Run(
        source="svb_models_asl",
        image="scripts/asldata_diff.nii.gz",  # README table; copied as is
        mask="scripts/asldata_mask.nii.gz",  # README table: "(+ mask)"
        sequence="2D multi-PLD pCASL, already subtracted (deltam), 6 PLD blocks of 8 repeats, labeling 1.8 s",
        unit=("deltam",),  # README: already subtracted
        repeats=8,  # README; svb_models_asl scripts/asl_example.py "repeats": [8]
        plds=PLDS_6,  # svb_models_asl scripts/asl_example.py "plds"
        plds_blocked=True,  # README: "6 PLD blocks of 8 repeats"
        sidecar={
            "ArterialSpinLabelingType": "PCASL",  # asl_example.py "casl": True
            "MRAcquisitionType": "2D",  # README
            "MagneticFieldStrength": 3,  # assumed (README)
            "LabelingDuration": 1.8,  # asl_example.py "tau": 1.8
            "BackgroundSuppression": True,  # assumed (README)
            "RepetitionTimePreparation": 4.1,  # assumed (README)
            "M0Type": "Absent",  # README
            # asl_example.py "slicedt": 0.0452 s, ascending as BASIL reads it (BIDS requires SliceTiming for 2D;
            # not in the README's copy). EchoTime, which BIDS also requires, is not known for this run.
            "SliceTiming": [round(0.0452 * i, 6) for i in range(24)],
        },
    ),
    # Philips Ingenia Elition X, 3 T, software 5.7.1 (dcm2niix), scans of a phantom. dcm_qa_philips_asl's README
    # and protocol printouts (In/20x_pCASL.txt, In/40x_3D_pCASL_6mm.txt) give the values marked "printout".
    # dcm2niix writes one volume per dynamic and type in the DICOM's order: control, then label, per dynamic
    # (MRImageLabelType (2005,1429) of each instance, checked voxel for voxel against dcm2niix's output).
    "philips2dpcasl": Run(
        source="dcm_qa_philips_asl",
        image="In/Classic/202_SOURCE_-_pCASL",  # README: "the raw data for that series (e.g. series 202)"
        sequence="Philips Ingenia Elition X 3 T, 2D EPI pCASL, PLD 1.8 s; a phantom (no perfusion)",
        unit=("control", "label"),  # MRImageLabelType per instance: CONTROL, LABEL within each dynamic
        repeats=30,  # printout: dyn scans 30 (README: 60 volumes, 30 repeats)
        plds=(1.8,),  # printout: post label delay (ms) 1800
        phantom=True,
        sidecar={
            "ArterialSpinLabelingType": "PCASL",  # printout: Arterial Spin labeling "pCASL"
            "MRAcquisitionType": "2D",  # dcm2niix
            "MagneticFieldStrength": 3,  # dcm2niix
            "LabelingDuration": 1.65,  # assumed: the Philips product default (not in the DICOM or the printout)
            "BackgroundSuppression": False,  # assumed (not in the printout)
            "RepetitionTimePreparation": 4.55,  # dcm2niix RepetitionTimeExcitation (printout TR 4550 ms)
            "EchoTime": 0.015311,  # dcm2niix
            "M0Type": "Absent",  # no M0 series in the repository
            # SliceTiming, which BIDS requires for 2D, is not in the DICOM (dcm2niix writes none) and is not known.
        },
    ),
    "philips3dpcasl": Run(
        source="dcm_qa_philips_asl",
        image="In/Classic/402_SOURCE_-_3D_pCASL_6mm",  # README: series 402, the raw data of 401
        sequence="Philips Ingenia Elition X 3 T, 3D GRASE pCASL, PLD 2.0 s, background suppression; a phantom",
        unit=("control", "label"),  # MRImageLabelType per instance, as the 2D run
        drop=(0, 1),  # the first dynamic is 2.4x the others' signal (suppression not yet in its steady state)
        repeats=7,  # printout: 8 dynamics (README: 16 volumes), the first left out
        plds=(2.0,),  # printout: post label delay (ms) 2000
        phantom=True,
        sidecar={
            "ArterialSpinLabelingType": "PCASL",  # printout
            "MRAcquisitionType": "3D",  # dcm2niix
            "MagneticFieldStrength": 3,  # dcm2niix
            "LabelingDuration": 1.65,  # assumed: the Philips product default (not in the DICOM or the printout)
            "BackgroundSuppression": True,  # assumed from the signal: dynamics 2-8 are 0.42x the first's
            "RepetitionTimePreparation": 4.234,  # dcm2niix RepetitionTimeExcitation (printout Act. TR 4234 ms)
            "EchoTime": 0.0121,  # dcm2niix
            "M0Type": "Absent",  # no M0 series in the repository
        },
    ),
}

# Key order of the written sidecars (the README's copy); keys not listed follow in their own order.
KEY_ORDER = (
    "IntendedFor",
    "ArterialSpinLabelingType",
    "PASLType",
    "MRAcquisitionType",
    "MagneticFieldStrength",
    "PostLabelingDelay",
    "LabelingDuration",
    "BolusCutOffFlag",
    "BolusCutOffTechnique",
    "BolusCutOffDelayTime",
    "BackgroundSuppression",
    "RepetitionTimePreparation",
    "EchoTime",
    "M0Type",
)
# Fields of the table that dcm2niix also reads from the DICOM: a mismatch means an unexpected clone or version.
DCM2NIIX_CHECKED = ("ArterialSpinLabelingType", "MRAcquisitionType", "MagneticFieldStrength", "EchoTime")


# ---------------------------------------------------------------- pure functions of the table (tested) ----
def volume_types(run: Run) -> list[str]:
    """The aslcontext of the written series (after the dropped volumes are left out)."""
    return list(run.head) + list(run.unit) * (run.repeats * len(run.plds))


def post_labeling_delay(run: Run) -> float | list[float]:
    """A number for a single-PLD run, else one value per volume (0 for an included M0)."""
    if len(run.plds) == 1:
        return run.plds[0]
    if run.plds_blocked:
        per_repeat = [pld for pld in run.plds for _ in range(run.repeats)]
    else:
        per_repeat = [pld for _ in range(run.repeats) for pld in run.plds]
    return [0.0] * len(run.head) + [pld for pld in per_repeat for _ in run.unit]


def ordered(fields: dict[str, Any]) -> dict[str, Any]:
    """Sidecar fields in KEY_ORDER, so rebuilt files read like the reference ones."""
    rank = {key: i for i, key in enumerate(KEY_ORDER)}
    return dict(sorted(fields.items(), key=lambda item: rank.get(item[0], len(rank))))


def asl_sidecar(run: Run, slice_timing: list[float] | None = None) -> dict[str, Any]:
    """The *_asl.json of a run: table fields, the derived PLD and pair count, and dcm2niix's SliceTiming."""
    fields = dict(run.sidecar)
    fields["PostLabelingDelay"] = post_labeling_delay(run)
    fields["TotalAcquiredPairs"] = run.repeats * len(run.plds)
    if slice_timing is not None and "SliceTiming" not in fields:
        fields["SliceTiming"] = slice_timing
    return ordered(fields)


def m0_sidecar(run: Run, subject: str) -> dict[str, Any]:
    """The *_m0scan.json of a run with a separate M0, pointing at the ASL series it serves."""
    return ordered({"IntendedFor": f"perf/sub-{subject}_asl.nii.gz", **run.m0_sidecar})


def aslcontext_text(run: Run) -> str:
    """The *_aslcontext.tsv: a volume_type header and one row per volume."""
    return "\n".join(["volume_type", *volume_types(run)]) + "\n"


def dataset_description(sources: Sequence[str], phantom_only: bool = False) -> dict[str, Any]:
    """dataset_description.json naming the licence of each source present."""
    parts = []
    for name in (s for s in SOURCES if s in sources):
        subjects = [subject for subject, run in RUNS.items() if run.source == name]
        parts.append(f"{SOURCES[name].licence} ({subjects[0] if len(subjects) == 1 else name + ' runs'})")
    use = "for no-harm checks (phantom scans)" if phantom_only else "for training and validation"
    return {
        "Name": f"Public real ASL runs ({', '.join(s for s in SOURCES if s in sources)}) {use}",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "License": ", ".join(parts),
    }


def pairs_text(run: Run) -> str:
    """The README's 'pairs' column."""
    first = "deltam" if run.unit == ("deltam",) else f"{run.unit[0]} first"
    if len(run.plds) == 1:
        return f"{run.repeats} ({first})"
    return f"{run.repeats} per PLD x {len(run.plds)} ({first}; PostLabelingDelay per volume)"


def select_runs(subjects: Sequence[str] | None, runs: dict[str, Run] | None = None) -> dict[str, Run]:
    """The runs the user asked for ('sub-' prefix optional); all when none are named."""
    runs = RUNS if runs is None else runs
    if not subjects:
        return dict(runs)
    names = [s.removeprefix("sub-") for s in subjects]
    unknown = [n for n in names if n not in runs]
    if unknown:
        raise ConvertError(f"unknown subject(s) {', '.join(unknown)}; choose from {', '.join(runs)}")
    return {n: runs[n] for n in names}


# ---------------------------------------------------------------- file system and dcm2niix ----
def check_source_dir(name: str, path: Path) -> Path:
    """A one-line error when the clone the user named is not there."""
    if not path.is_dir():
        raise ConvertError(f"--{name}: no such folder {path} (clone {SOURCES[name].url} there)")
    return path


def is_lfs_pointer(path: Path) -> bool:
    """True for a git-lfs pointer left where a clone made without git-lfs expected data."""
    with path.open("rb") as handle:
        return handle.read(24) == b"version https://git-lfs"


def source_path(root: Path, relative: str, source: str, needed_by: str) -> Path:
    """A file or folder inside a clone, with a one-line error naming it when it is missing."""
    path = root / relative
    if not path.exists():
        raise ConvertError(f"{needed_by}: missing {path} (is {root} a clone of {SOURCES[source].url}?)")
    if path.is_file() and is_lfs_pointer(path):
        raise ConvertError(f"{needed_by}: {path} is a git-lfs pointer; run `git lfs pull` in {root}")
    return path


def find_dcm2niix() -> str:
    """The dcm2niix from PyPI (the version the extra pins), else one on PATH."""
    try:
        import dcm2niix

        if Path(dcm2niix.bin).is_file():
            return str(dcm2niix.bin)
    except ImportError:
        pass
    exe = shutil.which("dcm2niix")
    if exe is None:
        raise ConvertError("dcm2niix is not installed: run `pip install dcm2niix` (or put dcm2niix on PATH)")
    return exe


def run_dcm2niix(dicom_dir: Path, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Convert one DICOM folder into an empty out_dir; return its single NIfTI and dcm2niix's JSON."""
    out_dir.mkdir(parents=True)
    cmd = [find_dcm2niix(), "-b", "y", "-z", "y", "-f", "%p_%s", "-o", str(out_dir), str(dicom_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    images = sorted(out_dir.glob("*.nii.gz"))
    if result.returncode != 0 or len(images) != 1:
        log = (result.stderr or result.stdout).strip().splitlines()
        why = log[-1] if log else f"exit status {result.returncode}"
        raise ConvertError(f"dcm2niix on {dicom_dir} gave {len(images)} NIfTI files, expected 1 ({why})")
    sidecar_path = images[0].with_name(images[0].name.removesuffix(".nii.gz") + ".json")
    return images[0], json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else {}


def check_against_dcm2niix(subject: str, run: Run, converted: dict[str, Any]) -> None:
    """Warn where the table and dcm2niix disagree: a different clone or dcm2niix version may differ elsewhere."""
    for key in DCM2NIIX_CHECKED:
        if key in converted and key in run.sidecar and converted[key] != run.sidecar[key]:
            print(
                f"warning: sub-{subject}: {key} is {run.sidecar[key]!r} in the table, {converted[key]!r} from dcm2niix",
                file=sys.stderr,
            )
    version = converted.get("ConversionSoftwareVersion")
    if version and version != TESTED_DCM2NIIX:
        print(f"warning: dcm2niix {version}; the reference was built with {TESTED_DCM2NIIX}", file=sys.stderr)


def write_series(src: Path, dst: Path, run: Run, subject: str) -> None:
    """Copy a 4D series, leaving out run.drop, after checking its volume count against the aslcontext."""
    image = nib.load(src)
    expected = len(volume_types(run)) + len(run.drop)
    found = image.shape[3] if image.ndim == 4 else 1
    if found != expected:
        raise ConvertError(f"sub-{subject}: {src} has {found} volumes, the table expects {expected}")
    if not run.drop:
        shutil.copyfile(src, dst)
        return
    data = np.delete(np.asanyarray(image.dataobj), list(run.drop), axis=3)
    nib.Nifti1Image(data, image.affine, image.header).to_filename(dst)


def write_json(path: Path, fields: dict[str, Any]) -> None:
    """JSON as in the reference data set (indent 1, no trailing newline)."""
    path.write_text(json.dumps(fields, indent=1))


def series_image(subject: str, run: Run, root: Path, tmp: Path) -> tuple[Path, list[float] | None]:
    """The run's NIfTI (dcm2niix's conversion of its DICOM folder, or the file in the clone) and SliceTiming."""
    path = source_path(root, run.image, run.source, f"sub-{subject}")
    if not run.is_dicom:
        return path, None
    image, converted = run_dcm2niix(path, tmp / "asl")
    check_against_dcm2niix(subject, run, converted)
    return image, converted.get("SliceTiming")


def write_m0(subject: str, run: Run, root: Path, tmp: Path, stem: str) -> None:
    """A separate M0 series as *_m0scan.nii.gz with its sidecar."""
    if run.m0_image is None:
        return
    m0, _ = run_dcm2niix(source_path(root, run.m0_image, run.source, f"sub-{subject}"), tmp / "m0")
    shutil.copyfile(m0, f"{stem}_m0scan.nii.gz")
    write_json(Path(f"{stem}_m0scan.json"), m0_sidecar(run, subject))


def convert_subject(subject: str, run: Run, root: Path, out_dir: Path) -> None:
    """Write sub-<subject>/perf/: the ASL series, its sidecar and aslcontext, a separate M0 and a mask."""
    perf = out_dir / f"sub-{subject}" / "perf"
    perf.mkdir(parents=True, exist_ok=True)
    stem = str(perf / f"sub-{subject}")
    with tempfile.TemporaryDirectory() as tmp:
        image, slice_timing = series_image(subject, run, root, Path(tmp))
        write_series(image, Path(f"{stem}_asl.nii.gz"), run, subject)
        write_m0(subject, run, root, Path(tmp), stem)
    write_json(Path(f"{stem}_asl.json"), asl_sidecar(run, slice_timing))
    Path(f"{stem}_aslcontext.tsv").write_text(aslcontext_text(run))
    if run.mask is not None:
        shutil.copyfile(source_path(root, run.mask, run.source, f"sub-{subject}"), f"{stem}_desc-brain_mask.nii.gz")


def check_sources(todo: dict[str, Run], given: dict[str, Path]) -> None:
    """Fail before writing anything when a file of a clone, its licence or dcm2niix is missing."""
    for subject, run in todo.items():
        for relative in (run.image, run.m0_image, run.mask):
            if relative is not None:
                source_path(given[run.source], relative, run.source, f"sub-{subject}")
    for name in sorted({run.source for run in todo.values()}):
        source_path(given[name], "LICENSE", name, "licence")
    if any(run.is_dicom or run.m0_image for run in todo.values()):
        find_dcm2niix()


def clone_commit(root: Path) -> str | None:
    """The checked-out commit of a clone, or None when it is not the top of a git work tree."""
    cmd = ["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    except OSError:
        return None
    lines = result.stdout.split()
    if result.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root.resolve():
        return None
    return lines[1]


def warn_if_untested(name: str, root: Path) -> None:
    """The reference was built from one commit of each repository; say when the clone is at another."""
    commit = clone_commit(root)
    if commit is not None and commit != SOURCES[name].tested_commit:
        print(
            f"warning: {root} is at {commit[:12]}; the reference was built from {SOURCES[name].tested_commit[:12]}",
            file=sys.stderr,
        )


# ---------------------------------------------------------------- data-set level files ----
README_HEAD = """# {title}

A BIDS-ASL raw data set of whole real ASL runs from public repositories, rebuilt by the project's
`scripts/convert_real_asl.py`: the vendors' DICOM converted with dcm2niix (the reference build used
{dcm2niix}; {commits}). {use} The bundle itself and its tests do not need them.

| subject | source (repository, path) | sequence | matrix / voxel (mm) | pairs | M0 |
| --- | --- | --- | --- | --- | --- |
"""
README_USE = (
    "Use them to train (Noise2Noise between disjoint pair subsets, lesion insertion), to validate, and to fit "
    "noise statistics."
)
README_USE_PHANTOM = (
    "Phantom scans (no perfusion) from a vendor the model never saw: use them for the no-harm checks "
    "(`studies/held_out_phantom`), never to train."
)

# What the README says of each source present (values assumed, volumes left out, licence).
README_NOTES = {
    "dcm_qa_asl": """
The six Prisma runs are one volunteer in one session. Parameters come from the protocol printouts in
dcm_qa_asl (`Product_Wang_Protocols.pdf`, `Oxford_Protocols.pdf`) and dcm2niix's JSON; every choice is in the
`RUNS` table of `scripts/convert_real_asl.py` with its origin. Assumed values: BackgroundSuppression false
for the 2D PASL and 2D pCASL runs; LabelingDuration of the 3D pCASL (1.5088 s, as the 2D run; dcm2niix writes
this run's PLD as its LabelingDuration). The 3D pCASL run's unpaired control (its volume 1) is left out.
`LICENSE-dcm_qa_asl.txt`: BSD-2-Clause (Chris Rorden 2019), redistribution with the notice.
""",
    "svb_models_asl": """
The Oxford run's field strength, background suppression and TR are assumed (its EchoTime is not known).
`LICENSE-svb_models_asl.txt`: Apache-2.0, redistribution with the notice.
""",
    "dcm_qa_philips_asl": """
The two Philips runs are scans of a phantom (no perfusion: control - label is noise and subtraction
artefact). Parameters come from dcm_qa_philips_asl's protocol printouts (`In/20x_pCASL.txt`,
`In/40x_3D_pCASL_6mm.txt`) and dcm2niix's JSON; control and label alternate per dynamic, control first (each
instance's MRImageLabelType). Assumed values: LabelingDuration 1.65 s (the Philips default; not recorded),
BackgroundSuppression false for the 2D run and true for the 3D run (its first dynamic has 2.4x the others'
signal; that dynamic is left out). The 2D run's SliceTiming is not recorded. `LICENSE-dcm_qa_philips_asl.txt`:
BSD-2-Clause (Paul S. Morgan and Chris Rorden 2021), redistribution with the notice.
""",
}


def readme_row(subject: str, run: Run, out_dir: Path) -> str:
    """One README table row, with matrix and voxel size read from the written image."""
    header = nib.load(out_dir / f"sub-{subject}" / "perf" / f"sub-{subject}_asl.nii.gz").header
    matrix = "x".join(str(n) for n in header.get_data_shape()[:3])
    voxel = "x".join(f"{v:.3g}" for v in header.get_zooms()[:3])
    repo = SOURCES[run.source].url.removeprefix("https://github.com/")
    path = f"`{run.image}`" + (f" (+ `{Path(run.m0_image).name}`)" if run.m0_image else "")
    path += " (+ mask)" if run.mask else ""
    m0 = run.sidecar["M0Type"] + (" (volume 0)" if run.head == ("m0scan",) else "")
    return f"| {subject} | {repo} {path} | {run.sequence} | {matrix} / {voxel} | {pairs_text(run)} | {m0} |\n"


def present_subjects(out_dir: Path) -> dict[str, Run]:
    """Subjects already written, so that runs made one source at a time share one README."""
    return {s: r for s, r in RUNS.items() if (out_dir / f"sub-{s}" / "perf" / f"sub-{s}_asl.nii.gz").is_file()}


def write_dataset_files(out_dir: Path, roots: dict[str, Path]) -> None:
    """dataset_description.json, README.md and the licence of each source present."""
    present = present_subjects(out_dir)
    sources = [name for name in SOURCES if name in {run.source for run in present.values()}]
    for name in sources:
        if name in roots:
            shutil.copyfile(roots[name] / "LICENSE", out_dir / f"LICENSE-{name}.txt")
    phantom_only = all(run.phantom for run in present.values())
    write_json(out_dir / "dataset_description.json", dataset_description(sources, phantom_only))
    head = README_HEAD.format(
        title="Real ASL phantom runs for no-harm checks"
        if phantom_only
        else "Real ASL runs for training and validation",
        dcm2niix=TESTED_DCM2NIIX,
        commits=", ".join(f"{name} at {SOURCES[name].tested_commit[:7]}" for name in sources),
        use=" ".join(
            text
            for text, wanted in (
                (README_USE, not phantom_only),
                (README_USE_PHANTOM, any(r.phantom for r in present.values())),
            )
            if wanted
        ),
    )
    rows = "".join(readme_row(s, r, out_dir) for s, r in present.items())
    (out_dir / "README.md").write_text(head + rows + "".join(README_NOTES[name] for name in sources))


# ---------------------------------------------------------------- command line ----
def convert(roots: dict[str, Path | None], out_dir: Path, subjects: Sequence[str] | None = None) -> list[str]:
    """Convert the chosen subjects whose source was given; return the subjects written."""
    runs = select_runs(subjects)
    given = {name: check_source_dir(name, path) for name, path in roots.items() if path is not None}
    if not given:
        raise ConvertError(f"give at least one of {', '.join('--' + name for name in SOURCES)} (paths of local clones)")
    for name in SOURCES:
        skipped = [s for s, r in runs.items() if r.source == name and name not in given]
        if skipped:
            print(f"skipping {', '.join('sub-' + s for s in skipped)}: no --{name} given")
    todo = {s: r for s, r in runs.items() if r.source in given}
    check_sources(todo, given)
    for name, root in given.items():
        warn_if_untested(name, root)
    out_dir.mkdir(parents=True, exist_ok=True)
    for subject, run in todo.items():
        print(f"sub-{subject}: {SOURCES[run.source].url.removeprefix('https://github.com/')} {run.image}")
        convert_subject(subject, run, given[run.source], out_dir)
    write_dataset_files(out_dir, given)
    return list(todo)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dcm_qa_asl", type=Path, help="local clone of github.com/neurolabusc/dcm_qa_asl")
    parser.add_argument("--svb_models_asl", type=Path, help="local clone of github.com/physimals/svb_models_asl")
    parser.add_argument(
        "--dcm_qa_philips_asl", type=Path, help="local clone of github.com/neurolabusc/dcm_qa_philips_asl (phantom)"
    )
    parser.add_argument("--output_dir", type=Path, default=Path("data/real-asl"), help="BIDS root to write")
    parser.add_argument("--subjects", nargs="+", metavar="NAME", help=f"subset of: {' '.join(RUNS)}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the converter; one-line errors on stderr and exit status 1 for problems the user can fix."""
    args = parse_args(argv)
    roots = {name: getattr(args, name) for name in SOURCES}
    try:
        written = convert(roots, args.output_dir, args.subjects)
    except ConvertError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} subject(s) to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
