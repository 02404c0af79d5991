"""Issue 18, output and run side: a series is complete or absent, runs never delete what they did not
write, a killed batch resumes, the output folder is checked before any work, failures and counts are
true, progress is shown, derivatives are BIDS-valid, the bundle lists its imports, effective pairs
read k for the k-pair mean, and the deploy app goes on past a bad series. Each test was seen to fail
on the code before the change (or could not run on it: the function it tests did not exist).

Validating an output folder with the BIDS validator
---------------------------------------------------
The npm package ``bids-validator`` 1.15 holds two validators. Its ``bids-validator`` command is the
legacy one, which validates every folder as raw data: on any derivatives-only folder its one error
is SUBJECT_FOLDERS ("no subject folders"), whatever the files are named; with the ``.bidsignore``
this bundle writes it reports nothing else. The schema-based validator, which knows derivative data
sets (``DatasetType: derivative``), is shipped in the same package as a Deno bundle; Deno comes from
npm too. The command (exit status 0 = no errors)::

    npm install -g bids-validator@1.15.0 deno
    deno run -A "$(npm root -g)/bids-validator/dist/validator/bids-validator.js" outputs/default

On the quickstart's output it reports 0 errors and warnings only for what a derivative data set may
leave out (README, Authors, BIDS's own "Description" recommendation for dataset_description.json).
``test_bids_validator_accepts_outputs`` runs it when ``bids-validator`` and ``deno`` are on PATH.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import fnmatch
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from asl_enhance import outputs, writers
from asl_enhance.bids import ASLInputError, find_asl_series, load_asl_series
from asl_enhance.evaluation import ASLEvaluationWriter
from asl_enhance.failures import check_output_dir_or_exit, exit_status, process_each_series
from asl_enhance.metrics import MeanErrorCurve, mean_error_curve, nmse_corrected, pairs_for_error
from asl_enhance.transforms import LoadASLSeriesd, NormalizeASLd, SelectPairsd
from asl_enhance.writers import ASLOutputWriter, write_deltam_maps
from helpers import BUNDLE, CONFIGS, EVALUATE, ROOT, phantom_series, run_in_process, write_phantom_dataset, write_series
from monai.bundle import ConfigParser

SHAPE = (12, 10, 4)


# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A freshly initialised network (never the shipped model.pt)."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "init.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


def _dataset(root: Path, count: int = 2, num_pairs: int = 3) -> Path:
    """``count`` small phantom series sub-00.. with an M0 volume each (so CBF and QC are written)."""
    return write_phantom_dataset(root, count, SHAPE, num_pairs=num_pairs)


def _infer(data: Path, out: Path, weights: Path, **override) -> int:
    return run_in_process("inference.json", data, out, weights, **override)


def _files(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()}


def _item(data: Path, stem: str = "sub-00", num_pairs: int = 2) -> dict:
    """An inference data item as the bundle's transforms make it, with a stand-in network output."""
    (item,) = [i for i in find_asl_series(data) if i["stem"] == stem]
    for transform in (LoadASLSeriesd("asl", num_pairs=num_pairs), SelectPairsd("pairs"), NormalizeASLd()):
        item = transform(item)
    item["pred"] = item["input_mean"] * 0.9
    return item


def _engine(*items: dict) -> SimpleNamespace:
    return SimpleNamespace(state=SimpleNamespace(batch=list(items), output=[{} for _ in items]))


# ------------------------------------------------------------------ 1. complete or absent, concurrent runs


def test_failed_run_never_deletes_what_another_run_wrote(tmp_path, monkeypatch):
    """Run B fails (disk full) while run A finishes the same series: A's files stay, complete. Before,
    B's cleanup deleted every file of the series that had appeared during its write, A's included."""
    data, out = _dataset(tmp_path / "data", 1), tmp_path / "out"
    item = _item(data)
    run_a, run_b = ASLOutputWriter(str(out)), ASLOutputWriter(str(out), overwrite=False)
    real, raced = writers.write_nifti, []

    def disk_full_after_a_finishes(path, data, affine):
        if raced:
            return real(path, data, affine)
        raced.append(path)
        raced.append(run_a.write_series(item))  # the other run publishes the whole series meanwhile
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(writers, "write_nifti", disk_full_after_a_finishes)
    engine = _engine(item)
    run_b(engine)
    folder = out / "sub-00" / "perf"
    assert len(raced) == 2 and all(p.is_file() for p in raced[1])  # every file run A published is still there
    assert outputs.series_complete(folder, writers.marker_name("sub-00"))
    assert len(engine.state.asl_failures) == 1 and "No space left" in engine.state.asl_failures[0]
    assert not [p for p in out.iterdir() if p.name.startswith(outputs.STAGING_PREFIX)]  # B's folder is gone


def test_publishing_rolls_back_only_its_own_files(tmp_path, monkeypatch):
    """A publish that fails half way removes the files it moved, except one another run has replaced
    meanwhile (a different inode), and a series without its marker reads as incomplete."""
    staged, dest = tmp_path / "stage", tmp_path / "dest"
    staged.mkdir()
    for name in ("s_desc-a_x.nii.gz", "s_desc-b_x.nii.gz", "s_desc-c_x.nii.gz"):
        (staged / name).write_text(name)
    outputs.write_json(staged / "s_marker.json", {})
    real, moves = os.replace, []

    def failing_replace(src, dst):
        if Path(dst).parent != dest:  # writing the marker's file list (atomic_write) is not publishing
            return real(src, dst)
        moves.append(dst)
        if len(moves) == 2:  # after the first file landed, another run replaces it (as it publishes) ...
            other = tmp_path / "other_run_file"
            other.write_text("the other run's file")
            real(other, moves[0])
        if len(moves) == 3:  # ... and the third move fails
            raise OSError(errno.EIO, "I/O error")
        real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", failing_replace)
    with pytest.raises(OSError):
        outputs.publish_series(staged, dest, "s_marker.json", replace=False)
    assert sorted(p.name for p in dest.iterdir()) == ["s_desc-a_x.nii.gz"]
    assert (dest / "s_desc-a_x.nii.gz").read_text() == "the other run's file"
    assert not outputs.series_complete(dest, "s_marker.json")


def _dead_pid() -> int:
    """A pid no process can have: above the kernel's largest."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    return 2**22 + 1


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path):
    """What a killed run left (its staging folder, hidden .partial files, also an older version's
    pid-less one) is removed by the next run; a live run's files and anything newer are kept."""
    out = tmp_path / "out"
    perf = out / "sub-01" / "perf"
    perf.mkdir(parents=True)
    dead, live = _dead_pid(), os.getpid()
    old = time.time() - 3600
    stale = [
        out / f"{outputs.STAGING_PREFIX}{dead}-abc" / "sub-01" / "perf" / "sub-01_desc-mean_deltam.nii.gz",
        perf / ".sub-01_qc.png.k2j3.partial.png",  # written by a version without pids in the name
        out / f".dataset_description.json.{dead}-q1w2.partial",
    ]
    kept = [
        out / f"{outputs.STAGING_PREFIX}{live}-def" / "x.nii.gz",  # a live run
        perf / f".sub-01_desc-enhanced_deltam.json.{live}-z9.partial",
        perf / "sub-01_desc-mean_deltam.nii.gz",  # a finished output
    ]
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
        os.utime(path, (old, old))
        os.utime(path.parent, (old, old))
    newer = out / f"{outputs.STAGING_PREFIX}{dead}-new"  # appeared after this run started: not judged
    check_output_dir_or_exit(out)
    newer.mkdir()
    assert not any(p.exists() for p in stale)
    assert not (out / f"{outputs.STAGING_PREFIX}{dead}-abc").exists()
    assert all(p.exists() for p in kept) and newer.exists()


KILLED_PUBLISH = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {bundle!r})
from asl_enhance import outputs
real, moved = os.replace, []
def replace_then_die(src, dst):
    real(src, dst)
    if Path(dst).parent == Path({dest!r}):
        moved.append(dst)
    if len(moved) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
outputs.os.replace = replace_then_die
with outputs.stage_series({out!r}) as stage:
    (stage / "sub-00" / "perf").mkdir(parents=True)
    for name in ("sub-00_desc-mean_deltam.nii.gz", "sub-00_desc-mean_deltam.json", "sub-00_qc.png"):
        (stage / "sub-00" / "perf" / name).write_text("killed run")
    outputs.write_json(stage / "sub-00" / "perf" / "sub-00_desc-enhanced_deltam.json", {{}})
    outputs.publish_series(stage / "sub-00" / "perf", Path({dest!r}), "sub-00_desc-enhanced_deltam.json", False)
"""


@pytest.mark.slow
def test_kill_9_while_publishing_then_resume(tmp_path):
    """A run killed with SIGKILL after two of a series' files were published leaves an incomplete
    series (no marker) and its staging folder; the next run with skip_existing removes the folder,
    redoes the series and leaves it complete."""
    data, out = _dataset(tmp_path / "data", 1), tmp_path / "out"
    dest = out / "sub-00" / "perf"
    code = KILLED_PUBLISH.format(bundle=str(BUNDLE), out=str(out), dest=str(dest))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert len(list(dest.iterdir())) == 2 and not outputs.series_complete(dest, writers.marker_name("sub-00"))
    (leftover,) = [p for p in out.iterdir() if p.name.startswith(outputs.STAGING_PREFIX)]
    old = time.time() - 60
    os.utime(leftover, (old, old))
    writer = ASLOutputWriter(str(out), overwrite=False, skip_existing=True, dataset_dir=str(data))
    assert not leftover.exists()
    engine = _engine(_item(data))
    writer(engine)
    assert not getattr(engine.state, "asl_failures", [])
    assert outputs.series_complete(dest, writers.marker_name("sub-00"))
    assert "killed run" not in (dest / "sub-00_qc.png").read_bytes().decode("latin-1")


# ------------------------------------------------------------------------------ 2. skip_existing, resume


def test_skip_existing_keeps_complete_series_and_redoes_incomplete_ones(tmp_path, capsys):
    data, out = _dataset(tmp_path / "data", 2), tmp_path / "out"
    first = ASLOutputWriter(str(out))
    for stem in ("sub-00", "sub-01"):
        first.write_series(_item(data, stem))
    complete, broken = out / "sub-00" / "perf", out / "sub-01" / "perf"
    before = {p: p.stat().st_mtime_ns for p in complete.iterdir()}
    (broken / "sub-01_qc.png").unlink()  # as a killed run of an older version left it
    capsys.readouterr()

    refused = ASLOutputWriter(str(out), overwrite=False)  # neither asked: an existing output is refused
    engine = _engine(_item(data, "sub-00"))
    refused(engine)
    assert "output exists" in engine.state.asl_failures[0]

    resume = ASLOutputWriter(str(out), overwrite=False, skip_existing=True)
    engine = _engine(_item(data, "sub-00"), _item(data, "sub-01"))
    resume(engine)
    assert not getattr(engine.state, "asl_failures", [])
    assert {p: p.stat().st_mtime_ns for p in complete.iterdir()} == before  # untouched
    assert resume.series_skipped == ["sub-00/perf/sub-00"] and resume.series_written == ["sub-01/perf/sub-01"]
    assert outputs.series_complete(broken, writers.marker_name("sub-01")) and (broken / "sub-01_qc.png").is_file()
    printed = capsys.readouterr().out
    assert "sub-00/perf/sub-00: skipped, outputs complete" in printed
    files = len(list(broken.iterdir()))
    assert f"sub-01/perf/sub-01: written, {files} files (incomplete outputs redone)" in printed


def test_skip_existing_neither_loads_nor_enhances_a_complete_series(tmp_path, weights, capsys, monkeypatch):
    """A resumed batch costs only what is missing: complete series leave the data list before loading,
    so the network runs once per series still to do, and a run with nothing left ends cleanly."""
    data, out = _dataset(tmp_path / "data", 3), tmp_path / "out"
    assert _infer(data, out, weights) == 0
    (out / "sub-01" / "perf" / "sub-01_desc-enhanced_deltam.json").unlink()  # sub-01 incomplete
    loaded = []
    original = LoadASLSeriesd.__call__
    monkeypatch.setattr(LoadASLSeriesd, "__call__", lambda self, d: loaded.append(d["stem"]) or original(self, d))
    capsys.readouterr()
    assert _infer(data, out, weights, skip_existing="true") == 0
    printed = capsys.readouterr().out
    assert loaded == ["sub-01"]
    assert "[skipped] sub-00/perf/sub-00: outputs complete" in printed and "sub-02/perf/sub-02" in printed
    assert "[1/1] sub-01/perf/sub-01: written" in printed and "skipped 2 already complete" in printed
    assert outputs.series_complete(out / "sub-01" / "perf", writers.marker_name("sub-01"))

    loaded.clear()
    assert _infer(data, out, weights, skip_existing="true") == 0  # nothing left: no empty-run error
    assert loaded == [] and "Enhanced 0 series" in capsys.readouterr().out
    assert (out / "dataset_description.json").is_file()


def test_a_run_that_wrote_no_series_leaves_no_data_set_files(tmp_path):
    """Every series failed: no lone dataset_description.json (a description of nothing); a folder that
    already holds earlier outputs keeps its description up to date."""
    out = tmp_path / "out"
    writers.ASLOutputWriter(str(out)).finish()
    assert not out.exists() or not any(out.iterdir())
    out.mkdir(exist_ok=True)
    (out / "dataset_description.json").write_text(
        json.dumps({"Name": "ASL bundle outputs", "DatasetType": "derivative"})
    )
    writers.ASLOutputWriter(str(out), bundle_version="9.9").finish()
    assert json.loads((out / "dataset_description.json").read_text())["GeneratedBy"][0]["Version"] == "9.9"


def test_tissue_table_keeps_rows_of_series_this_run_did_not_write(tmp_path):
    """A resumed run (or one over a subset) adds its rows to cbf_tissue.tsv instead of dropping the
    earlier runs' rows; a series it wrote again has only its new rows."""
    out = tmp_path / "out"
    out.mkdir()
    row = dict.fromkeys(writers.TISSUE_COLUMNS, "1.0")
    earlier = [{**row, "series": "sub-09/perf/sub-09", "method": "mean"}, {**row, "series": "sub-00/perf/sub-00"}]
    table = "\t".join(writers.TISSUE_COLUMNS) + "\n" + "".join("\t".join(r.values()) + "\n" for r in earlier)
    (out / writers.TISSUE_TABLE).write_text(table)
    writer = ASLOutputWriter(str(out))
    writer.tissue_rows = [{**row, "series": "sub-00/perf/sub-00", "method": "enhanced", "gm_cbf_mean": "2.0"}]
    writer.write_dataset_files()
    lines = (out / writers.TISSUE_TABLE).read_text().splitlines()
    assert len(lines) == 3 and lines[1].startswith("sub-09/perf/sub-09\tmean") and "\tenhanced\t2.0" in lines[2]


def test_skip_existing_is_a_config_option():
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    assert parser.get("skip_existing") is False and "skip_existing" in parser.get("_comments_")
    writer = parser.get("writer")
    assert writer["skip_existing"] == "$str(@skip_existing).strip().lower() in ('1', 'true', 'yes')"
    assert writer["dataset_dir"] == "@dataset_dir"  # so the output folder is checked before any work


# ------------------------------------------------------------------------- 3. the output folder, checked


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_in_the_input_data_set_is_refused_before_any_work(tmp_path, weights, capsys, where):
    data = _dataset(tmp_path / "data", 1)
    raw = json.dumps({"Name": "raw", "BIDSVersion": "1.9.0"})
    (data / "dataset_description.json").write_text(raw)
    before = _files(data)
    out = data if where == "same" else data / "results"
    assert _infer(data, out, weights) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "input data set" in errors[0]
    assert "[1/1]" not in captured.out  # no series ran
    assert _files(data) == before and (data / "dataset_description.json").read_text() == raw


def test_output_dir_checks(tmp_path):
    data = _dataset(tmp_path / "data", 1)
    assert outputs.output_dir_problem(data / "derivatives" / "asl", data) is None  # BIDS's place
    foreign = tmp_path / "fmriprep"
    foreign.mkdir()
    (foreign / "dataset_description.json").write_text(json.dumps({"DatasetType": "derivative"}))
    assert "another pipeline" in outputs.output_dir_problem(foreign, data)
    (foreign / "dataset_description.json").write_text(json.dumps({"Name": "raw"}))
    assert "raw data set" in outputs.output_dir_problem(foreign, data)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert "cannot be written" in outputs.output_dir_problem(blocker / "out", data)
    if os.geteuid() != 0:  # root writes into read-only folders
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        assert "cannot be written" in outputs.output_dir_problem(locked, data)


def test_unwritable_output_fails_at_once_in_one_line(tmp_path, weights, capsys):
    """Before, every series went through the network and then a traceback came."""
    data = _dataset(tmp_path / "data", 2)
    (tmp_path / "a_file").write_text("x")
    assert _infer(data, tmp_path / "a_file" / "out", weights) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"ERROR: {tmp_path / 'a_file' / 'out'}: ")
    assert "cannot be written" in errors[0] and "[1/2]" not in captured.out


# ----------------------------------------------------------- 4, 5, 10. failure lines, true counts, progress


def test_disk_full_names_every_series_and_counts_nothing(tmp_path, weights, capsys, monkeypatch):
    data, out = _dataset(tmp_path / "data", 2), tmp_path / "out"

    def disk_full(path, *args):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(writers, "write_nifti", disk_full)
    assert _infer(data, out, weights) == 1
    captured = capsys.readouterr()
    for stem in ("sub-00", "sub-01"):
        asl = data / stem / "perf" / f"{stem}_asl.nii.gz"
        assert f"  FAILED {asl}: outputs not written: [Errno 28] No space left on device" in captured.err
    assert "Enhanced 0 series" in captured.out
    assert not [p for p in out.rglob("*") if "sub-0" in str(p.relative_to(out))]


def test_progress_lines_and_true_file_counts(tmp_path, weights, capsys):
    data, out = _dataset(tmp_path / "data", 2, num_pairs=5), tmp_path / "out"
    assert _infer(data, out, weights, num_pairs=2) == 0
    printed = capsys.readouterr().out
    for i, stem in enumerate(("sub-00", "sub-01"), 1):
        files = len(list((out / stem / "perf").iterdir()))
        assert re.search(rf"^\[{i}/2\] {stem}/perf/{stem}: written, {files} files \(\d+\.\d s\)$", printed, re.M)
    written = len(_files(out))  # the summary counts what is there: series files and data set files
    assert f"Enhanced 2 series ({written} files written)" in printed
    series_files = sum(len(list((out / stem / "perf").iterdir())) for stem in ("sub-00", "sub-01"))
    assert written == series_files + 2  # dataset_description.json, .bidsignore (no tissue maps, no tsv)
    assert run_in_process(EVALUATE, data, tmp_path / "eval", weights, num_pairs=2) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^\[1/2\] sub-00/perf/sub-00: scored, 2 groups \(\d+\.\d s\)$", printed, re.M)
    assert re.search(r"^\[2/2\] sub-01/perf/sub-01: scored, 2 groups \(\d+\.\d s\)$", printed, re.M)


# ------------------------------------------------------------------------------ 6. BIDS-valid derivatives

#: BIDS entities in the order file names must give them (those a BIDS-ASL series' name may carry)
ENTITY_ORDER = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo", "part", "space", "res", "desc")


def _ignored(relative: Path, patterns: list[str]) -> bool:
    """Whether .bidsignore ``patterns`` (gitignore style: '/x' anchored at the root, else any name) cover a file."""
    for pattern in patterns:
        if pattern.startswith("/"):
            if fnmatch.fnmatch(relative.as_posix(), pattern[1:]):
                return True
        elif fnmatch.fnmatch(relative.name, pattern):
            return True
    return False


def check_bids_derivative(out: Path, data: Path) -> None:
    """The naming rules the outputs rely on to pass the BIDS validator, checked without it."""
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "asl_bundle"
    raw_uri = data.resolve().as_uri()
    assert description["DatasetLinks"] == {"raw": raw_uri} and description["SourceDatasets"][0]["URL"] == raw_uri
    patterns = [line.strip() for line in (out / ".bidsignore").read_text().splitlines() if line.strip()]
    for relative in sorted(_files(out)):
        if relative.name in ("dataset_description.json", ".bidsignore"):
            continue
        assert _ignored(relative, patterns), f"{relative}: neither a BIDS derivative name nor in .bidsignore"
        if len(relative.parts) == 1:
            continue
        folders = relative.parts[:-1]
        assert folders[0].startswith("sub-") and folders[-1] == "perf", relative
        *entities, last = relative.name.split("_")
        suffix = last.split(".", 1)[0]
        assert re.fullmatch(r"[a-zA-Z0-9]+", suffix), relative
        keys = [e.split("-", 1)[0] for e in entities]
        assert all(re.fullmatch(r"[a-z]+-[a-zA-Z0-9]+", e) for e in entities), relative
        assert keys == sorted(keys, key=ENTITY_ORDER.index), f"{relative}: entities out of BIDS order"
        assert entities[0] == folders[0] and (len(folders) < 3 or entities[1] == folders[1]), relative
        if relative.suffix == ".json":
            sidecar = json.loads((out / relative).read_text())
            for uri in sidecar.get("Sources", []):
                dataset, path = re.fullmatch(r"bids:(raw|):(.+)", uri).groups()
                assert (data if dataset == "raw" else out).joinpath(path).is_file(), uri
            if "_cbf" in relative.name:
                assert sidecar["Units"] == "mL/100 g/min"
    assert "ml/100g/min" not in "".join(p.read_text() for p in out.rglob("*.json"))


@pytest.fixture(scope="module")
def quickstart_like(tmp_path_factory, weights) -> tuple[Path, Path]:
    """Outputs of an inference run as the quickstart makes them (series with M0, tissue maps in
    derivatives/, 2 of 5 pairs), on two series, in-process."""
    root = tmp_path_factory.mktemp("quickstart")
    data, out = _dataset(root / "data", 2, num_pairs=5), root / "out"
    (data / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.9.0", "License": "CC0"}))
    volumes, types, _ = phantom_series(SHAPE, num_pairs=3, m0_volumes=0, seed=4)
    write_series(data / "sub-02" / "ses-1" / "perf", "sub-02_ses-1_run-1", volumes, types, m0=volumes[..., 0] + 50)
    assert _infer(data, out, weights, num_pairs=2) == 0
    return data, out


def test_outputs_follow_bids_derivative_rules(quickstart_like):
    """Before: no .bidsignore, units ml/100g/min, Sources as plain paths, no DatasetLinks/SourceDatasets."""
    data, out = quickstart_like
    check_bids_derivative(out, data)
    sidecar = json.loads((out / "sub-02/ses-1/perf/sub-02_ses-1_run-1_desc-mean_deltam.json").read_text())
    assert sidecar["Sources"] == [
        "bids:raw:sub-02/ses-1/perf/sub-02_ses-1_run-1_asl.nii.gz",
        "bids:raw:sub-02/ses-1/perf/sub-02_ses-1_run-1_m0scan.nii.gz",
    ]
    assert json.loads((out / "dataset_description.json").read_text())["License"] == "CC0"


def _schema_validator() -> list[str] | None:
    """``deno run -A <bids-validator package>/dist/validator/bids-validator.js``, or None."""
    legacy, deno = shutil.which("bids-validator"), shutil.which("deno")
    if not legacy or not deno:
        return None
    script = Path(legacy).resolve().parents[1] / "dist" / "validator" / "bids-validator.js"
    return [deno, "run", "-A", str(script)] if script.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_schema_validator() is None, reason="needs bids-validator 1.15 (npm) and deno on PATH")
def test_bids_validator_accepts_outputs(quickstart_like):
    data, out = quickstart_like
    result = subprocess.run([*_schema_validator(), "--json", str(out)], capture_output=True, text=True, timeout=600)
    report = json.loads(result.stdout)
    errors = [i for i in report["issues"]["issues"] if i["severity"] == "error"]
    assert result.returncode == 0 and not errors, errors
    legacy = subprocess.run(["bids-validator", "--json", str(out)], capture_output=True, text=True, timeout=600)
    legacy_errors = {e["code"] for e in json.loads(legacy.stdout)["issues"]["errors"]}
    assert legacy_errors == {45}  # SUBJECT_FOLDERS: it knows no derivatives; no NOT_INCLUDED (code 1)


# ------------------------------------------------------------------------------ 7. metadata lists imports

#: import names whose distribution is named otherwise, and those metadata.json covers by its own keys
DISTRIBUTION_KEYS = {"monai": "monai_version", "torch": "pytorch_version", "numpy": "numpy_version"}


def _third_party_imports(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("asl_enhance", "__future__")}


def test_metadata_lists_every_import_of_the_bundle():
    """Before, matplotlib was missing (the bundle alone failed with ModuleNotFoundError). The zoo's
    schema still requires the deprecated optional_packages_version, which MONAI renames to
    required_packages_version when it reads the file: both must hold the same packages."""
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    assert metadata["optional_packages_version"] == metadata["required_packages_version"]
    listed = {name.lower() for name in metadata["required_packages_version"]}
    distributions = importlib.metadata.packages_distributions()
    imports = _third_party_imports(BUNDLE / "asl_enhance")
    assert {"matplotlib", "nibabel", "ignite"} <= imports
    for name in sorted(imports):
        if name in DISTRIBUTION_KEYS:
            assert DISTRIBUTION_KEYS[name] in metadata, name
            continue
        candidates = {d.lower() for d in distributions.get(name, [name])}
        assert candidates & listed, f"import {name} ({sorted(candidates)}) not in required_packages_version"


# ------------------------------------------------------------------------------ 8. effective pairs


def _series_effective_pairs(k: int, seed: int, corrupted: tuple[int, ...] = ()) -> dict:
    """evaluation.csv's row of the plain k-pair mean on a synthetic 40-pair series with independent
    pairs (``corrupted``: pairs given 6x the noise, as motion does)."""
    rng = np.random.default_rng(seed)
    truth = 1.0 + rng.random((16, 16, 8)).astype(np.float32)
    pairs = truth + rng.normal(0.0, 2.0, (40, *truth.shape)).astype(np.float32)
    for index in corrupted:
        pairs[index] += rng.normal(0.0, 12.0, truth.shape).astype(np.float32)
    mask = np.ones(truth.shape, np.float32)
    writer = ASLEvaluationWriter("/nonexistent", methods=("mean",))
    for item in SelectPairsd(num_input_pairs=k, mode="groups", target="other", max_groups=4)({"pairs": pairs}):
        item.update(pred=item["input_mean"], mask=mask, affine=np.eye(4), rel_dir="sub-01/perf", stem="sub-01")
        writer.rows += writer.score_series(item)
    (row,) = writer.series_rows()
    return row


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_effective_pairs_of_the_k_pair_mean_is_k(k, seed):
    row = _series_effective_pairs(k, seed)
    assert row["effective_pairs"] == pytest.approx(k, rel=0.10)
    assert row["effective_pairs_min"] <= row["effective_pairs"] <= row["effective_pairs_max"]


@pytest.mark.parametrize("seed", [0, 1])
def test_effective_pairs_not_inflated_by_a_few_corrupted_pairs(seed):
    """Before, the mean pair variance (inflated by 3 corrupted pairs of 40) over the median error
    credited the plain 2-pair mean with about 7.5 pairs."""
    assert _series_effective_pairs(2, seed, corrupted=(20, 27, 33))["effective_pairs"] == pytest.approx(2, rel=0.10)


def test_mean_error_curve_and_crossing():
    rng = np.random.default_rng(5)
    pairs = 3.0 + rng.normal(0.0, 1.0, (11, 6, 6, 4))
    curve = mean_error_curve(pairs, np.ones((6, 6, 4), bool))
    assert curve.num_pairs == (1, 2, 4, 8) and curve.num_groups == (11, 5, 2, 1)  # each leaves >= 2 pairs
    assert curve.errors[0] > curve.errors[1] > curve.errors[2] > 0
    hand = MeanErrorCurve((1, 2, 4, 8), (0.8, 0.4, 0.5, 0.1), (8, 4, 2, 1))
    assert pairs_for_error(hand, 0.8) == pytest.approx(1.0)
    assert pairs_for_error(hand, 1.6) == pytest.approx(0.5)  # above the curve: 1/n from its first point
    assert pairs_for_error(hand, 0.2) == pytest.approx(2 * 4 ** (np.log(2) / np.log(4)))  # the bump at 4 is passed over
    assert pairs_for_error(hand, 0.05) == pytest.approx(16.0)  # below it: 1/n from its lowest point
    assert pairs_for_error(hand, 0.0) == float("inf") and np.isnan(pairs_for_error(hand, float("nan")))


def test_plain_mean_reads_k_when_pairs_degrade_along_the_scan():
    """Scored over the evaluation's own groups, the curve makes the plain k-pair mean exactly k pairs,
    even when later pairs are noisier (the real ds000240 scan read 4.6 for its 2-pair mean when the
    curve took the median over all 25 groups and the method over the first 4)."""
    rng = np.random.default_rng(7)
    noise_sd = np.linspace(0.5, 2.0, 40)[:, None, None, None]  # pairs get noisier along the scan
    pairs = 3.0 + noise_sd * rng.normal(0.0, 1.0, (40, 8, 8, 4))
    mask = np.ones((8, 8, 4), bool)
    k, groups = 2, 4
    reference = [np.delete(pairs, [2 * g, 2 * g + 1], axis=0) for g in range(groups)]
    errors = [
        nmse_corrected(pairs[2 * g : 2 * g + 2].mean(0), r.mean(0), r.var(0, ddof=1) / len(r), mask)
        for g, r in enumerate(reference)
    ]
    limited = mean_error_curve(pairs, mask, max_groups=groups)
    assert pairs_for_error(limited, float(np.median(errors))) == pytest.approx(k, rel=1e-6)
    assert pairs_for_error(mean_error_curve(pairs, mask), float(np.median(errors))) > 1.5 * k  # all groups: inflated


# ------------------------------------------------------------------------------ 9. the deploy app's batch


def test_deploy_batch_goes_on_past_a_bad_series_and_fails_the_run(tmp_path):
    """The deploy operators' per-series logic (plain functions, no App SDK needed): a bad sidecar fails
    its series in one line naming the file, the good series are written whole, the exit status is 1.
    Before, a failed series was logged and the app exited 0; when all failed it raised (GXF_FAILURE)."""
    data, out = _dataset(tmp_path / "data", 3), tmp_path / "out"
    bad_sidecar = data / "sub-01" / "perf" / "sub-01_asl.json"
    bad_sidecar.write_text('{"PostLabelingDelay": 1.8,')
    items = find_asl_series(data)

    def enhance_and_write(item: dict) -> list[Path]:
        series = load_asl_series(item)
        maps = {"enhanced": series.pairs.mean(axis=0) * 0.9, "mean": series.pairs.mean(axis=0)}
        affine = nib.load(item["asl"]).affine
        return write_deltam_maps(out, item, maps, affine, {"PairsUsed": list(range(1, series.num_pairs + 1))})

    written, failures = process_each_series(items, enhance_and_write)
    assert len(written) == 2 and len(failures) == 1
    assert failures[0].startswith(f"{bad_sidecar}: ") and "\n" not in failures[0]
    assert exit_status(failures) == 1 and exit_status([]) == 0
    for stem in ("sub-00", "sub-02"):
        assert outputs.series_complete(out / stem / "perf", writers.marker_name(stem))
    assert not (out / "sub-01").exists()
    sidecar = json.loads((out / "sub-00/perf/sub-00_desc-mean_deltam.json").read_text())
    assert sidecar["Sources"] == ["bids:raw:sub-00/perf/sub-00_asl.nii.gz"]

    def crashes(item: dict) -> None:
        raise RuntimeError("CUDA error: out of memory")

    _, failures = process_each_series(items[:1], crashes, "not processed")
    assert failures == [f"{items[0]['asl']}: not processed: RuntimeError: CUDA error: out of memory"]
    with contextlib.suppress(ASLInputError):
        load_asl_series(items[1])
    deploy = (ROOT / "deploy" / "operators.py").read_text() + (ROOT / "deploy" / "app.py").read_text()
    assert deploy.count("process_each_series(") == 2 and "raise SystemExit(exit_status(self.failures))" in deploy
