"""Issue 6: every input problem is one line naming the file, a batch goes on past broken series,
exits non-zero and leaves no outputs for them; outputs are atomic, never overwritten unless asked,
never outside ``--output_dir``; plus property tests of the aslcontext and pair logic."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from asl_enhance import outputs
from asl_enhance.bids import (
    VOLUME_TYPES,
    ASLInputError,
    find_asl_series,
    form_pairs,
    load_asl_series,
    parse_num_pairs,
    read_aslcontext,
)
from asl_enhance.failures import find_series_or_exit, num_pairs_or_exit
from asl_enhance.transforms import LoadASLSeriesd, NormalizeASLd, SelectPairsd
from asl_enhance.writers import ASLOutputWriter
from helpers import AFFINE, BUNDLE, CONFIGS, ROOT, phantom_series, run_in_process, write_series
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from monai.bundle import ConfigParser
from monai.transforms import Compose

SHAPE = (12, 10, 4)


def _good(folder: Path, stem: str = "sub-01", **kw) -> Path:
    volumes, types, _ = phantom_series(SHAPE, num_pairs=3, **kw)
    return write_series(folder, stem, volumes, types)


def _item(asl: Path) -> dict:
    (item,) = [i for i in find_asl_series(asl.parent, include_incomplete=True) if i["asl"] == str(asl)]
    return item


def _error(asl: Path, **kw) -> ASLInputError:
    with pytest.raises(ASLInputError) as err:
        load_asl_series(_item(asl), **kw)
    message = str(err.value)
    assert "\n" not in message and message.startswith(err.value.path + ": ")
    return err.value


def _tsv(asl: Path) -> Path:
    return asl.with_name(asl.name.replace("_asl.nii.gz", "_aslcontext.tsv"))


# ------------------------------------------------------------------------------ single input problems


def test_missing_aslcontext(tmp_path):
    asl = _good(tmp_path)
    _tsv(asl).unlink()
    assert find_asl_series(tmp_path) == []  # discovery proper needs the aslcontext ...
    err = _error(asl)  # ... a command-line run lists it so that it fails with a line
    assert err.path == str(_tsv(asl)) and "missing" in err.problem


@pytest.mark.parametrize(
    "text,problem",
    [
        ("", "empty"),
        ("volume_type\n", "lists no volumes"),
        ("type\ncontrol\nlabel\n", "no 'volume_type' column"),
        ("volume_type\ncontrol\n\tlabel\n", "unknown volume type ''"),
        (b"\xff\xfe\x00v\x00o", "not UTF-8"),
    ],
)
def test_malformed_aslcontext(tmp_path, text, problem):
    asl = _good(tmp_path)
    (_tsv(asl).write_bytes if isinstance(text, bytes) else _tsv(asl).write_text)(text)
    err = _error(asl)
    assert err.path == str(_tsv(asl)) and problem in err.problem


@pytest.mark.parametrize("rows", [6, 8])
def test_row_count_mismatch(tmp_path, rows):
    asl = _good(tmp_path)  # 1 m0scan + 3 pairs = 7 volumes
    body = "control\nlabel\n" * ((rows - 1) // 2) + "m0scan\n" * ((rows - 1) % 2)
    _tsv(asl).write_text("volume_type\nm0scan\n" + body)
    err = _error(asl)
    assert err.path == str(_tsv(asl)) and f"lists {rows} volumes but {asl.name} has 7" in err.problem


def test_unknown_volume_type(tmp_path):
    asl = _good(tmp_path)
    _tsv(asl).write_text("volume_type\nm0scan\ncontrol\nlabel\ncontrol\nlabel\ncontrol\nLBL\n")
    err = _error(asl)
    assert "line 8: unknown volume type 'lbl'" in err.problem


@pytest.mark.parametrize(
    "types,problem",
    [(["m0scan", "m0scan"], "no control/label pairs"), (["control", "control", "label"], "2 control but 1 label")],
)
def test_no_pairs(tmp_path, types, problem):
    asl = write_series(tmp_path, "sub-01", np.ones((*SHAPE, len(types)), np.float32), types)
    assert problem in _error(asl).problem


def test_3d_file_where_4d_is_needed(tmp_path):
    asl = write_series(tmp_path, "sub-01", np.ones(SHAPE, np.float32), ["control", "label"])
    err = _error(asl)
    assert err.path == str(asl) and "must be 4D" in err.problem
    # a single deltam volume stored 3D is a valid one-volume series
    deltam = np.random.default_rng(0).uniform(1.0, 2.0, SHAPE).astype(np.float32)
    single = write_series(tmp_path / "b", "sub-02", deltam, ["deltam"])
    assert load_asl_series(_item(single)).pairs.shape == (1, *SHAPE)


@pytest.mark.parametrize("damage", ["truncated", "bad_crc", "not_gzip", "garbage_in_gzip", "empty", "short_data"])
def test_corrupt_nifti(tmp_path, damage):
    asl = _good(tmp_path)
    raw = asl.read_bytes()
    damaged = {
        "truncated": raw[: len(raw) // 2],
        "bad_crc": raw[:-8] + bytes(8),
        "not_gzip": os.urandom(2000),
        "garbage_in_gzip": gzip.compress(os.urandom(2000)),
        "empty": b"",
        "short_data": gzip.compress(gzip.decompress(raw)[:1000]),
    }[damage]
    asl.write_bytes(damaged)
    err = _error(asl)
    assert err.path == str(asl) and err.problem.startswith("cannot read NIfTI")


def test_corrupt_separate_m0(tmp_path):
    volumes, types, _ = phantom_series(SHAPE, num_pairs=2, m0_volumes=0)
    asl = write_series(tmp_path, "sub-01", volumes, types, m0=volumes[..., 0])
    m0 = tmp_path / "sub-01_m0scan.nii.gz"
    m0.write_bytes(m0.read_bytes()[:100])
    assert _error(asl).path == str(m0)


@pytest.mark.parametrize(
    "content,problem", [('{"PostLabelingDelay": 1.8,', "not valid JSON"), ("[1, 2]", "not an object")]
)
def test_corrupt_sidecar(tmp_path, content, problem):
    asl = _good(tmp_path)
    sidecar = asl.with_name("sub-01_asl.json")
    sidecar.write_text(content)
    err = _error(asl)
    assert err.path == str(sidecar) and problem in err.problem


def test_missing_sidecar_is_fine_for_deltam(tmp_path):
    asl = _good(tmp_path)
    asl.with_name("sub-01_asl.json").unlink()
    assert load_asl_series(_item(asl)).sidecar == {}


def test_sidecar_is_data_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    volumes, types, _ = phantom_series(SHAPE, num_pairs=2)
    sneaky = {
        "PostLabelingDelay": f"$__import__('pathlib').Path({str(marker)!r}).touch()",
        "LabelingDuration": "@_meta_#version",
        "_target_": "os.system",
        "M0Type": "%/etc/passwd",
    }
    asl = write_series(tmp_path, "sub-01", volumes, types, sidecar=sneaky)
    series = load_asl_series(_item(asl))
    assert series.sidecar == sneaky and not marker.exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_voxels_are_refused(tmp_path, bad):
    volumes, types, _ = phantom_series(SHAPE, num_pairs=2)
    volumes[3, 4, 1, 2] = bad
    volumes[0, 0, 0, 1] = bad
    asl = write_series(tmp_path, "sub-01", volumes, types)
    err = _error(asl)
    assert err.path == str(asl) and "2 voxels are NaN or Inf" in err.problem


@pytest.mark.parametrize("mismatch", ["shape", "affine"])
def test_mismatched_m0_geometry(tmp_path, mismatch):
    volumes, types, _ = phantom_series(SHAPE, num_pairs=2, m0_volumes=0)
    asl = write_series(tmp_path, "sub-01", volumes, types)
    m0 = np.ones(SHAPE[:2] + (SHAPE[2] + 1,) if mismatch == "shape" else SHAPE, np.float32)
    affine = AFFINE.copy() if mismatch == "shape" else np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] += 1000.0 if mismatch == "shape" else 0.0  # another grid that does not overlap: refused
    nib.save(nib.Nifti1Image(m0, affine), tmp_path / "sub-01_m0scan.nii.gz")
    err = _error(asl)
    assert err.path == str(tmp_path / "sub-01_m0scan.nii.gz") and "does not overlap the ASL series" in err.problem


@pytest.mark.parametrize("k", [0, -2, 4])
def test_num_pairs_out_of_range(tmp_path, k):
    asl = _good(tmp_path)
    err = _error(asl, num_pairs=k)
    assert err.path == str(asl) and ("positive" in err.problem if k < 1 else "only 3 pairs" in err.problem)
    d = LoadASLSeriesd(num_pairs=k, on_error="skip")(_item(asl))
    assert d["error"] == str(err)


def test_num_pairs_must_be_a_whole_number(capsys):
    """2.5 pairs is not silently 2, and "abc" is one line with exit status 2 before anything runs."""
    for value, parsed in ((None, None), ("all", None), ("", None), (3, 3), ("3", 3), (3.0, 3)):
        assert parse_num_pairs(value) == parsed
    for bad in (2.5, "abc", True, "2.5", float("nan")):
        with pytest.raises(ValueError, match="whole number"):
            LoadASLSeriesd(num_pairs=bad)
        with pytest.raises(SystemExit) as exc:
            num_pairs_or_exit(bad)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ERROR: --num_pairs: ") and err.count("\n") == 0


def test_empty_or_missing_dataset_folder(tmp_path, capsys):
    for folder in (tmp_path, tmp_path / "nope"):
        with pytest.raises(SystemExit) as exc:
            find_series_or_exit(folder)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and str(folder) in err


# ------------------------------------------------------------------------------ failed items in the chain


def test_failed_item_passes_through_chain(tmp_path):
    asl = _good(tmp_path)
    _tsv(asl).write_text("volume_type\ncontrol\n")
    chain = Compose(
        [LoadASLSeriesd(on_error="skip"), SelectPairsd(num_input_pairs=2, on_error="skip"), NormalizeASLd()]
    )
    d = chain(_item(asl))
    assert d["error"].startswith(str(_tsv(asl)))
    assert d["image"].shape[0] == 4 and np.all(d["image"] == 0) and float(d["scale"]) == 1.0
    with pytest.raises(ASLInputError):
        LoadASLSeriesd()(_item(asl))  # "raise" stays the default
    # too few pairs for the request fails in SelectPairsd the same way
    good = _good(tmp_path / "g", "sub-02")
    d = Compose([LoadASLSeriesd(on_error="skip"), SelectPairsd(num_input_pairs=5, on_error="skip"), NormalizeASLd()])(
        _item(good)
    )
    assert "needs 5 input pairs" in d["error"] and d["image"].shape == (4, 2, 2, 2)


# ------------------------------------------------------------------------------ writing


def _state_dict_path(tmp_path: Path) -> Path:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    torch.manual_seed(0)
    path = tmp_path / "init.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


def _infer(data: Path, out: Path, weights: Path, **override) -> int:
    return run_in_process("inference.json", data, out, weights, **override)


def test_existing_outputs_not_overwritten_unless_asked(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    _good(data / "sub-01" / "perf")
    weights = _state_dict_path(tmp_path)
    assert _infer(data, out, weights) == 0
    enhanced = out / "sub-01" / "perf" / "sub-01_desc-enhanced_deltam.nii.gz"
    enhanced.write_bytes(b"sentinel")
    capsys.readouterr()
    assert _infer(data, out, weights) == 1
    assert enhanced.read_bytes() == b"sentinel"
    err = capsys.readouterr().err
    series = data / "sub-01" / "perf" / "sub-01_asl.nii.gz"  # the line names the series, then the output
    assert f"FAILED {series}: output exists: {enhanced} (" in err and "--overwrite true" in err
    assert _infer(data, out, weights, overwrite="true") == 0  # as the command line passes it
    assert nib.load(enhanced).shape == SHAPE


def test_interrupted_write_leaves_no_finished_file(tmp_path, monkeypatch):
    path = tmp_path / "x_desc-mean_deltam.nii.gz"

    def killed(image, filename):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs.nib, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        outputs.write_nifti(path, np.zeros(SHAPE), np.eye(4))
    assert list(tmp_path.iterdir()) == []


def _writer_item(stem="sub-01", rel_dir="sub-01/perf") -> dict:
    zeros = np.zeros((1, *SHAPE), np.float32)
    return {
        "asl": f"/data/{rel_dir}/{stem}_asl.nii.gz", "rel_dir": rel_dir, "stem": stem, "error": "",
        "pred": zeros, "input_mean": zeros, "guide": zeros, "mask": zeros + 1, "affine": np.eye(4),
        "input_pairs": "[0]", "pair_volumes": "[[0, 1]]", "total_pairs": 1, "scale": 1.0,
        "m0_source": "absent", "guide_source": "none", "sidecar_json": "{}",
    }  # fmt: skip


def _engine(item: dict) -> SimpleNamespace:
    return SimpleNamespace(state=SimpleNamespace(batch=[item], output=[{}]))


def test_series_that_fails_midway_leaves_nothing(tmp_path, monkeypatch):
    writer = ASLOutputWriter(str(tmp_path), write_cbf=False, write_qc=False)
    calls = []

    def failing_json(path, content):
        calls.append(path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("asl_enhance.writers.write_json", failing_json)
    engine = _engine(_writer_item())
    writer(engine)
    assert calls and not [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(engine.state.asl_failures) == 1 and "No space left" in engine.state.asl_failures[0]


@pytest.mark.parametrize("rel_dir", ["../escape", "sub-01/../../escape", "/abs/escape"])
def test_outputs_never_leave_output_dir(tmp_path, rel_dir):
    out = tmp_path / "out"
    writer = ASLOutputWriter(str(out), write_cbf=False, write_qc=False)
    engine = _engine(_writer_item(rel_dir=rel_dir))
    writer(engine)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    assert "would leave the output folder" in engine.state.asl_failures[0]
    with pytest.raises(ValueError):
        outputs.safe_output_path(out, "a", "../../x.nii.gz")


def test_failed_items_are_skipped_by_the_writer(tmp_path):
    writer = ASLOutputWriter(str(tmp_path), write_cbf=False, write_qc=False)
    writer(_engine({**_writer_item(), "error": "x: broken"}))
    assert not list(tmp_path.rglob("*"))


# ------------------------------------------------------------------------------ the batch (command line)


def _bundle_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "inference.json")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        cmd + ["--bundle_root", str(BUNDLE), *args], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env
    )


@pytest.mark.slow
def test_batch_with_five_broken_series(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    volumes, types, _ = phantom_series(SHAPE, num_pairs=3)
    write_series(data / "sub-good" / "perf", "sub-good", volumes, types)
    short = write_series(data / "sub-short" / "perf", "sub-short", volumes, types)
    _tsv(short).write_text("volume_type\n" + "\n".join(types[:-2]) + "\n")
    flat = write_series(data / "sub-3d" / "perf", "sub-3d", volumes[..., 1], ["control", "label"])
    trunc = write_series(data / "sub-trunc" / "perf", "sub-trunc", volumes, types)
    trunc.write_bytes(trunc.read_bytes()[:-300])
    unknown = write_series(data / "sub-unknown" / "perf", "sub-unknown", volumes, types)
    _tsv(unknown).write_text("volume_type\n" + "\n".join(types[:-1] + ["labelled"]) + "\n")
    sidecar = write_series(data / "sub-sidecar" / "perf", "sub-sidecar", volumes, types)
    sidecar = sidecar.with_name("sub-sidecar_asl.json")
    sidecar.write_text('{"PostLabelingDelay": 1.8, "LabelingDuration": }')

    result = _bundle_cli(
        "--dataset_dir", str(data), "--output_dir", str(out), "--handlers#0#load_path", str(_state_dict_path(tmp_path))
    )
    text = result.stdout + result.stderr
    assert result.returncode != 0, text[-3000:]
    assert "Traceback" not in text
    assert (out / "sub-good" / "perf" / "sub-good_desc-enhanced_deltam.nii.gz").is_file()
    assert (out / "sub-good" / "perf" / "sub-good_desc-mean_deltam.nii.gz").is_file()
    summary = result.stderr[result.stderr.index("5 of 6 series failed") :].splitlines()
    assert len(summary) == 6
    for path in (_tsv(short), flat, trunc, _tsv(unknown), sidecar):
        assert sum(line.startswith(f"  FAILED {path}: ") for line in summary) == 1, (path, summary)
    for broken in ("sub-short", "sub-3d", "sub-trunc", "sub-unknown", "sub-sidecar"):
        assert not [p for p in (out / broken).rglob("*") if p.is_file()] if (out / broken).exists() else True
    hidden = [p for p in out.rglob("*") if p.name != ".bidsignore" and (p.name.startswith(".") or "partial" in p.name)]
    assert not hidden  # .bidsignore is the one hidden output (BIDS's name for it)


@pytest.mark.slow
def test_bad_num_pairs_cli(tmp_path):
    data = tmp_path / "data"
    _good(data)
    result = _bundle_cli("--dataset_dir", str(data), "--output_dir", str(tmp_path / "out"), "--num_pairs", "abc")
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert errors == ["ERROR: --num_pairs: num_pairs must be a whole number of pairs (or 'all'), got 'abc'"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.nii.gz"))


@pytest.mark.slow
def test_empty_dataset_folder_cli(tmp_path):
    (tmp_path / "data").mkdir()
    result = _bundle_cli("--dataset_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and errors[0].startswith(f"ERROR: {tmp_path / 'data'}: no ASL series found")


# ------------------------------------------------------------------------------ property tests

KNOWN = ("control", "label", "m0scan", "deltam")


@given(st.lists(st.sampled_from(KNOWN), min_size=1, max_size=24))
def test_form_pairs_property(types):
    controls = [i for i, t in enumerate(types) if t == "control"]
    labels = [i for i, t in enumerate(types) if t == "label"]
    deltams = [i for i, t in enumerate(types) if t == "deltam"]
    if len(controls) != len(labels) or not (controls or deltams):
        with pytest.raises(ASLInputError):
            form_pairs(types, "ctx.tsv")
        return
    pairs = form_pairs(types, "ctx.tsv")
    assert len(pairs) == len(controls) + len(deltams)
    assert [min(p) for p in pairs] == sorted(min(p) for p in pairs)  # ordered by first volume
    two = [p for p in pairs if len(p) == 2]
    assert sorted(p[0] for p in two) == controls and sorted(p[1] for p in two) == labels
    for c, lab in two:  # the i-th control goes with the i-th label
        assert controls.index(c) == labels.index(lab)
    assert sorted(p[0] for p in pairs if len(p) == 1) == deltams


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(VOLUME_TYPES), min_size=1, max_size=12),
    st.lists(st.sampled_from(["", " ", "  "]), min_size=12, max_size=12),
    st.booleans(),
    st.booleans(),
)
def test_read_aslcontext_roundtrip(types, pads, upper, extra_column):
    rows = [(pads[i] + (t.upper() if upper else t) + pads[-1 - i]) for i, t in enumerate(types)]
    header = "volume_type"
    if extra_column:
        header, rows = "index\tvolume_type", [f"{i}\t{r}" for i, r in enumerate(rows)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x_aslcontext.tsv"
        path.write_text(header + "\n" + "\n".join(rows) + "\n")
        assert read_aslcontext(path) == list(types)


@example(types=[], word='"')  # a lone quote once swallowed the next line (csv quoting)
@settings(max_examples=60)
@given(
    st.lists(st.sampled_from(VOLUME_TYPES), min_size=0, max_size=6),
    st.text(st.characters(codec="utf-8", exclude_characters="\t\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), max_size=8),
)
def test_read_aslcontext_unknown_type_names_line(types, word):
    if word.strip().lower() in VOLUME_TYPES:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x_aslcontext.tsv"
        path.write_text("volume_type\n" + "".join(t + "\n" for t in types) + (word or "?") + "\n" + "control\n")
        if not (word or "?").strip():
            return  # a blank line is skipped, not an error
        with pytest.raises(ASLInputError) as err:
            read_aslcontext(path)
        assert err.value.path == str(path) and f"line {len(types) + 2}: unknown volume type" in err.value.problem


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(KNOWN), min_size=1, max_size=10), st.integers(0, 2**31 - 1))
def test_pair_differences_property(types, seed):
    """Whatever the order, each pair is control - label of the i-th control and i-th label."""
    try:
        pairs_idx = form_pairs(types)
    except ASLInputError:
        return
    volumes = np.random.default_rng(seed).integers(1, 100, (2, 2, 1, len(types))).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        asl = write_series(tmp, "sub-01", volumes, types)
        series = load_asl_series(_item(asl))
    controls = [i for i, t in enumerate(types) if t == "control"]
    labels = [i for i, t in enumerate(types) if t == "label"]
    expected = {c: volumes[..., c] - volumes[..., lab] for c, lab in zip(controls, labels)}
    expected.update({i: volumes[..., i] for i, t in enumerate(types) if t == "deltam"})
    firsts = sorted(min(p) if len(p) == 1 else min(p) for p in pairs_idx)
    assert len(firsts) == series.num_pairs
    by_first = {min(c, lab): c for c, lab in zip(controls, labels)}
    by_first.update({i: i for i in expected if types[i] == "deltam"})
    np.testing.assert_array_equal(series.pairs, np.stack([expected[by_first[f]] for f in firsts]))
    if "m0scan" in types:
        m0 = volumes[..., [i for i, t in enumerate(types) if t == "m0scan"]].mean(axis=-1)
        np.testing.assert_allclose(series.m0, m0, rtol=1e-6)
    assert json.dumps(series.pair_volumes)
