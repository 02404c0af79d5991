"""CBF quantification: white-paper equations against numbers worked out by hand, every M0Type, and
clear errors for missing or malformed sidecar fields."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from asl_enhance.bids import ASLInputError, find_asl_series
from asl_enhance.quantification import (
    CBF_UNITS_TEXT,
    cbf_sidecar,
    compute_cbf,
    find_tissue_maps,
    parse_parameters,
    quantify_series,
    tissue_summary,
)
from helpers import phantom_series, write_series

SHAPE = (2, 2, 3)
PATH = "sub-01_asl.json"


def _params(num_slices: int = 3, **fields):
    sidecar = {
        "ArterialSpinLabelingType": "PCASL",
        "PostLabelingDelay": 1.8,
        "LabelingDuration": 1.8,
        "MagneticFieldStrength": 3,
        "BackgroundSuppression": False,
        "M0Type": "Estimate",
        "M0Estimate": 1000.0,
    }
    sidecar.update(fields)
    return parse_parameters({k: v for k, v in sidecar.items() if v is not None}, PATH, num_slices)


def _cbf(params, deltam: float = 10.0, m0=None) -> np.ndarray:
    return compute_cbf(np.full(SHAPE, deltam), m0, params)


# ------------------------------------------------------------------------------ equations by hand
def test_pcasl_3t_by_hand():
    # 6000 * 0.9 * 10 * e^(1.8/1.65) / (2 * 0.85 * 1.65 * 1000 * (1 - e^(-1.8/1.65)))
    expected = 6000 * 0.9 * 10 * math.exp(1.8 / 1.65) / (2 * 0.85 * 1.65 * 1000 * (1 - math.exp(-1.8 / 1.65)))
    assert expected == pytest.approx(86.30, abs=0.01)  # the number itself, worked out once by hand
    np.testing.assert_allclose(_cbf(_params()), expected, rtol=1e-6)


def test_pcasl_15t_by_hand():
    expected = 6000 * 0.9 * 10 * math.exp(1.8 / 1.35) / (2 * 0.85 * 1.35 * 1000 * (1 - math.exp(-1.8 / 1.35)))
    assert expected == pytest.approx(121.21, abs=0.01)
    params = _params(MagneticFieldStrength=1.5)
    assert params.t1_blood == 1.35
    np.testing.assert_allclose(_cbf(params), expected, rtol=1e-6)


@pytest.mark.parametrize("field, t1b", [(3, 1.65), (1.5, 1.35)])
def test_pasl_by_hand(field, t1b):
    # TI = 1.8 s (BIDS PostLabelingDelay), TI1 = 0.8 s (BolusCutOffDelayTime), alpha 0.98
    expected = 6000 * 0.9 * 10 * math.exp(1.8 / t1b) / (2 * 0.98 * 0.8 * 1000)
    params = _params(
        ArterialSpinLabelingType="PASL",
        LabelingDuration=None,
        BolusCutOffDelayTime=0.8,
        MagneticFieldStrength=field,
        BolusCutOffFlag=True,
    )
    assert params.labeling_efficiency == 0.98
    np.testing.assert_allclose(_cbf(params), expected, rtol=1e-6)


def test_pasl_q2tips_cutoff_list_uses_first_value():
    params = _params(ArterialSpinLabelingType="PASL", BolusCutOffDelayTime=[0.7, 1.6])
    np.testing.assert_allclose(_cbf(params), 6000 * 0.9 * 10 * math.exp(1.8 / 1.65) / (2 * 0.98 * 0.7 * 1000))
    assert any("first value" in note for note in params.notes)


def test_per_slice_pld_applied_along_slice_axis():
    params = _params(PostLabelingDelay=[1.5, 1.6, 1.7])
    cbf = _cbf(params)
    for z, pld in enumerate([1.5, 1.6, 1.7]):
        expected = 6000 * 0.9 * 10 * math.exp(pld / 1.65) / (2 * 0.85 * 1.65 * 1000 * (1 - math.exp(-1.8 / 1.65)))
        np.testing.assert_allclose(cbf[..., z], expected, rtol=1e-6)


def test_m0_tr_correction_included():
    params = parse_parameters(
        {
            "ArterialSpinLabelingType": "PCASL",
            "PostLabelingDelay": 1.8,
            "LabelingDuration": 1.8,
            "MagneticFieldStrength": 3,
            "M0Type": "Included",
            "RepetitionTimePreparation": 2.0,
        },
        PATH,
        3,
        m0_source="included",
    )
    # M0 acquired at TR 2 s recovers 1 - e^(-2/1.3) of equilibrium (T1 of GM 1.3 s at 3 T)
    m0_eq = 1000 / (1 - math.exp(-2.0 / 1.3))
    expected = 6000 * 0.9 * 10 * math.exp(1.8 / 1.65) / (2 * 0.85 * 1.65 * m0_eq * (1 - math.exp(-1.8 / 1.65)))
    np.testing.assert_allclose(_cbf(params, m0=np.full(SHAPE, 1000.0)), expected, rtol=1e-6)
    assert params.sources["M0RepetitionTimePreparation"].startswith("sidecar")


def test_m0_tr_separate_from_m0_sidecar():
    params = parse_parameters(
        {
            "ArterialSpinLabelingType": "PCASL",
            "PostLabelingDelay": 1.8,
            "M0Type": "Separate",
            "MagneticFieldStrength": 1.5,
            "RepetitionTimePreparation": 4.0,
        },
        PATH,
        3,
        m0_source="separate",
        m0_sidecar={"RepetitionTimePreparation": 3.0},
    )
    assert params.m0_recovery == pytest.approx(1 - math.exp(-3.0 / 1.1))  # 1.5 T: T1 of GM 1.1 s
    assert params.sources["LabelingDuration"] == "default" and params.labeling_duration == 1.8


@pytest.mark.parametrize(
    "fields, alpha",
    [
        ({"BackgroundSuppression": True, "BackgroundSuppressionNumberPulses": 3}, 0.85 * 0.95**3),
        ({"BackgroundSuppression": True, "BackgroundSuppressionPulseTime": [0.5, 1.2]}, 0.85 * 0.95**2),
        ({"BackgroundSuppression": True, "BackgroundSuppressionEfficiency": 0.9}, 0.85 * 0.9),
        ({"BackgroundSuppression": False, "BackgroundSuppressionNumberPulses": 4}, 0.85),
        ({"LabelingEfficiency": 0.7}, 0.7),
    ],
)
def test_labeling_efficiency_and_background_suppression(fields, alpha):
    params = _params(**fields)
    assert params.alpha == pytest.approx(alpha)
    np.testing.assert_allclose(_cbf(params), _cbf(_params()) * 0.85 / alpha, rtol=1e-6)


@pytest.mark.parametrize(
    "fields, alpha, says",
    [
        ({"BackgroundSuppressionNumberPulses": 4}, 0.85 * 0.95**4, "on assumed from the sidecar's 4 pulses"),
        ({"BackgroundSuppressionEfficiency": 0.9}, 0.85 * 0.9, "on assumed"),
        ({"BackgroundSuppressionNumberPulses": 0}, 0.85, "off, from the sidecar's 0 pulses"),
        ({}, 0.85, "off assumed; if the scan used it, CBF reads low"),
    ],
)
def test_missing_background_suppression_is_inferred_and_said(fields, alpha, says):
    """BackgroundSuppression missing: the pulse count decides, and the CBF sidecar's notes say what was assumed."""
    params = _params(BackgroundSuppression=None, **fields)
    assert params.alpha == pytest.approx(alpha)
    assert any(says in note for note in params.notes), params.notes


def test_missing_labeling_duration_is_said():
    params = _params(LabelingDuration=None)
    assert params.labeling_duration == 1.8
    assert any("LabelingDuration missing: 1.8 s assumed" in note for note in params.notes)
    assert not any("LabelingDuration" in note for note in _params().notes)


def test_sources_say_sidecar_or_default():
    defaults = _params(LabelingDuration=None)
    assert defaults.sources["LabelingEfficiency"] == "default" and defaults.labeling_efficiency == 0.85
    assert defaults.sources["LabelingDuration"] == "default"
    given = _params(LabelingEfficiency=0.8)
    fields = cbf_sidecar(given, "test", "x")
    assert fields["ParameterSources"]["LabelingEfficiency"] == "sidecar"
    assert fields["ParameterSources"]["PostLabelingDelay"] == "sidecar"
    assert fields["ParameterSources"]["T1Blood"] == "default" and fields["T1Blood"] == 1.65
    assert fields["Units"] == CBF_UNITS_TEXT == "mL/100 g/min"
    json.dumps(fields)  # sidecar must be plain JSON


def test_units_typical_grey_matter():
    # deltaM 0.6 % of M0 in GM at PLD 1.8 s (3 T PCASL) is about 52 ml/100 g/min: a typical GM value
    cbf = compute_cbf(np.full(SHAPE, 6.0), np.full(SHAPE, 1000.0), _params(M0Type="Included"))
    assert cbf.dtype == np.float32
    np.testing.assert_allclose(cbf, 0.6 * 86.30, rtol=1e-3)


def test_cbf_zero_outside_m0_mask():
    m0 = np.full(SHAPE, 1000.0)
    m0[0, 0, 0] = 1.0  # background voxel: M0 far below 10 % of the head's level
    cbf = compute_cbf(np.full(SHAPE, 10.0), m0, _params(M0Type="Included"))
    assert cbf[0, 0, 0] == 0 and np.all(cbf.ravel()[1:] > 80)


# ------------------------------------------------------------------------------------ multi-PLD
def test_per_volume_pld_single_value_of_used_pairs():
    types = ["m0scan", "control", "label", "control", "label"]
    params = parse_parameters(
        {"ArterialSpinLabelingType": "PCASL", "PostLabelingDelay": [0, 1.5, 1.5, 2.0, 2.0], "M0Type": "Included"},
        PATH,
        3,
        volume_types=types,
        used_volumes=[1, 2],
        m0_source="included",
    )
    assert params.pld == 1.5 and not params.cbf_refusal
    assert any("single-PLD" in n and "1.5" in n for n in params.notes)


def test_multi_pld_pairs_refused_clearly():
    types = ["control", "label", "control", "label"]
    params = parse_parameters(
        {
            "ArterialSpinLabelingType": "PCASL",
            "PostLabelingDelay": [1.5, 1.5, 2.0, 2.0],
            "M0Type": "Estimate",
            "M0Estimate": 100,
        },
        PATH,
        3,
        volume_types=types,
        used_volumes=[0, 1, 2, 3],
    )
    assert "multi-PLD" in params.cbf_refusal and "single-PLD" in params.cbf_refusal
    with pytest.raises(ValueError, match="multi-PLD"):
        _cbf(params)


# ------------------------------------------------------------------------------- malformed fields
@pytest.mark.parametrize(
    "fields, message",
    [
        ({"PostLabelingDelay": "1.8s"}, "PostLabelingDelay must be a number"),
        ({"PostLabelingDelay": [1.5, "x", 1.7]}, "PostLabelingDelay must be a number"),
        ({"PostLabelingDelay": [1.5, 1.6]}, "PostLabelingDelay has 2 values but the series has 3 slices"),
        ({"PostLabelingDelay": None}, "PostLabelingDelay is missing"),
        ({"PostLabelingDelay": -1}, "must not be negative"),
        ({"ArterialSpinLabelingType": "VSASL"}, "unknown ArterialSpinLabelingType"),
        ({"ArterialSpinLabelingType": None}, "ArterialSpinLabelingType is missing"),
        ({"ArterialSpinLabelingType": "PASL"}, "PASL needs BolusCutOffDelayTime"),
        ({"ArterialSpinLabelingType": "PASL", "BolusCutOffDelayTime": 0.8, "BolusCutOffFlag": False}, "QUIPSS"),
        ({"LabelingEfficiency": 1.5}, "LabelingEfficiency must be in (0, 1.0]"),
        ({"LabelingDuration": "long"}, "LabelingDuration must be a number"),
        ({"MagneticFieldStrength": True}, "MagneticFieldStrength must be a number"),
        ({"BackgroundSuppression": "yes"}, "BackgroundSuppression must be true or false"),
        ({"BackgroundSuppression": True, "BackgroundSuppressionNumberPulses": 2.5}, "whole number"),
        ({"M0Type": "Sometimes"}, "unknown M0Type"),
        ({"M0Estimate": None}, "M0Type Estimate needs a numeric M0Estimate"),
        ({"M0Estimate": -5}, "M0Estimate must be positive"),
    ],
)
def test_malformed_fields_raise_clear_errors(fields, message):
    with pytest.raises(ASLInputError) as err:
        _params(**fields)
    assert err.value.path == PATH
    assert message in str(err.value)


def test_m0type_included_without_m0_volumes_is_an_error():
    with pytest.raises(ASLInputError, match="M0Type Included but no m0scan volumes"):
        _params(M0Type="Included", M0Estimate=None) if False else parse_parameters(
            {"ArterialSpinLabelingType": "PCASL", "PostLabelingDelay": 1.8, "M0Type": "Included"},
            PATH,
            3,
            m0_source="absent",
        )


def test_missing_m0type_inferred_from_files():
    params = parse_parameters(
        {"ArterialSpinLabelingType": "PCASL", "PostLabelingDelay": 1.8}, PATH, 3, m0_source="separate"
    )
    assert params.m0_type == "Separate" and params.sources["M0Type"].startswith("derived")


# ------------------------------------------------------------------- every M0Type on real files
def _series_item(tmp_path, m0_type: str):
    volumes, types, deltam = phantom_series(shape=(12, 10, 4), num_pairs=2, m0_volumes=1)
    sidecar = {
        "ArterialSpinLabelingType": "PCASL",
        "PostLabelingDelay": 1.8,
        "LabelingDuration": 1.8,
        "MagneticFieldStrength": 3,
        "M0Type": m0_type,
    }
    m0 = None
    if m0_type == "Estimate":
        sidecar["M0Estimate"] = 1000.0
    if m0_type != "Included":
        m0 = volumes[..., 0] if m0_type == "Separate" else None
        volumes, types = volumes[..., 1:], types[1:]
    asl = write_series(tmp_path / "sub-01" / "perf", "sub-01", volumes, types, sidecar, m0=m0)
    if m0_type == "Separate":
        (asl.parent / "sub-01_m0scan.json").write_text(json.dumps({"RepetitionTimePreparation": 6.0}))
    (item,) = find_asl_series(tmp_path)
    return item, volumes, deltam


@pytest.mark.parametrize("m0_type", ["Included", "Separate", "Estimate", "Absent"])
def test_every_m0_type(tmp_path, m0_type):
    from asl_enhance.bids import load_asl_series

    item, _, deltam = _series_item(tmp_path, m0_type)
    series = load_asl_series(item)
    item.update(
        sidecar_json=json.dumps(series.sidecar),
        pair_volumes=json.dumps(series.pair_volumes),
        input_pairs=json.dumps([0, 1]),
        m0_source=series.m0_source,
    )
    result = quantify_series(item, {"mean": series.pairs.mean(axis=0)}, series.m0)
    if m0_type == "Absent":
        assert result.maps == {} and "Absent" in result.reason
        assert result.deltam_fields() == {"CBFWritten": False, "CBFNotComputedReason": result.reason}
        return
    assert result.params.m0_type == m0_type and set(result.maps) == {"mean"}
    # Separate: the m0scan.json TR of 6 s recovers 1 - e^(-6/1.3) of M0; Included without TR: no correction
    m0 = 1000.0 if m0_type == "Estimate" else series.m0 / (1 - math.exp(-6.0 / 1.3) if m0_type == "Separate" else 1)
    mean = series.pairs.mean(axis=0).astype(np.float64)
    expected = 6000 * 0.9 * mean * math.exp(1.8 / 1.65) / (2 * 0.85 * 1.65 * m0 * (1 - math.exp(-1.8 / 1.65)))
    head = deltam > 0
    np.testing.assert_allclose(result.maps["mean"][head], np.broadcast_to(expected, head.shape)[head], rtol=1e-4)


def test_bad_sidecar_becomes_reason_not_crash(tmp_path):
    item, _, _ = _series_item(tmp_path, "Estimate")
    item.update(sidecar_json=json.dumps({"ArterialSpinLabelingType": "PCASL", "PostLabelingDelay": "soon"}))
    result = quantify_series(item, {"mean": np.zeros((12, 10, 4))}, None)
    assert result.maps == {} and "PostLabelingDelay must be a number" in result.reason


def test_tissue_maps_and_summary(tmp_path):
    item, _, _ = _series_item(tmp_path, "Estimate")
    sim = tmp_path / "derivatives" / "simulation" / "sub-01" / "perf"
    sim.mkdir(parents=True)
    for tissue in ("GM", "WM"):
        (sim / f"sub-01_label-{tissue}_probseg.nii.gz").write_bytes(b"")
    maps, source = find_tissue_maps(item)
    assert set(maps) == {"GM", "WM"} and source == "segmentation (derivatives/simulation)"
    cbf = np.array([60.0, 50.0, 20.0, 0.0])
    gm, wm = np.array([0.9, 0.8, 0.0, 1.0]), np.array([0.0, 0.1, 0.95, 0.0])
    summary = tissue_summary(cbf, gm, wm)  # the GM voxel with CBF 0 (outside the M0 mask) is left out
    assert summary == {"gm_cbf_mean": 55.0, "gm_cbf_median": 55.0, "wm_cbf_mean": 20.0, "wm_cbf_median": 20.0}
