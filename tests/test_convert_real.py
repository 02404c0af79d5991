"""scripts/convert_real_asl.py: its parameter table gives valid BIDS-ASL sidecars and aslcontexts, it leaves out
the 3D pCASL run's unpaired control, it fails with one-line errors, and it converts real files. Needs neither
the shared data, the network, nor (except for the one DICOM test) dcm2niix."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("convert_real_asl", ROOT / "scripts" / "convert_real_asl.py")
conv = importlib.util.module_from_spec(spec)
sys.modules["convert_real_asl"] = conv  # dataclasses resolves the module of its classes
spec.loader.exec_module(conv)

SUBJECTS = [
    "prisma2dpasl",
    "prisma2dpcasl",
    "prisma2dmpld",
    "prisma3dpcasl",
    "prisma3dpasl",
    "prisma3dmpld",
    "oxfordmpld",
]  # the table of the shared data set's README
PHANTOMS = ["philips2dpcasl", "philips3dpcasl"]  # dcm_qa_philips_asl: no-harm checks only
VOLUME_TYPES = {"control", "label", "m0scan", "deltam", "cbf", "noRF"}
# EchoTime of the already subtracted Oxford run is not known (not in svb_models_asl, not in the reference).
# SliceTiming of the Philips 2D run is not in its DICOM (dcm2niix writes none).
KNOWN_GAPS = {"oxfordmpld": {"EchoTime"}, "philips2dpcasl": {"SliceTiming"}}


def required_fields(sidecar: dict) -> set[str]:
    """BIDS-ASL REQUIRED fields of an *_asl.json (BIDS 1.9, rules/sidecars/asl.yaml)."""
    need = {
        "ArterialSpinLabelingType",
        "PostLabelingDelay",
        "BackgroundSuppression",
        "M0Type",
        "TotalAcquiredPairs",
        "MagneticFieldStrength",
        "MRAcquisitionType",
        "EchoTime",
        "RepetitionTimePreparation",
    }
    if sidecar.get("MRAcquisitionType") == "2D":
        need.add("SliceTiming")
    if sidecar["ArterialSpinLabelingType"] in ("CASL", "PCASL"):
        need.add("LabelingDuration")
    if sidecar["ArterialSpinLabelingType"] == "PASL":
        need.add("BolusCutOffFlag")
        if sidecar.get("BolusCutOffFlag"):
            need |= {"BolusCutOffTechnique", "BolusCutOffDelayTime"}
    return need


def fake_slice_timing(run) -> list[float] | None:
    """dcm2niix gives SliceTiming for the 2D DICOM runs; stand in for it."""
    siemens_2d = run.source == "dcm_qa_asl" and run.sidecar["MRAcquisitionType"] == "2D"
    return [0.05 * i for i in range(20)] if siemens_2d else None


def test_table_has_the_seven_subjects_and_two_phantoms():
    assert list(conv.RUNS) == SUBJECTS + PHANTOMS
    assert {run.source for run in conv.RUNS.values()} == set(conv.SOURCES)
    assert [s for s, run in conv.RUNS.items() if run.phantom] == PHANTOMS


def test_philips_phantom_runs_are_control_first_without_their_first_dynamic():
    two_d, three_d = conv.RUNS["philips2dpcasl"], conv.RUNS["philips3dpcasl"]
    assert conv.volume_types(two_d) == ["control", "label"] * 30
    assert three_d.drop == (0, 1) and conv.volume_types(three_d) == ["control", "label"] * 7
    assert conv.asl_sidecar(three_d)["TotalAcquiredPairs"] == 7
    phantom = conv.dataset_description(["dcm_qa_philips_asl"], phantom_only=True)
    assert "no-harm" in phantom["Name"] and "training" not in phantom["Name"]
    assert phantom["License"] == "BSD-2-Clause (dcm_qa_philips_asl runs)"


@pytest.mark.parametrize("subject", SUBJECTS + PHANTOMS)
def test_sidecar_and_aslcontext_are_valid_bids_asl(subject):
    run = conv.RUNS[subject]
    sidecar = json.loads(json.dumps(conv.asl_sidecar(run, fake_slice_timing(run))))  # JSON-serialisable
    missing = required_fields(sidecar) - set(sidecar) - KNOWN_GAPS.get(subject, set())
    assert not missing, f"sub-{subject} lacks BIDS-required {missing}"
    assert sidecar["ArterialSpinLabelingType"] in ("CASL", "PCASL", "PASL")
    assert sidecar["M0Type"] in ("Separate", "Included", "Estimate", "Absent")
    assert isinstance(sidecar["BackgroundSuppression"], bool)
    assert 0 < sidecar["RepetitionTimePreparation"] < 30 and 0 < sidecar.get("EchoTime", 0.01) < 0.2  # seconds

    lines = conv.aslcontext_text(run).splitlines()
    assert lines[0] == "volume_type" and set(lines[1:]) <= VOLUME_TYPES
    types = lines[1:]
    assert types == conv.volume_types(run)
    pld = sidecar["PostLabelingDelay"]
    if isinstance(pld, list):  # per volume, one value per aslcontext row
        assert len(pld) == len(types) and all(p >= 0 for p in pld)
        assert all(p > 0 for p, t in zip(pld, types) if t != "m0scan")
    else:
        assert pld > 0 and len(run.plds) == 1
    pairs = types.count("label") if "label" in types else types.count("deltam")
    assert types.count("control") in (0, pairs) and sidecar["TotalAcquiredPairs"] == pairs
    assert (sidecar["M0Type"] == "Included") == ("m0scan" in types)
    assert (sidecar["M0Type"] == "Separate") == (run.m0_image is not None)


def test_m0scan_sidecar_points_at_its_series():
    run = conv.RUNS["prisma2dpcasl"]
    m0 = conv.m0_sidecar(run, "prisma2dpcasl")
    assert m0["IntendedFor"] == "perf/sub-prisma2dpcasl_asl.nii.gz"
    assert {"EchoTime", "RepetitionTimePreparation"} <= set(m0)  # BIDS-required for m0scan


def test_orders_and_plds_follow_the_readme():
    runs = conv.RUNS
    assert conv.volume_types(runs["prisma3dpasl"])[:2] == ["control", "label"]
    assert conv.volume_types(runs["prisma2dpasl"])[:3] == ["m0scan", "label", "control"]
    assert len(conv.volume_types(runs["prisma2dpasl"])) == 85 and len(conv.volume_types(runs["prisma2dpcasl"])) == 102
    cycled = conv.post_labeling_delay(runs["prisma2dmpld"])  # M0, then each pair at one PLD, PLDs cycling
    assert cycled[:6] == [0.0, 0.25, 0.25, 0.5, 0.5, 0.75] and len(cycled) == 97
    blocked = conv.post_labeling_delay(runs["oxfordmpld"])  # 6 blocks of 8 deltam volumes
    assert blocked == [p for p in conv.PLDS_6 for _ in range(8)]
    assert conv.post_labeling_delay(runs["prisma3dpcasl"]) == 1.2


def test_unpaired_control_is_left_out(tmp_path):
    run = conv.RUNS["prisma3dpcasl"]
    assert run.drop == (1,)
    assert conv.volume_types(run) == ["m0scan"] + ["label", "control"] * 8  # 17 volumes written of 18
    data = np.broadcast_to(np.arange(18, dtype=np.int16), (3, 2, 2, 18)).copy()
    affine = np.diag([2.5, 2.5, 3.09, 1.0])
    nib.Nifti1Image(data, affine).to_filename(tmp_path / "in.nii.gz")
    conv.write_series(tmp_path / "in.nii.gz", tmp_path / "out.nii.gz", run, "prisma3dpcasl")
    out = nib.load(tmp_path / "out.nii.gz")
    assert out.shape == (3, 2, 2, 17) and out.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asanyarray(out.dataobj)[0, 0, 0], [0, *range(2, 18)])
    np.testing.assert_allclose(out.affine, affine)


def test_wrong_volume_count_is_an_error(tmp_path):
    nib.Nifti1Image(np.zeros((2, 2, 2, 5), np.int16), np.eye(4)).to_filename(tmp_path / "in.nii.gz")
    with pytest.raises(conv.ConvertError, match="has 5 volumes, the table expects 12"):
        conv.write_series(tmp_path / "in.nii.gz", tmp_path / "out.nii.gz", conv.RUNS["prisma3dpasl"], "prisma3dpasl")


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = conv.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_missing_source_folder_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "no-clone"
    code, _, err = run_main(capsys, "--dcm_qa_asl", str(missing), "--output_dir", str(tmp_path / "out"))
    assert code == 1 and err.count("\n") == 1 and str(missing) in err and "dcm_qa_asl" in err
    code, _, err = run_main(capsys, "--output_dir", str(tmp_path / "out"))
    assert code == 1 and err.count("\n") == 1


def test_incomplete_clone_names_the_missing_path_and_writes_nothing(tmp_path, capsys):
    clone = tmp_path / "dcm_qa_asl"
    clone.mkdir()
    out = tmp_path / "out"
    code, _, err = run_main(capsys, "--dcm_qa_asl", str(clone), "--output_dir", str(out), "--subjects", "prisma3dpasl")
    assert code == 1 and err.count("\n") == 1 and str(clone / "In/PASL3D/11_pasl_3d") in err
    assert not out.exists()


def test_missing_dcm2niix_says_pip_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "dcm2niix", None)  # import fails
    monkeypatch.setattr(conv.shutil, "which", lambda name: None)
    clone = tmp_path / "dcm_qa_asl"
    (clone / "In/PASL3D/11_pasl_3d").mkdir(parents=True)
    (clone / "LICENSE").write_text("BSD 2-Clause License\n")
    code, _, err = run_main(
        capsys, "--dcm_qa_asl", str(clone), "--output_dir", str(tmp_path / "out"), "--subjects", "sub-prisma3dpasl"
    )
    assert code == 1 and err.count("\n") == 1 and "pip install dcm2niix" in err


def test_unknown_subject_is_an_error(tmp_path, capsys):
    code, _, err = run_main(capsys, "--svb_models_asl", str(tmp_path), "--subjects", "nosuch")
    assert code == 1 and "nosuch" in err and "oxfordmpld" in err


def test_oxford_run_is_copied_without_dcm2niix(tmp_path, capsys, monkeypatch):
    def no_dcm2niix() -> str:
        raise AssertionError("dcm2niix is not needed for svb_models_asl")

    monkeypatch.setattr(conv, "find_dcm2niix", no_dcm2niix)
    clone = tmp_path / "svb_models_asl"
    (clone / "scripts").mkdir(parents=True)
    (clone / "LICENSE").write_text("Apache License\nVersion 2.0\n")
    affine = np.diag([-3.4375, 3.4375, 4.95, 1.0])
    deltam = np.random.default_rng(0).normal(size=(4, 4, 24, 48)).astype(np.float32)
    nib.Nifti1Image(deltam, affine).to_filename(clone / "scripts/asldata_diff.nii.gz")
    nib.Nifti1Image(np.ones((4, 4, 24), np.int16), affine).to_filename(clone / "scripts/asldata_mask.nii.gz")
    out = tmp_path / "real-asl"
    code, stdout, err = run_main(capsys, "--svb_models_asl", str(clone), "--output_dir", str(out))
    assert code == 0, err
    assert "skipping" in stdout and "no --dcm_qa_asl given" in stdout
    perf = out / "sub-oxfordmpld" / "perf"
    assert (perf / "sub-oxfordmpld_asl.nii.gz").read_bytes() == (clone / "scripts/asldata_diff.nii.gz").read_bytes()
    assert (perf / "sub-oxfordmpld_desc-brain_mask.nii.gz").is_file()
    sidecar = json.loads((perf / "sub-oxfordmpld_asl.json").read_text())
    assert sidecar["LabelingDuration"] == 1.8 and len(sidecar["PostLabelingDelay"]) == 48
    assert (perf / "sub-oxfordmpld_aslcontext.tsv").read_text() == "volume_type\n" + "deltam\n" * 48
    assert (out / "LICENSE-svb_models_asl.txt").read_text().startswith("Apache License")
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "raw" and description["License"] == "Apache-2.0 (oxfordmpld)"
    assert "| oxfordmpld |" in (out / "README.md").read_text()


def write_dicom_series(folder: Path, volumes: np.ndarray) -> None:
    """A tiny 3D-labelled MR series, one file per slice and volume, written with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    number = 0
    for v, volume in enumerate(volumes):
        for z, plane in enumerate(volume):
            number += 1
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.Modality, ds.Manufacturer, ds.MagneticFieldStrength = "MR", "Synthetic", 3
            ds.PatientName, ds.PatientID, ds.PatientPosition = "Phantom", "0", "HFS"
            ds.StudyDate, ds.SeriesTime, ds.SeriesNumber, ds.ProtocolName = "20240101", "120000", 11, "pasl_3d"
            ds.AcquisitionNumber, ds.InstanceNumber, ds.AcquisitionTime = v + 1, number, f"1200{4 * v:02d}.000000"
            ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 3.0 * z], [1.0, 0, 0, 0, 1.0, 0]
            ds.PixelSpacing, ds.SliceThickness, ds.MRAcquisitionType = [2.5, 2.5], 3.0, "3D"
            ds.EchoTime, ds.RepetitionTime = 39.58, 3600
            ds.Rows, ds.Columns = plane.shape
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.PixelData = plane.astype(np.int16).tobytes()
            ds.save_as(folder / f"{number:04d}.dcm", enforce_file_format=True)


@pytest.mark.skipif(importlib.util.find_spec("dcm2niix") is None, reason="dcm2niix not installed (convert extra)")
@pytest.mark.skipif(importlib.util.find_spec("pydicom") is None, reason="pydicom not installed (writes the DICOM)")
def test_dicom_run_is_converted_with_dcm2niix(tmp_path, capsys, monkeypatch):
    # the real 3D PASL entry, shortened to 2 control/label pairs of a 5x4x2 phantom
    monkeypatch.setitem(conv.RUNS, "prisma3dpasl", dataclasses.replace(conv.RUNS["prisma3dpasl"], repeats=2))
    clone = tmp_path / "dcm_qa_asl"
    volumes = 1000 + np.arange(4)[:, None, None, None] * 10 + np.arange(40).reshape(1, 2, 4, 5)  # (t, z, y, x)
    write_dicom_series(clone / "In/PASL3D/11_pasl_3d", volumes)
    (clone / "LICENSE").write_text("BSD 2-Clause License\n")
    out = tmp_path / "real-asl"
    code, _, err = run_main(capsys, "--dcm_qa_asl", str(clone), "--output_dir", str(out), "--subjects", "prisma3dpasl")
    assert code == 0, err
    perf = out / "sub-prisma3dpasl" / "perf"
    image = nib.load(perf / "sub-prisma3dpasl_asl.nii.gz")
    data = np.asanyarray(image.dataobj)
    assert data.shape[3] == 4 and sorted(data.shape[:3]) == [2, 4, 5]
    np.testing.assert_allclose(data.reshape(-1, 4).mean(axis=0), volumes.reshape(4, -1).mean(axis=1))
    np.testing.assert_allclose(image.header.get_zooms()[:3], [2.5, 2.5, 3.0])
    sidecar = json.loads((perf / "sub-prisma3dpasl_asl.json").read_text())
    assert sidecar["TotalAcquiredPairs"] == 2 and sidecar["PostLabelingDelay"] == 1.99
    assert (perf / "sub-prisma3dpasl_aslcontext.tsv").read_text().split() == ["volume_type"] + ["control", "label"] * 2
    assert (out / "LICENSE-dcm_qa_asl.txt").is_file()
