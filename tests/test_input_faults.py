"""Issue 18, input side: every input is processed correctly or refused in one line that names the file
and the reason; never a wrong map, never a library traceback, never a hang. One group of fault tests
per item (each seen to fail on the reader before the fix), plus guards, marked as such in their
docstrings, that realistic good inputs (both pair orders, no perfusion, M0 absent) are still read and
that what was refused before stays refused."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from asl_enhance.bids import ASLInputError, find_asl_series, load_asl_series
from asl_enhance.quantification import cbf_sidecar, compute_cbf, parse_parameters, quantify_series
from helpers import AFFINE, phantom_series, write_series

SHAPE = (20, 18, 8)
PATH = "sub-01_asl.json"


def _item(asl: Path) -> dict:
    (item,) = [i for i in find_asl_series(asl.parent, include_incomplete=True) if i["asl"] == str(asl)]
    return item


def _refused(asl: Path, **kw) -> ASLInputError:
    """The one-line ASLInputError that reading ``asl`` raises."""
    with pytest.raises(ASLInputError) as err:
        load_asl_series(_item(asl), **kw)
    message = str(err.value)
    assert "\n" not in message and message.startswith(err.value.path + ": ")
    return err.value


def _context(asl: Path) -> Path:
    return asl.with_name(asl.name.replace("_asl.nii.gz", "_aslcontext.tsv"))


def _m0_path(asl: Path) -> Path:
    return asl.with_name(asl.name.replace("_asl.nii.gz", "_m0scan.nii.gz"))


def _swap_roles(types: list[str]) -> list[str]:
    return [{"control": "label", "label": "control"}.get(t, t) for t in types]


def _quantify(series, item: dict) -> object:
    """quantify_series on the plain mean, with the item keys the inference chain sets."""
    item = {
        **item,
        "sidecar_json": json.dumps(series.sidecar),
        "pair_volumes": json.dumps(series.pair_volumes),
        "input_pairs": json.dumps(list(range(series.num_pairs))),
        "m0_source": series.m0_source,
        "input_notes": json.dumps(series.notes),
    }
    return quantify_series(item, {"mean": series.pairs.mean(axis=0)}, series.m0)


# --------------------------------------------------------------- 1. control/label order swapped
@pytest.mark.parametrize("m0_volumes", [1, 0], ids=["head-from-M0", "head-from-mean-control"])
@pytest.mark.parametrize("label_first", [False, True], ids=["control-first", "label-first"])
def test_swapped_control_label_order_is_refused(tmp_path, m0_volumes, label_first):
    volumes, types, _ = phantom_series(SHAPE, num_pairs=4, m0_volumes=m0_volumes, label_first=label_first)
    asl = write_series(tmp_path / "bad", "sub-01", volumes, _swap_roles(types))
    err = _refused(asl, num_pairs=1)  # decided on every pair, whatever K
    assert err.path == str(_context(asl))
    assert "looks swapped" in err.problem and "negative inside the head in 4 of 4 pairs" in err.problem
    good = write_series(tmp_path / "good", "sub-01", volumes, types)
    assert load_asl_series(_item(good)).extra["pair_order"]["median_z"] > 5


def test_swapped_order_found_at_low_snr_with_one_pair(tmp_path):
    """One pair whose per-voxel SNR in the head is about 0.25 (below the 0.5-3 of real grey matter)."""
    volumes, types, deltam = phantom_series(SHAPE, num_pairs=1, m0_volumes=1)
    rng = np.random.default_rng(5)
    volumes[..., 1:] += rng.normal(0, 2.0 * deltam.max(), (*SHAPE, 2))
    good = write_series(tmp_path / "good", "sub-01", volumes, types)
    assert load_asl_series(_item(good)).num_pairs == 1
    bad = write_series(tmp_path / "bad", "sub-01", volumes, _swap_roles(types))
    assert "looks swapped" in _refused(bad).problem


@pytest.mark.parametrize("seed", range(8))
def test_series_without_perfusion_is_not_called_swapped(tmp_path, seed):
    """(Guard.) Control and label differ by noise only: the sign of the head mean is noise, never a refusal."""
    volumes, types, _ = phantom_series(SHAPE, num_pairs=2, m0_volumes=1, seed=seed)
    rng = np.random.default_rng(100 + seed)
    for c in [i for i, t in enumerate(types) if t == "control"]:
        volumes[..., c + 1] = volumes[..., c] + rng.normal(0, 4.0, SHAPE)
    series = load_asl_series(_item(write_series(tmp_path, "sub-01", volumes, types)))
    assert abs(series.extra["pair_order"]["median_z"]) < 5


def test_offset_that_changes_sign_between_pairs_is_kept_with_a_note(tmp_path):
    """A phantom's subtraction offset (Philips 3D run: negative in 4 of 7 pairs, median z -27) is no swap."""
    volumes, types, _ = phantom_series(SHAPE, num_pairs=7, m0_volumes=1)
    rng = np.random.default_rng(3)
    offsets = [-1.0, -1.0, 0.5, -1.0, 0.5, -1.0, 0.5]
    for offset, c in zip(offsets, [i for i, t in enumerate(types) if t == "control"]):
        volumes[..., c + 1] = volumes[..., c] - offset * np.where(volumes[..., c] > 0, 1.0, 0.0)
        volumes[..., c + 1] += rng.normal(0, 0.5, SHAPE)
    series = load_asl_series(_item(write_series(tmp_path, "sub-01", volumes, types)))
    order = series.extra["pair_order"]
    assert order["median_z"] < -5 and order["negative_pairs"] == 4
    assert any("not in most pairs as a swapped order would be" in note for note in series.notes)
    for c, t in enumerate(types):  # the same offsets in every pair: a swap, refused
        if t == "control":
            volumes[..., c + 1] = volumes[..., c] + np.where(volumes[..., c] > 0, 1.0, 0.0)
    assert "looks swapped" in _refused(write_series(tmp_path / "all", "sub-01", volumes, types)).problem


def test_sign_flipped_deltam_series_is_refused(tmp_path):
    volumes, types, _ = phantom_series(SHAPE, num_pairs=3, m0_volumes=0)
    deltam = volumes[..., 0::2] - volumes[..., 1::2]  # control first: control - label
    bad = write_series(tmp_path / "bad", "sub-01", -deltam, ["deltam"] * 3)
    err = _refused(bad)
    assert err.path == str(bad) and "look like label - control" in err.problem
    good = write_series(tmp_path / "good", "sub-01", deltam, ["deltam"] * 3)
    assert load_asl_series(_item(good)).extra["pair_order"]["reference"] == "|mean deltaM|"


# ------------------------------------------------------------------------ 2. M0 zero or negative
@pytest.mark.parametrize("where", ["included", "separate"])
@pytest.mark.parametrize("fault, words", [("zero", "M0 is zero in every voxel"), ("negative", "negative in 100%")])
def test_zero_or_negative_m0_is_refused(tmp_path, where, fault, words):
    volumes, types, _ = phantom_series(SHAPE, num_pairs=3, m0_volumes=1)
    m0 = volumes[..., 0] * (0.0 if fault == "zero" else -1.0)
    if where == "included":
        volumes[..., 0] = m0
        asl = write_series(tmp_path, "sub-01", volumes, types)
        expected = asl
    else:
        asl = write_series(tmp_path, "sub-01", volumes[..., 1:], types[1:], m0=m0)
        expected = _m0_path(asl)
    err = _refused(asl)
    assert err.path == str(expected) and words in err.problem


def test_non_finite_separate_m0_is_refused(tmp_path):
    """(Refused before the fix too; kept so the M0 item is covered whole.)"""
    volumes, types, _ = phantom_series(SHAPE, num_pairs=2, m0_volumes=1)
    m0 = volumes[..., 0].copy()
    m0[10, 9, 4] = np.nan
    asl = write_series(tmp_path, "sub-01", volumes[..., 1:], types[1:], m0=m0)
    err = _refused(asl)
    assert err.path == str(_m0_path(asl)) and "1 voxels are NaN or Inf" in err.problem


# ---------------------------------------------------------------------- 3. timings in milliseconds
BASE = {"MagneticFieldStrength": 3, "BackgroundSuppression": False, "M0Type": "Estimate", "M0Estimate": 1000.0}
TIMINGS = {
    "PCASL": {"ArterialSpinLabelingType": "PCASL", "PostLabelingDelay": 1.8, "LabelingDuration": 1.8},
    "PASL": {
        "ArterialSpinLabelingType": "PASL",
        "PostLabelingDelay": 2.0,
        "BolusCutOffFlag": True,
        "BolusCutOffDelayTime": 0.8,
    },
    "per-volume PLD": {
        "ArterialSpinLabelingType": "PCASL",
        "PostLabelingDelay": [1.8, 1.8, 1.8, 1.8],
        "LabelingDuration": 1.8,
    },
}


def _in_ms(fields: dict) -> dict:
    """The same sidecar with every timing written in milliseconds."""

    def ms(value):
        return [v * 1000 for v in value] if isinstance(value, list) else value * 1000

    keys = ("PostLabelingDelay", "LabelingDuration", "BolusCutOffDelayTime")
    return {k: ms(v) if k in keys else v for k, v in fields.items()}


@pytest.mark.parametrize("kind", list(TIMINGS))
def test_timings_in_milliseconds_are_converted_with_a_note(kind):
    types = ["control", "label"] * 2
    seconds = parse_parameters({**BASE, **TIMINGS[kind]}, PATH, 3, volume_types=types)
    millis = parse_parameters({**BASE, **_in_ms(TIMINGS[kind])}, PATH, 3, volume_types=types)
    deltam = np.full((2, 2, 3), 10.0)
    expected = compute_cbf(deltam, None, seconds)
    assert np.all(np.isfinite(expected)) and expected.max() > 50
    np.testing.assert_allclose(compute_cbf(deltam, None, millis), expected, rtol=1e-6)
    assert any("PostLabelingDelay" in n and "read as milliseconds" in n for n in millis.notes)
    assert not any("milliseconds" in n for n in seconds.notes)


def test_timing_implausible_in_both_units_is_refused():
    with pytest.raises(ASLInputError, match="PostLabelingDelay 1.8e\\+06 is not a plausible ASL timing"):
        parse_parameters({**BASE, **TIMINGS["PCASL"], "PostLabelingDelay": 1.8e6}, PATH, 3)


def test_milliseconds_end_to_end_note_in_cbf_sidecar(tmp_path):
    volumes, types, _ = phantom_series(SHAPE, num_pairs=2, m0_volumes=1)
    sidecar = {**_in_ms(TIMINGS["PCASL"]), "MagneticFieldStrength": 3, "M0Type": "Included"}
    asl = write_series(tmp_path, "sub-01", volumes, types, sidecar)
    series = load_asl_series(_item(asl))
    result = _quantify(series, _item(asl))
    head = series.m0 > 500
    cbf = result.maps["mean"][head]
    assert np.all(np.isfinite(cbf)) and 40 < np.median(cbf) < 150
    assert any("read as milliseconds" in n for n in cbf_sidecar(result.params, "d", "s")["QuantificationNotes"])


# ------------------------------------------------------------------ 4. non-finite or overflowing
def test_values_that_overflow_float32_are_refused(tmp_path):
    volumes, types, _ = phantom_series(SHAPE, num_pairs=2, m0_volumes=1)
    volumes[3, 4, 1, 2] = 3e38
    volumes[5, 5, 2, 3] = -3.2e38
    asl = write_series(tmp_path, "sub-01", volumes, types)
    err = _refused(asl)
    assert err.path == str(asl) and err.problem.startswith("2 voxels have magnitude above 1e+15")
    assert "overflows" in err.problem


def test_float64_values_beyond_float32_are_refused(tmp_path):
    """(Refused before the fix too, as Inf after the cast.)"""
    volumes, types, _ = phantom_series(SHAPE, num_pairs=2, m0_volumes=1)
    asl = write_series(tmp_path, "sub-01", volumes, types)
    big = volumes.astype(np.float64)
    big[1, 1, 1, 1] = 1e300
    nib.save(nib.Nifti1Image(big, AFFINE), asl)
    assert "1 voxels are NaN or Inf" in _refused(asl).problem


# ------------------------------------------------------------------------- 5. no signal at all
@pytest.mark.parametrize(
    "fault, words",
    [
        ("all zero", "every ASL volume holds the same value (0)"),
        ("constant", "every ASL volume holds the same value (7)"),
        ("control equals label", "every control volume equals its label"),
        ("deltam all zero", "every ASL volume holds the same value (0)"),
    ],
)
def test_series_without_signal_is_refused(tmp_path, fault, words):
    volumes, types, _ = phantom_series(SHAPE, num_pairs=3, m0_volumes=1)
    if fault == "all zero":
        volumes[..., 1:] = 0.0
    elif fault == "constant":
        volumes[..., 1:] = 7.0
    elif fault == "control equals label":
        volumes[..., 2::2] = volumes[..., 1::2]
    else:
        volumes[..., 1:] = 0.0
        types = ["m0scan"] + ["deltam"] * (len(types) - 1)
    asl = write_series(tmp_path, "sub-01", volumes, types)
    err = _refused(asl)
    assert err.path == str(asl) and words in err.problem


# ------------------------------------------------------------------------- 6. unsafe sidecars, FIFOs
class Hung(Exception):
    """Reading blocked (not an OSError, so no reader's error handling can turn it into a refusal)."""


@contextlib.contextmanager
def _no_hang(seconds: int = 10):
    """Turn a hang (opening a FIFO nobody writes) into :class:`Hung`, so a hanging reader fails."""

    def timeout(signum, frame):
        raise Hung("reading blocked on a non-regular file")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _good(folder: Path) -> Path:
    volumes, types, _ = phantom_series(SHAPE, num_pairs=2, m0_volumes=1)
    return write_series(folder, "sub-01", volumes, types)


@pytest.mark.parametrize(
    "content, words",
    [
        ('{"a": ' * 200_000 + "1" + "}" * 200_000, "nested too deeply"),
        ('{"a": ' * 100 + "1" + "}" * 100, "nested too deeply"),
        (json.dumps({"PostLabelingDelay": 1.8, "pad": "x" * (11 * 2**20)}), "larger than 10 MB"),
    ],
    ids=["200000-deep", "100-deep", "11-MB"],
)
def test_unsafe_sidecar_is_refused_in_one_line(tmp_path, content, words):
    asl = _good(tmp_path)
    sidecar = asl.with_name("sub-01_asl.json")
    sidecar.write_text(content)
    err = _refused(asl)
    assert err.path == str(sidecar) and words in err.problem


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
@pytest.mark.parametrize(
    "name", ["sub-01_asl.nii.gz", "sub-01_asl.json", "sub-01_aslcontext.tsv", "sub-01_m0scan.nii.gz"]
)
def test_fifo_named_like_an_input_is_refused_without_hanging(tmp_path, name):
    volumes, types, _ = phantom_series(SHAPE, num_pairs=2, m0_volumes=1)
    asl = write_series(tmp_path, "sub-01", volumes[..., 1:], types[1:], m0=volumes[..., 0])
    fifo = tmp_path / name
    fifo.unlink()
    os.mkfifo(fifo)
    with _no_hang():
        err = _refused(asl)
    assert err.path == str(fifo) and "named pipe (FIFO), not a regular file" in err.problem


# ---------------------------------------------------------- 7. RepetitionTimePreparation 0 or missing
@pytest.mark.parametrize("where", ["included", "separate"])
def test_repetition_time_zero_is_unknown_full_recovery_noted(tmp_path, where):
    volumes, types, _ = phantom_series(SHAPE, num_pairs=2, m0_volumes=1)
    sidecar = {**TIMINGS["PCASL"], "MagneticFieldStrength": 3, "RepetitionTimePreparation": 0}
    if where == "included":
        asl = write_series(tmp_path, "sub-01", volumes, types, {**sidecar, "M0Type": "Included"})
    else:
        asl = write_series(tmp_path, "sub-01", volumes[..., 1:], types[1:], {**sidecar, "M0Type": "Separate"},
                           m0=volumes[..., 0])  # fmt: skip
        asl.with_name("sub-01_m0scan.json").write_text(json.dumps({"RepetitionTimePreparation": 0}))
    series = load_asl_series(_item(asl))
    result = _quantify(series, _item(asl))
    assert set(result.maps) == {"mean"}, result.reason
    assert result.params.m0_repetition_time is None and result.params.m0_recovery == 1.0
    notes = " | ".join(result.params.notes)
    assert "RepetitionTimePreparation 0" in notes and "read as unknown" in notes and "fully relaxed" in notes


def test_separate_m0_uses_its_own_tr_when_the_asl_sidecar_has_zero(tmp_path):
    """(Guard: the M0's own sidecar wins, as before.)"""
    volumes, types, _ = phantom_series(SHAPE, num_pairs=2, m0_volumes=1)
    sidecar = {**TIMINGS["PCASL"], "M0Type": "Separate", "RepetitionTimePreparation": 0}
    asl = write_series(tmp_path, "sub-01", volumes[..., 1:], types[1:], sidecar, m0=volumes[..., 0])
    asl.with_name("sub-01_m0scan.json").write_text(json.dumps({"RepetitionTimePreparation": 4.0}))
    series = load_asl_series(_item(asl))
    result = _quantify(series, _item(asl))
    assert result.params.m0_recovery == pytest.approx(1 - math.exp(-4.0 / 1.3))


# -------------------------------------------------------------------------------- 8. SliceTiming
def _pcasl_cbf(deltam: float, pld: float) -> float:
    return 6000 * 0.9 * deltam * math.exp(pld / 1.65) / (2 * 0.85 * 1.65 * 1000 * (1 - math.exp(-1.8 / 1.65)))


@pytest.mark.parametrize(
    "timing, direction",
    [([0.0, 0.25, 0.5], "k"), ([0, 250, 500], "k"), ([0.5, 0.25, 0.0], "k-")],
    ids=["seconds", "milliseconds", "k-minus"],
)
def test_slice_timing_gives_per_slice_pld_for_2d(timing, direction):
    fields = {**BASE, **TIMINGS["PCASL"], "MRAcquisitionType": "2D", "SliceTiming": timing}
    params = parse_parameters({**fields, "SliceEncodingDirection": direction}, PATH, 3)
    assert params.pld == pytest.approx([1.8, 2.05, 2.3])
    cbf = compute_cbf(np.full((2, 2, 3), 10.0), None, params)
    for z, pld in enumerate([1.8, 2.05, 2.3]):
        np.testing.assert_allclose(cbf[..., z], _pcasl_cbf(10.0, pld), rtol=1e-6)
    assert any("SliceTiming" in n and "per-slice PLD" in n for n in params.notes)


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"SliceTiming": [0.0, 0.1, 0.2, 0.3]}, "SliceTiming has 4 values but the image has 3 slices"),
        ({"SliceTiming": [0.0, 0.1, 0.2], "SliceEncodingDirection": "j"}, "SliceEncodingDirection 'j'"),
        ({"SliceTiming": 0.1}, "SliceTiming must be a list"),
    ],
)
def test_slice_timing_that_does_not_fit_is_refused(extra, words):
    with pytest.raises(ASLInputError) as err:
        parse_parameters({**BASE, **TIMINGS["PCASL"], "MRAcquisitionType": "2D", **extra}, PATH, 3)
    assert err.value.path == PATH and words in err.value.problem


def test_slice_timing_of_3d_readout_is_not_applied():
    params = parse_parameters(
        {**BASE, **TIMINGS["PCASL"], "MRAcquisitionType": "3D", "SliceTiming": [0.0, 0.1, 0.2]}, PATH, 3
    )
    assert params.pld == 1.8 and any("SliceTiming ignored" in n for n in params.notes)


def test_slice_timing_end_to_end_along_third_axis(tmp_path):
    volumes, types, _ = phantom_series(SHAPE, num_pairs=2, m0_volumes=1)
    timing = [0.05 * z for z in range(SHAPE[2])]
    sidecar = {**TIMINGS["PCASL"], "M0Type": "Included", "MRAcquisitionType": "2D", "SliceTiming": timing}
    asl = write_series(tmp_path, "sub-01", volumes, types, sidecar)
    series = load_asl_series(_item(asl))
    result = _quantify(series, _item(asl))
    one_pld = parse_parameters({**sidecar, "MRAcquisitionType": "3D"}, PATH, SHAPE[2], m0_source="included")
    plain = compute_cbf(series.pairs.mean(axis=0), series.m0, one_pld)
    factor = np.exp(np.array(timing) / 1.65)  # exp(SliceTiming / T1 of blood), slice by slice
    np.testing.assert_allclose(result.maps["mean"], plain * factor, rtol=1e-5, atol=1e-4)
    assert np.count_nonzero(plain) > 1000


# -------------------------------------------------------------------------- 9. M0 on another grid
def _separate_m0_series(tmp_path: Path, m0: np.ndarray, m0_affine: np.ndarray, num_pairs: int = 2):
    volumes, types, _ = phantom_series(SHAPE, num_pairs=num_pairs, m0_volumes=1)
    asl = write_series(tmp_path, "sub-01", volumes[..., 1:], types[1:])
    nib.save(nib.Nifti1Image(m0.astype(np.float32), m0_affine), _m0_path(asl))
    return asl, volumes[..., 0]


def test_m0_slab_one_slice_higher_equals_hand_shifted_truth(tmp_path):
    """The M0 slab starts one slice above the ASL's: its slice k is ASL slice k + 1."""
    truth = phantom_series(SHAPE, num_pairs=1, m0_volumes=1)[0][..., 0]
    above = truth[..., -1:] * 0.9  # the slice above the ASL slab, seen only by the M0
    m0 = np.concatenate([truth[..., 1:], above], axis=2)
    m0_affine = AFFINE.copy()
    m0_affine[:3, 3] += AFFINE[:3, 2]  # origin one slice up
    asl, _ = _separate_m0_series(tmp_path, m0, m0_affine)
    series = load_asl_series(_item(asl))
    np.testing.assert_array_equal(series.m0[..., 1:], truth[..., 1:].astype(np.float32))
    assert not series.m0[..., 0].any()  # below the M0 slab: no M0, so no CBF there
    assert any("sub-01_m0scan.nii.gz" in n and "88% of the ASL voxels" in n for n in series.notes)


def test_m0_shifted_half_a_voxel_is_interpolated(tmp_path):
    truth = phantom_series(SHAPE, num_pairs=1, m0_volumes=1)[0][..., 0]
    m0_affine = AFFINE.copy()
    m0_affine[0, 3] += 0.5 * AFFINE[0, 0]  # M0 voxel i sits half a voxel further along x
    asl, _ = _separate_m0_series(tmp_path, truth, m0_affine)
    series = load_asl_series(_item(asl))
    np.testing.assert_allclose(series.m0[1:], (truth[1:] + truth[:-1]) / 2, rtol=1e-5, atol=1e-3)
    assert any("trilinear" in n for n in series.notes)


def test_m0_on_a_rotated_grid_follows_world_space(tmp_path):
    """An M0 that is a linear function of world position, stored on a grid rotated by 4 degrees (an
    SPM-style reorientation): trilinear interpolation reproduces it exactly inside its grid."""
    angle = math.radians(4.0)
    rotation = np.eye(4)
    rotation[:2, :2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    m0_affine = rotation @ AFFINE

    def field(affine: np.ndarray) -> np.ndarray:
        world = np.tensordot(affine[:3, :3], np.indices(SHAPE, float), axes=1) + affine[:3, 3, None, None, None]
        return 1000.0 + 3.0 * world[0] - 2.0 * world[1] + 1.5 * world[2]

    asl, _ = _separate_m0_series(tmp_path, field(m0_affine), m0_affine)
    series = load_asl_series(_item(asl))
    inner = (slice(4, -4), slice(4, -4), slice(None))
    np.testing.assert_allclose(series.m0[inner], field(AFFINE)[inner], rtol=1e-4)
    assert any("trilinear" in n for n in series.notes)


def test_header_only_affine_change_on_the_same_grid_is_used_as_is(tmp_path):
    """Same voxel grid, header rewritten (0.2 mm translation, 0.05 degree rotation): voxel for voxel."""
    truth = phantom_series(SHAPE, num_pairs=1, m0_volumes=1)[0][..., 0]
    angle = math.radians(0.05)
    rotation = np.eye(4)
    rotation[:2, :2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    m0_affine = rotation @ AFFINE
    m0_affine[:3, 3] += 0.2
    asl, _ = _separate_m0_series(tmp_path, truth, m0_affine)
    series = load_asl_series(_item(asl))
    np.testing.assert_array_equal(series.m0, truth.astype(np.float32))
    assert any("header-only" in n for n in series.notes)


def test_m0_stored_with_flipped_axis_is_reindexed_exactly(tmp_path):
    truth = phantom_series(SHAPE, num_pairs=1, m0_volumes=1)[0][..., 0]
    m0_affine = AFFINE.copy()
    m0_affine[:3, 0] *= -1  # x runs the other way in storage
    m0_affine[:3, 3] = AFFINE[:3, 3] + AFFINE[:3, 0] * (SHAPE[0] - 1)
    asl, _ = _separate_m0_series(tmp_path, truth[::-1], m0_affine)
    series = load_asl_series(_item(asl))
    np.testing.assert_array_equal(series.m0, truth.astype(np.float32))


def test_m0_that_does_not_overlap_is_refused(tmp_path):
    truth = phantom_series(SHAPE, num_pairs=1, m0_volumes=1)[0][..., 0]
    m0_affine = AFFINE.copy()
    m0_affine[:3, 3] += 500.0
    asl, _ = _separate_m0_series(tmp_path, truth, m0_affine)
    err = _refused(asl)
    assert err.path == str(_m0_path(asl)) and "does not overlap the ASL series" in err.problem


def test_resampling_note_reaches_deltam_and_cbf_sidecars(tmp_path):
    truth = phantom_series(SHAPE, num_pairs=1, m0_volumes=1)[0][..., 0]
    m0_affine = AFFINE.copy()
    m0_affine[:3, 3] += AFFINE[:3, 2]
    asl, _ = _separate_m0_series(tmp_path, np.roll(truth, -1, axis=2), m0_affine)
    sidecar = {**TIMINGS["PCASL"], "M0Type": "Separate", "MagneticFieldStrength": 3}
    asl.with_name("sub-01_asl.json").write_text(json.dumps(sidecar))
    series = load_asl_series(_item(asl))
    result = _quantify(series, _item(asl))
    assert result.deltam_fields()["InputNotes"] == series.notes and series.notes
    assert series.notes[0] in cbf_sidecar(result.params, "d", "s")["QuantificationNotes"]


# ------------------------------------------------------------------------ 10. singular affines
def _zero_sform(path: Path) -> None:
    image = nib.load(path)
    header = image.header.copy()
    for row in ("srow_x", "srow_y", "srow_z"):
        header[row] = 0
    header["sform_code"], header["qform_code"] = 1, 0
    nib.Nifti1Image(np.asarray(image.dataobj), None, header=header).to_filename(path)


@pytest.mark.parametrize("which", ["asl", "m0scan"])
def test_all_zero_sform_is_refused_naming_the_file(tmp_path, which):
    volumes, types, _ = phantom_series(SHAPE, num_pairs=2, m0_volumes=1)
    asl = write_series(tmp_path, "sub-01", volumes[..., 1:], types[1:], m0=volumes[..., 0])
    bad = asl if which == "asl" else _m0_path(asl)
    _zero_sform(bad)
    err = _refused(asl)
    assert err.path == str(bad) and "affine (sform/qform) is singular" in err.problem


def test_collinear_affine_is_refused(tmp_path):
    volumes, types, _ = phantom_series(SHAPE, num_pairs=2, m0_volumes=1)
    affine = AFFINE.copy()
    affine[:3, 1] = affine[:3, 0]  # two voxel axes along the same direction
    asl = write_series(tmp_path, "sub-01", volumes, types, affine=affine)
    assert "singular" in _refused(asl).problem


# ------------------------------------------------------- one series stored as .nii and as .nii.gz
def test_series_stored_twice_is_refused_naming_the_other_copy(tmp_path):
    volumes, types, _ = phantom_series(SHAPE, num_pairs=2, m0_volumes=1)
    gz = write_series(tmp_path, "sub-01", volumes, types)
    plain = gz.with_name("sub-01_asl.nii")
    nib.save(nib.load(gz), plain)
    items = find_asl_series(tmp_path)
    assert sorted(Path(i["asl"]).name for i in items) == ["sub-01_asl.nii", "sub-01_asl.nii.gz"]
    for path, other in ((gz, plain), (plain, gz)):
        err = _refused(path)
        assert err.path == str(path) and f"{other.name} beside it holds the same series" in err.problem


def test_trailing_unpaired_control_is_left_out_and_noted(tmp_path):
    volumes, types, _ = phantom_series(SHAPE, num_pairs=3, m0_volumes=1)
    control = volumes[..., types.index("control")]
    asl = write_series(tmp_path, "sub-01", np.concatenate([volumes, control[..., None]], -1), types + ["control"])
    series = load_asl_series(_item(asl))
    assert series.num_pairs == 3
    note = f"sub-01_aslcontext.tsv: the last control volume (index {len(types)}) has no partner: left out"
    assert series.notes == [note]


def test_missing_sidecar_is_named_as_the_reason_for_no_cbf(tmp_path):
    volumes, types, _ = phantom_series(SHAPE, num_pairs=2, m0_volumes=1)
    asl = write_series(tmp_path, "sub-01", volumes, types)
    sidecar = asl.with_name("sub-01_asl.json")
    sidecar.unlink()
    result = _quantify(load_asl_series(_item(asl)), _item(asl))
    assert result.maps == {} and f"{sidecar}: sidecar JSON is missing" in result.reason


def test_included_and_separate_m0_says_which_is_used(tmp_path):
    volumes, types, _ = phantom_series(SHAPE, num_pairs=2, m0_volumes=1)
    asl = write_series(tmp_path, "sub-01", volumes, types, m0=2 * volumes[..., types.index("m0scan")])
    series = load_asl_series(_item(asl))
    np.testing.assert_allclose(series.m0, volumes[..., types.index("m0scan")], rtol=1e-6)
    assert series.notes == ["M0 both in the series and as sub-01_m0scan.nii.gz: the series' m0scan volumes are used"]


# --------------------------------------------------- M0Type Absent, but an M0 beside it: used, said
def test_m0_type_absent_with_an_m0_file_uses_it_and_says_so(tmp_path):
    volumes, types, _ = phantom_series(SHAPE, num_pairs=3, m0_volumes=1)
    m0 = volumes[..., types.index("m0scan")]
    keep = [i for i, t in enumerate(types) if t != "m0scan"]
    sidecar = {"ArterialSpinLabelingType": "PCASL", "PostLabelingDelay": 1.8, "LabelingDuration": 1.8,
               "M0Type": "Absent", "MagneticFieldStrength": 3, "BackgroundSuppression": False}  # fmt: skip
    asl = write_series(tmp_path, "sub-01", volumes[..., keep], [types[i] for i in keep], sidecar, m0=m0)
    series = load_asl_series(_item(asl))
    result = _quantify(series, _item(asl))
    assert result.reason == "" and "mean" in result.maps  # CBF from the M0 the sidecar did not announce
    assert any("M0Type Absent but an M0 was found separate: the M0 found is used" in n for n in result.params.notes)


# ------------------------------------------------------------------------------- M0 absent: fine
@pytest.mark.parametrize("kind", ["deltam", "control-label"])
def test_m0_absent_loads_cleanly(tmp_path, kind):
    """(Guard.) M0Type Absent is valid BIDS: read without notes, deltaM only."""
    volumes, types, _ = phantom_series(SHAPE, num_pairs=3, m0_volumes=0)
    if kind == "deltam":
        volumes, types = volumes[..., 0::2] - volumes[..., 1::2], ["deltam"] * 3
    asl = write_series(tmp_path, "sub-01", volumes, types)  # sidecar M0Type Absent
    series = load_asl_series(_item(asl))
    assert series.m0 is None and series.m0_source == "absent" and series.notes == []
    result = _quantify(series, _item(asl))
    assert result.maps == {} and "Absent" in result.reason
