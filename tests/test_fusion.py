"""Corner-prior fusion on seeded synthetic tips and corners with known truth."""

import numpy as np

from daemon.fusion import FusionParams, corner_bias, fuse

AXIS = np.array([1.0, 0.0])


def _truth(rng, n=300):
    return np.stack([rng.uniform(50, 950, n), rng.uniform(50, 950, n)], 1)


def test_good_corners_pull_uncertain_tips_towards_the_truth():
    rng = np.random.default_rng(11)
    truth = _truth(rng)
    tips = truth + rng.normal(0, 0.5, truth.shape)  # weak peaks: score 0.5
    corners = truth + rng.normal(0, 0.2, truth.shape)
    out, scores = fuse(tips, np.full(len(tips), 0.5), corners, np.ones(len(corners)), AXIS, stride=2.0)
    e0 = np.linalg.norm(tips - truth, axis=1)
    e1 = np.linalg.norm(out - truth, axis=1)
    assert e1.mean() < 0.9 * e0.mean()
    np.testing.assert_allclose(scores, 0.5)  # all supported: scores kept


def test_confident_tips_barely_move():
    rng = np.random.default_rng(12)
    truth = _truth(rng)
    tips = truth + rng.normal(0, 0.1, truth.shape)
    corners = truth + rng.normal(0, 1.0, truth.shape)
    out, _ = fuse(tips, np.ones(len(tips)), corners, np.ones(len(corners)), AXIS, stride=2.0)
    assert np.abs(out - tips).max() < 0.25


def test_unsupported_tips_keep_their_place_and_lose_confidence():
    rng = np.random.default_rng(13)
    tips = _truth(rng, 20)
    far = tips + np.array([0.0, 4.0])  # beyond 1.5 strides = 3 px
    out, scores = fuse(tips, np.full(20, 0.8), far, np.ones(20), AXIS, stride=2.0)
    np.testing.assert_array_equal(out, tips)
    np.testing.assert_allclose(scores, 0.8 * 0.9, rtol=1e-6)
    out, scores = fuse(tips, np.full(20, 0.8), np.zeros((0, 2)), np.zeros(0), AXIS, stride=2.0)
    np.testing.assert_array_equal(out, tips)
    assert fuse(np.zeros((0, 2)), np.zeros(0), far, np.ones(20), AXIS, 2.0)[0].shape == (0, 2)


def test_bias_correction_removes_a_cap_radius_offset():
    rng = np.random.default_rng(14)
    truth = _truth(rng)
    tips = truth + rng.normal(0, 0.5, truth.shape)
    corners = truth - 1.5 * AXIS + rng.normal(0, 0.2, truth.shape)  # corners sit behind the tips
    assert abs(corner_bias(tips, corners, AXIS, 3.0) + 1.5) < 0.15
    p = FusionParams(bias_correction=True)
    out, _ = fuse(tips, np.full(len(tips), 0.5), corners, np.ones(len(corners)), AXIS, 2.0, p)
    assert abs((out - truth)[:, 0].mean()) < 0.05
    raw, _ = fuse(tips, np.full(len(tips), 0.5), corners, np.ones(len(corners)), AXIS, 2.0)
    assert (raw - truth)[:, 0].mean() < -0.2  # without the correction the bias leaks in
