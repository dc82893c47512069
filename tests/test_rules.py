"""Rules (``verdict_rules``): layer order, overhangs, reasons, and the cell aggregate."""

import numpy as np
import pytest

from daemon.phantom import make_phantom
from daemon.roi import detect_roi
from daemon.rules import (ANODE, CATHODE, NG, OK, OverhangLimits, judge_cell, judge_corner, overhangs_um,
                          stack_layers)

LIMITS = OverhangLimits(750.0, 2250.0)


def test_overhangs_pair_each_cathode_with_its_stacking_neighbours():
    kind = np.array([ANODE, CATHODE, ANODE, CATHODE, CATHODE, ANODE])  # an anode missing at index 4
    u = np.array([100.0, 10.0, 90.0, 20.0, 15.0, 80.0])
    ov = overhangs_um(kind, u, pixel_pitch_um=10.0)
    np.testing.assert_allclose(ov, [[900.0, 800.0], [700.0, np.nan], [np.nan, 650.0]])


def _identity(p):
    return np.asarray(p, np.float64)


def test_stack_layers_sorts_along_v_and_keeps_sources():
    anodes = np.array([[100.0, 40.0], [100.0, 0.0]])
    cathodes = np.array([[10.0, 20.0]])
    lay = stack_layers(anodes, [0.9, 0.8], cathodes, [0.7], _identity)
    np.testing.assert_array_equal(lay.kind, [ANODE, CATHODE, ANODE])
    np.testing.assert_array_equal(lay.source, [1, 0, 0])
    np.testing.assert_allclose(lay.scores, [0.8, 0.7, 0.9])


class _Roi:
    ok, reason, detail = True, None, ""

    @staticmethod
    def to_canonical(p):
        return np.asarray(p, np.float64)


def _stack(n_cathodes=5, ov_px=(120.0,), pitch=20.0):
    """Canonical = image coordinates: anodes at u=ov, cathodes at u=0, alternating in v."""
    ov = np.resize(np.asarray(ov_px, np.float64), n_cathodes + 1)
    anodes = np.stack([ov, 2 * pitch * np.arange(n_cathodes + 1)], 1)
    cathodes = np.stack([np.zeros(n_cathodes), pitch + 2 * pitch * np.arange(n_cathodes)], 1)
    return anodes, cathodes


def test_judge_corner_reasons_name_the_layers_and_values():
    anodes, cathodes = _stack(ov_px=(120.0, 120.0, 50.0, 120.0, 300.0, 120.0))  # pitch 10 um/px
    sa, sc = np.full(len(anodes), 0.9), np.full(len(cathodes), 0.9)
    sc[3] = 0.2
    v = judge_corner(_Roi(), anodes, sa, cathodes, sc, 10.0, OverhangLimits(750.0, 2250.0, min_confidence=0.3))
    assert v.verdict == NG
    codes = [(r["code"], r.get("cathode"), r.get("side")) for r in v.reasons]
    assert ("overhang_low", 1, "right") in codes and ("overhang_low", 2, "left") in codes
    assert ("overhang_high", 3, "right") in codes and ("overhang_high", 4, "left") in codes
    low = [r for r in v.reasons if r["code"] == "low_confidence"]
    assert low == [{"code": "low_confidence", "layers": [7], "kinds": ["cathode"], "scores": [0.2], "limit": 0.3}]
    assert [r["value_um"] for r in v.reasons if r["code"] == "overhang_low"] == [500.0, 500.0]


def test_judge_corner_counts_and_expected_layers():
    anodes, cathodes = _stack()
    s = lambda x: np.ones(len(x))  # noqa: E731
    assert judge_corner(_Roi(), anodes, s(anodes), cathodes, s(cathodes), 10.0, LIMITS).verdict == OK
    v = judge_corner(_Roi(), anodes[:-1], s(anodes[:-1]), cathodes, s(cathodes), 10.0, LIMITS)
    assert v.verdict == NG and v.reasons[0]["code"] == "count_mismatch"
    v = judge_corner(_Roi(), anodes, s(anodes), cathodes, s(cathodes), 10.0, OverhangLimits(750, 2250, 13))
    assert [r["code"] for r in v.reasons] == ["count_mismatch"]


def test_no_roi_is_ng_roi_not_found():
    blank = np.full((256, 256), 1000, np.uint16)
    roi = detect_roi(blank)
    v = judge_corner(roi, np.zeros((0, 2)), [], np.zeros((0, 2)), [], 10.0, LIMITS)
    assert v.verdict == NG and v.reasons[0]["code"] == "roi_not_found" and v.reasons[0]["why"] == "blank"
    assert v.to_dict()["verdict"] == NG


@pytest.mark.parametrize("preset", ["normal", "defects"])
def test_true_tips_give_the_labelled_verdict_and_overhangs(preset):
    """With the ground-truth tips, the rules reproduce the phantom's verdict and overhangs
    (the ROI's layer axis is estimated, so the overhangs are off by its angle error)."""
    errs, n = [], 0
    for i in range(8):
        ph = make_phantom(np.random.SeedSequence([4711, i]), preset, (768, 768), 16)
        roi = detect_roi(ph.image)
        assert roi.ok
        lab = ph.labels
        a, c = np.asarray(lab["anode"]), np.asarray(lab["cathode"])
        v = judge_corner(roi, a, np.ones(len(a)), c, np.ones(len(c)), lab["pixel_pitch_um"],
                         OverhangLimits(*lab["limits_um"]))
        assert v.verdict == lab["verdict"], (i, v.reasons, lab["reasons"])
        assert {r["code"] for r in v.reasons} == {r["code"] for r in lab["reasons"]}
        gt = np.array([[np.nan if x is None else x for x in row] for row in lab["overhang_um"]])
        np.testing.assert_array_equal(np.isfinite(v.overhang_um), np.isfinite(gt))
        errs.append(np.abs(v.overhang_um - gt)[np.isfinite(gt)])
        n += lab["verdict"] == NG
    errs = np.concatenate(errs)
    assert np.median(errs) < 2.0 and errs.max() < 15.0, (np.median(errs), errs.max())
    if preset == "defects":  # half the frames carry a defect, a quarter a borderline-OK overhang
        assert 2 <= n <= 6, n


def test_cell_verdict_needs_every_corner_ok():
    ok = {"verdict": OK, "reasons": []}
    ng = {"verdict": NG, "reasons": [{"code": "overhang_low", "cathode": 2, "side": "left"}]}
    assert judge_cell({0: ok, 1: ok, 2: ok, 3: ok})["verdict"] == OK
    cell = judge_cell({0: ok, 1: ng, 2: ok, 3: ok})
    assert cell["verdict"] == NG and cell["reasons"] == [{**ng["reasons"][0], "corner": 1}]
    cell = judge_cell({0: ok, 2: ok, 3: ok})
    assert cell["verdict"] == NG and cell["reasons"] == [{"code": "incomplete", "missing_corners": [1]}]
    assert judge_cell({0: ok, 1: ok, 2: ok, 3: {"verdict": NG}})["verdict"] == NG


def _ideal_stack(n_layers: int, pitch: float = 16.0, skew: float = 0.0, drop: tuple[int, ...] = ()):
    """Tips of an ideal stack in the ROI frame: anodes at u=150, cathodes at u=50, layer k
    at v = k * pitch; ``skew`` shifts all cathodes along v (an ROI angle error); layers in
    ``drop`` are not found."""
    k = np.array([i for i in range(n_layers) if i not in drop])
    a = k[k % 2 == 0]
    c = k[k % 2 == 1]
    return (np.c_[np.full(len(a), 150.0), a * pitch], np.c_[np.full(len(c), 50.0), c * pitch + skew])


def test_layer_gap_catches_a_missing_anode_cathode_pair_that_counts_miss():
    a, c = _ideal_stack(21, drop=(9, 10))  # a cathode and an anode both missed: counts still agree
    assert len(a) == len(c) + 1
    v = judge_corner(_Roi(), a, np.ones(len(a)), c, np.ones(len(c)), 10.0, LIMITS)
    codes = [r["code"] for r in v.reasons]
    assert v.verdict == NG and "layer_gap" in codes and "count_mismatch" not in codes
    gap = [r for r in v.reasons if r["code"] == "layer_gap"]
    assert {r["kind"] for r in gap} == {"anode", "cathode"} and all(g == 2.0 for r in gap for g in r["gaps"])


def test_layer_gap_is_silent_on_whole_stacks_even_with_an_angle_error():
    for skew in (0.0, 6.0, -7.0):  # cathodes shifted along v against the anodes
        a, c = _ideal_stack(21, skew=skew)
        v = judge_corner(_Roi(), a, np.ones(len(a)), c, np.ones(len(c)), 10.0, LIMITS)
        assert not any(r["code"] == "layer_gap" for r in v.reasons), v.reasons
