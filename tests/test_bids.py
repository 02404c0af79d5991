"""BIDS-ASL reader: pair forming checked against numpy by hand for every context order, M0 sources,
``num_pairs`` and series discovery."""

from __future__ import annotations

import numpy as np
import pytest
from asl_enhance.bids import (
    ASLInputError,
    find_asl_series,
    form_pairs,
    load_asl_series,
    read_aslcontext,
    series_stem,
)
from helpers import write_series

SHAPE = (5, 4, 3)


def _volumes(n: int, seed: int = 0) -> np.ndarray:
    """Distinct random volumes (integers, so float32 differences are exact)."""
    return np.random.default_rng(seed).integers(-500, 500, size=(*SHAPE, n)).astype(np.float32)


def _item(asl) -> dict:
    (item,) = [i for i in find_asl_series(asl.parents[0]) if i["asl"] == str(asl)]
    return item


# (volume types, expected pairs as (control index, label index) or deltam index, M0 volume indices)
CASES = {
    "control-first": (["control", "label"] * 3, [(0, 1), (2, 3), (4, 5)], []),
    "label-first": (["label", "control"] * 3, [(1, 0), (3, 2), (5, 4)], []),
    "mixed c,l,l,c": (["control", "label", "label", "control"], [(0, 1), (3, 2)], []),
    "mixed l,c,c,l,c,l": (
        ["label", "control", "control", "label", "control", "label"],
        [(1, 0), (2, 3), (4, 5)],
        [],
    ),
    "m0 first then pairs": (["m0scan", "control", "label", "control", "label"], [(1, 2), (3, 4)], [0]),
    "two m0 between pairs": (["control", "label", "m0scan", "m0scan", "label", "control"], [(0, 1), (5, 4)], [2, 3]),
    "deltam only": (["deltam"] * 4, [0, 1, 2, 3], []),
    "deltam with m0scan": (["m0scan", "deltam", "deltam", "deltam"], [1, 2, 3], [0]),
    "deltam and pairs": (["deltam", "control", "label", "deltam"], [0, (1, 2), 3], []),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pairs_match_numpy_by_hand(tmp_path, name):
    types, expected, m0_idx = CASES[name]
    volumes = _volumes(len(types))
    asl = write_series(tmp_path, "sub-01", volumes, types)
    series = load_asl_series(_item(asl))
    by_hand = [volumes[..., e] if isinstance(e, int) else volumes[..., e[0]] - volumes[..., e[1]] for e in expected]
    assert series.pairs.dtype == np.float32
    assert series.pairs.shape == (len(expected), *SHAPE)
    np.testing.assert_array_equal(series.pairs, np.stack(by_hand))
    assert series.num_pairs == len(expected) == series.extra["total_pairs"]
    assert [tuple(sorted(p)) for p in series.pair_volumes] == [
        (e,) if isinstance(e, int) else tuple(sorted(e)) for e in expected
    ]
    controls = [e[0] for e in expected if not isinstance(e, int)]
    if controls:
        np.testing.assert_allclose(series.control_mean, volumes[..., controls].mean(axis=-1), rtol=1e-6)
    else:
        assert series.control_mean is None
    if m0_idx:
        assert series.m0_source == "included"
        np.testing.assert_allclose(series.m0, volumes[..., m0_idx].mean(axis=-1), rtol=1e-6)
    else:
        assert series.m0_source == "absent" and series.m0 is None
    np.testing.assert_array_equal(series.affine, np.asarray(series.affine))


@pytest.mark.parametrize("m0_4d", [False, True])
def test_separate_m0(tmp_path, m0_4d):
    types = ["label", "control"] * 2
    volumes = _volumes(4)
    m0 = np.random.default_rng(1).uniform(500, 1000, (*SHAPE, 3) if m0_4d else SHAPE).astype(np.float32)
    asl = write_series(tmp_path, "sub-01", volumes, types, m0=m0)
    item = _item(asl)
    assert item["m0scan"].endswith("sub-01_m0scan.nii.gz")
    series = load_asl_series(item)
    assert series.m0_source == "separate"
    np.testing.assert_allclose(series.m0, m0.mean(axis=-1) if m0_4d else m0, rtol=1e-6)
    by_hand = np.stack([volumes[..., 1] - volumes[..., 0], volumes[..., 3] - volumes[..., 2]])
    np.testing.assert_array_equal(series.pairs, by_hand)


def test_included_m0_wins_over_separate(tmp_path):
    types = ["m0scan", "control", "label"]
    volumes = _volumes(3)
    asl = write_series(tmp_path, "sub-01", volumes, types, m0=np.full(SHAPE, 7.0, np.float32))
    series = load_asl_series(_item(asl))
    assert series.m0_source == "included"
    np.testing.assert_array_equal(series.m0, volumes[..., 0])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_num_pairs_keeps_first_k(tmp_path, k):
    types = ["control", "label", "label", "control", "control", "label"]
    volumes = _volumes(6)
    asl = write_series(tmp_path, "sub-01", volumes, types)
    series = load_asl_series(_item(asl), num_pairs=k)
    full = np.stack([volumes[..., c] - volumes[..., lab] for c, lab in ((0, 1), (3, 2), (4, 5))])
    np.testing.assert_array_equal(series.pairs, full[:k])
    assert series.extra["total_pairs"] == 3
    controls = [0, 3, 4][:k]
    np.testing.assert_allclose(series.control_mean, volumes[..., controls].mean(axis=-1), rtol=1e-6)


@pytest.mark.parametrize("k", [4, 100, 0, -1])
def test_num_pairs_out_of_range_names_the_file(tmp_path, k):
    asl = write_series(tmp_path, "sub-01", _volumes(6), ["control", "label"] * 3)
    with pytest.raises(ASLInputError) as err:
        load_asl_series(_item(asl), num_pairs=k)
    assert err.value.path == str(asl)
    assert str(asl) in str(err.value)
    assert "num_pairs" in err.value.problem


def test_form_pairs_errors_name_the_source():
    with pytest.raises(ASLInputError, match="ctx.tsv: 2 control but 1 label"):
        form_pairs(["control", "label", "control"], "ctx.tsv")
    with pytest.raises(ASLInputError, match="no control/label pairs"):
        form_pairs(["m0scan", "m0scan"], "ctx.tsv")


def test_form_pairs_leaves_out_only_a_trailing_unpaired_volume():
    """A scan stopped mid-pair keeps its pairs (noted); an unpaired volume inside would shift every pairing."""
    notes: list[str] = []
    assert form_pairs(["control", "label", "control", "label", "control"], "ctx.tsv", notes) == [(0, 1), (2, 3)]
    assert notes == ["ctx.tsv: the last control volume (index 4) has no partner: left out"]
    assert form_pairs(["label", "control", "label"], "ctx.tsv", []) == [(1, 0)]
    for inside in (["control", "control", "label"], ["control", "label", "control", "control", "label"]):
        with pytest.raises(ASLInputError, match="cannot form pairs"):
            form_pairs(inside, "ctx.tsv", [])


def test_read_aslcontext_variants(tmp_path):
    path = tmp_path / "x_aslcontext.tsv"
    path.write_text("\ufeffVolume_Type\textra\nControl\ta\n\n LABEL \tb\nm0scan\tc\n")
    assert read_aslcontext(path) == ["control", "label", "m0scan"]
    path.write_text("extra\tvolume_type\r\n1\tdeltam\r\n2\tdeltam\r\n")
    assert read_aslcontext(path) == ["deltam", "deltam"]


def test_find_asl_series_nested_and_filters(tmp_path):
    vols, types = _volumes(2), ["control", "label"]
    write_series(tmp_path / "sub-01" / "ses-1" / "perf", "sub-01_ses-1", vols, types)
    write_series(tmp_path / "sub-02" / "perf", "sub-02", vols, types)
    write_series(tmp_path / "derivatives" / "x" / "sub-01" / "perf", "sub-01", vols, types)
    orphan = write_series(tmp_path / "sub-03" / "perf", "sub-03", vols, types)
    orphan.with_name("sub-03_aslcontext.tsv").unlink()
    (tmp_path / "sub-02" / "perf" / "notes_asl.txt").write_text("not an image")
    items = find_asl_series(tmp_path)
    assert [(i["rel_dir"], i["stem"]) for i in items] == [
        ("sub-01/ses-1/perf", "sub-01_ses-1"),
        ("sub-02/perf", "sub-02"),
    ]
    assert all(i["m0scan"] == "" for i in items)
    assert items[0]["sidecar"].endswith("sub-01_ses-1_asl.json")


def test_find_asl_series_truth(tmp_path):
    write_series(tmp_path / "raw" / "sub-01" / "perf", "sub-01", _volumes(2), ["control", "label"])
    truth = tmp_path / "truth" / "sub-01" / "perf" / "sub-01_desc-truth_deltam.nii.gz"
    truth.parent.mkdir(parents=True)
    truth.write_bytes(b"")
    (item,) = find_asl_series(tmp_path / "raw", truth_dir=tmp_path / "truth")
    assert item["truth"] == str(truth)


def test_series_stem():
    assert series_stem("/a/sub-01_ses-2_asl.nii.gz") == "sub-01_ses-2"
    assert series_stem("sub-01_asl.nii") == "sub-01"
    with pytest.raises(ASLInputError):
        series_stem("sub-01_bold.nii.gz")


@pytest.mark.parametrize(
    ("total", "volume_types", "averaged", "noted"),
    [
        (8, ["deltam"], 8.0, "each averages 8 acquired pairs"),  # a scanner's single averaged deltaM
        (6, ["control", "label"] * 3, 2.0, "each averages 2 acquired pairs"),
        (3, ["control", "label"] * 3, 1.0, None),  # as many as in the file: nothing to say
        (2, ["control", "label"] * 3, 1.0, "fewer than the 3 pairs in the file"),
        (None, ["deltam"], 1.0, None),
    ],
)
def test_total_acquired_pairs_says_how_many_pairs_each_volume_averages(tmp_path, total, volume_types, averaged, noted):
    """TotalAcquiredPairs over the pairs in the file: a scanner that exports its averages gives fewer, cleaner
    volumes than it acquired, and the sidecars must say so; an inconsistent count is noted and read as 1."""
    sidecar = {"ArterialSpinLabelingType": "PCASL", "PostLabelingDelay": 1.8, "LabelingDuration": 1.8}
    if total is not None:
        sidecar["TotalAcquiredPairs"] = total
    asl = write_series(tmp_path, "sub-01", _volumes(len(volume_types)), volume_types, sidecar)
    series = load_asl_series(_item(asl))
    assert series.extra["pairs_averaged"] == averaged
    found = [n for n in series.notes if "TotalAcquiredPairs" in n]
    assert (found and noted in found[0]) if noted else not found


def test_total_acquired_pairs_not_a_number_names_the_sidecar(tmp_path):
    sidecar = {"ArterialSpinLabelingType": "PCASL", "PostLabelingDelay": 1.8, "TotalAcquiredPairs": "eight"}
    asl = write_series(tmp_path, "sub-01", _volumes(1), ["deltam"], sidecar)
    with pytest.raises(ASLInputError, match=r"sub-01_asl\.json.*TotalAcquiredPairs"):
        load_asl_series(_item(asl))
