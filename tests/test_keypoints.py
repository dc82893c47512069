"""Tip selection (hysteresis) on synthetic candidates with known geometry."""

import numpy as np

from daemon.keypoints import select_tips


def test_weak_peaks_count_only_where_they_continue_the_staircase():
    rng = np.random.default_rng(3)
    strong = np.stack([100 + rng.uniform(-3, 3, 8), 200 + 20.0 * np.arange(8)], 1)  # period 20 px
    weak = np.array([
        [101.0, 180.0],  # the dimmed outermost layer, one period above: a tip
        [102.0, 360.0],  # one period below the last: a tip
        [106.0, 226.0],  # 6-7 px from a strong tip (a split tip's prong): not one
        [180.0, 300.0],  # 80 px from the staircase (a fixture corner): not one
    ])
    faint = np.array([[100.0, 380.0]])  # continues the staircase, but below low_threshold
    pts = np.vstack([strong, weak, faint])
    scores = np.r_[rng.uniform(0.7, 1.0, 8), [0.4, 0.5, 0.55, 0.5], [0.2]].astype(np.float32)
    keep = select_tips(pts, scores, threshold=0.6, low_threshold=0.3)
    np.testing.assert_array_equal(keep, [True] * 8 + [True, True, False, False] + [False])


def test_without_a_staircase_only_strong_peaks_count():
    pts = np.array([[10.0, 10.0], [10.0, 30.0], [12.0, 50.0]])
    scores = np.array([0.9, 0.4, 0.8], np.float32)
    np.testing.assert_array_equal(select_tips(pts, scores, 0.6, 0.3), [True, False, True])
    empty = select_tips(np.zeros((0, 2)), np.zeros(0, np.float32), 0.6, 0.3)
    assert empty.shape == (0,)


def test_a_short_anode_far_behind_its_neighbours_stays():
    """An anode with a short overhang lies 3+ periods from every other anode; it is the
    defect the line must see, so no distance rule may drop a strong peak."""
    rng = np.random.default_rng(4)
    chain = np.stack([100 + rng.uniform(-3, 3, 10), 200 + 20.0 * np.arange(10)], 1)  # period 20 px
    short = np.array([[35.0, 300.0]])  # 65 px behind the staircase
    pts = np.vstack([chain, short])
    scores = np.r_[rng.uniform(0.7, 1.0, 10), [0.95]].astype(np.float32)
    assert select_tips(pts, scores, threshold=0.6, low_threshold=0.3).all()


def test_same_layer_keep_drops_a_prong_but_never_a_layer():
    from daemon.keypoints import same_layer_keep

    rng = np.random.default_rng(11)
    pitch = 16.0
    n = 21
    v_all = np.arange(n) * pitch + rng.normal(0, 0.4, n)  # alternating anode/cathode tips
    va, vc = v_all[0::2], v_all[1::2]
    sa = rng.uniform(0.7, 1.0, len(va)).astype(np.float32)
    # a split tip: a weaker second anode peak 0.5 pitch beside anode 4
    va2 = np.r_[va, va[4] + 0.5 * pitch]
    sa2 = np.r_[sa, 0.65].astype(np.float32)
    keep = same_layer_keep(va2, sa2, np.r_[va2, vc])
    assert keep[:-1].all() and not keep[-1]
    # the stronger of the two stays, whichever it is
    sa3 = sa2.copy()
    sa3[-1] = 1.5
    keep = same_layer_keep(va2, sa3, np.r_[va2, vc])
    assert not keep[4] and keep[-1] and keep.sum() == len(va)
    # a missing cathode (a missing layer, NG): its two anode neighbours are two pitches
    # apart with nothing between them; both stay
    vc_missing = np.delete(vc, 3)
    assert same_layer_keep(va, sa, np.r_[va, vc_missing]).all()
    assert same_layer_keep(vc_missing, np.ones(len(vc_missing), np.float32), np.r_[va, vc_missing]).all()
    # too few tips to know the pitch: nothing is dropped
    assert same_layer_keep(np.array([0.0, 3.0]), np.array([1.0, 0.5]), np.array([0.0, 3.0])).all()
