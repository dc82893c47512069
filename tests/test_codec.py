"""The shared heatmap codec: crop affine, targets, sub-pixel decoding, crop rendering."""

import numpy as np
import pytest

from daemon.codec import HeatmapCodec, apply_affine, compose_affine, invert_affine, normalise
from daemon.phantom import PRESETS, crop_scene, sample_scene, transmission


@pytest.fixture(scope="module")
def codec():
    return HeatmapCodec((128, 96), stride=2, sigma=1.0)


def test_crop_affine_maps_centre_and_axis(codec):
    A = codec.crop_affine((400.0, 300.0), 90.0)  # tips point down in the image
    c = apply_affine(A, [[400.0, 300.0], [400.0, 310.0]])
    np.testing.assert_allclose(c[0], [63.5, 47.5], atol=1e-9)
    np.testing.assert_allclose(c[1] - c[0], [10.0, 0.0], atol=1e-9)  # image +y -> crop +x
    pts = np.random.default_rng(0).uniform(0, 500, (20, 2))
    np.testing.assert_allclose(codec.to_image(codec.to_crop(pts, A), A), pts, atol=1e-9)
    M = compose_affine(invert_affine(A), A)
    np.testing.assert_allclose(M, np.hstack([np.eye(2), np.zeros((2, 1))]), atol=1e-12)


def test_warp_puts_a_pixel_where_the_affine_says(codec):
    img = np.zeros((200, 300), np.uint16)
    img[120, 170] = 1000
    A = codec.crop_affine((160.0, 110.0), -30.0)
    crop = codec.warp(img, A)
    x, y = apply_affine(A, [[170.0, 120.0]])[0]
    iy, ix = np.unravel_index(np.argmax(crop), crop.shape)
    assert abs(ix - x) <= 0.5 + 1e-6 and abs(iy - y) <= 0.5 + 1e-6
    assert crop.dtype == np.uint16 and crop.shape == (96, 128)


def test_encode_decode_round_trip_subpixel(codec):
    """Seeded sub-pixel Gaussians: decoded positions within 0.05 heatmap px on average."""
    rng = np.random.default_rng(11)
    errs = []
    for _ in range(40):
        n = 6
        # well separated points, away from the border
        base = np.stack(np.meshgrid(np.arange(3) * 36 + 20, np.arange(2) * 36 + 20), -1).reshape(-1, 2)
        pts = [base[:n] + rng.uniform(-4, 4, (n, 2)), base[:n] + 12 + rng.uniform(-4, 4, (n, 2))]
        hm = codec.encode(pts)
        assert hm.shape == (2, 48, 64) and hm.max() <= 1.0
        dec = codec.decode(hm, threshold=0.3)
        for c in range(2):
            got, score = dec[c]
            assert len(got) == n
            d = np.linalg.norm(got[:, None] - pts[c][None], axis=2).min(1)
            errs.append(d / codec.stride)
            assert score.min() > 0.6
    errs = np.concatenate(errs)
    assert errs.mean() <= 0.05, errs.mean()
    assert errs.max() <= 0.1, errs.max()


def test_decode_plateau_gives_one_peak(codec):
    hm = np.zeros((2, 48, 64), np.float32)
    hm[0, 10, 10:12] = 0.9  # a two-pixel plateau
    hm[1, 30, 40] = 0.2  # below threshold
    (p0, s0), (p1, s1) = codec.decode(hm, threshold=0.3)
    assert len(p0) == 1 and len(p1) == 0


def test_decode_nms_keeps_the_stronger_of_close_peaks(codec):
    """A split tip's prong 10 px from its tip goes; a same-class tip 16 px away stays."""
    tip, prong, next_tip = np.array([60.0, 40.0]), np.array([52.0, 46.0]), np.array([60.0, 56.0])
    hm = codec.encode([np.stack([tip, next_tip]), np.zeros((0, 2))])
    hm[0] = np.maximum(hm[0], 0.6 * codec.encode([prong[None], np.zeros((0, 2))])[0])
    assert len(codec.decode(hm, 0.3)[0][0]) == 3
    pts, scores = codec.decode(hm, 0.3, min_distance=12.0)[0]
    assert len(pts) == 2
    np.testing.assert_allclose(pts[np.argsort(pts[:, 1])], [tip, next_tip], atol=0.1)
    assert scores.min() > 0.9


def test_decode_nms_measures_sub_pixel_distances(codec):
    """Two tips 12.7 px apart sit 6 heatmap px (12 px) apart on the grid: a 12 px NMS on
    the grid would drop the weaker, the sub-pixel distance keeps both (a dev-set miss)."""
    a, b = np.array([60.0, 40.6]), np.array([60.0, 53.3])
    hm = codec.encode([a[None], np.zeros((0, 2))])
    hm[0] = np.maximum(hm[0], 0.85 * codec.encode([b[None], np.zeros((0, 2))])[0])
    pts, _ = codec.decode(hm, 0.3, min_distance=12.0)[0]
    np.testing.assert_allclose(pts[np.argsort(pts[:, 1])], [a, b], atol=0.15)
    assert len(codec.decode(hm, 0.3, min_distance=13.0)[0][0]) == 1


def test_normalise_removes_gain_and_offset():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 4000, (64, 64)).astype(np.uint16)
    b = (a.astype(np.float64) * 7 + 1234).astype(np.uint16)
    np.testing.assert_allclose(normalise(a), normalise(b), atol=1e-4)
    batch = normalise(np.stack([a, b]))
    assert batch.shape == (2, 64, 64) and batch.dtype == np.float32


def test_crop_scene_matches_warped_frame():
    """A crop rendered through ``crop_scene`` equals the frame rendered and warped."""
    rng = np.random.default_rng(5)
    sc = sample_scene(rng, PRESETS["normal"], (512, 512))
    codec = HeatmapCodec((128, 128))
    tips = sc.tips_image()
    A = codec.crop_affine(tips[len(tips) // 2], 90.0 * sc.orientation + sc.rotation_deg)
    full = transmission(sc, ss=4, clean=True)
    warped = codec.warp(full, A)
    crop = transmission(crop_scene(sc, A, codec.input_size), ss=4, clean=True)
    inner = (slice(8, -8), slice(8, -8))
    diff = np.abs(warped[inner] - crop[inner])
    # bilinear resampling of sharp edges is the only difference
    assert np.median(diff) < 0.01 and diff.mean() < 0.03
    t = crop_scene(sc, A, codec.input_size).tips_image()
    np.testing.assert_allclose(t, apply_affine(A, tips), atol=1e-9)


@pytest.mark.parametrize("angle", [0.0, 93.0, 181.5, -88.0])
@pytest.mark.parametrize("size", [(100.0, 80.0), (300.0, 520.0), (610.0, 250.0), (700.0, 1500.0)])
@pytest.mark.parametrize("max_size", [None, (512, 1024)])
def test_tiles_cover_the_roi_and_own_each_point_once(angle, size, max_size):
    """Fixed 256 px tiles, and crops fitted to the ROI (one where it fits in max_size)."""
    codec = HeatmapCodec((256, 256))
    centre = np.array([500.0, 480.0])
    tiles = codec.plan_tiles(centre, angle, size, overlap=48, max_size=max_size, context=8.0, multiple=16)
    cw, ch = tiles.crop_size
    if max_size is None:
        assert (cw, ch) == (256, 256)
    else:
        assert cw % 16 == 0 and ch % 16 == 0 and cw <= max_size[0] and ch <= max_size[1]
        fits = [size[i] + 16 <= max_size[i] for i in range(2)]
        # one crop per axis where the ROI fits, covering it with the context and < 16 px more
        assert len(tiles) == (1 if fits[0] else 2) * (1 if fits[1] else 2)
        for i, c in enumerate((cw, ch)):
            if fits[i]:
                assert size[i] + 16 <= c < size[i] + 16 + 16
    rng = np.random.default_rng(1)
    # tips of one class: >= 16 px apart (a jittered 18 px grid over the ROI)
    gu, gv = (np.arange(-s / 2 + 2, s / 2 - 2, 18.0) for s in size)
    local = np.stack(np.meshgrid(gu, gv), -1).reshape(-1, 2) + rng.uniform(-1, 1, (len(gu) * len(gv), 2))
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    pts = local @ np.array([[c, -s], [s, c]]).T + centre
    # every point lies in some crop, >= overlap/2 - 1 px from that crop's edge, and is
    # owned by exactly one tile
    decoded = []
    seen = np.zeros(len(pts), int)
    for A in tiles.affines:
        q = apply_affine(A, pts)
        inside = (q >= 0).all(1) & (q[:, 0] <= cw - 1) & (q[:, 1] <= ch - 1)
        decoded.append([(q[inside], np.arange(len(pts))[inside].astype(np.float32)),
                        (np.zeros((0, 2)), np.zeros(0, np.float32))])
    (merged, ids), _ = codec.merge_tiles(decoded, tiles)
    np.add.at(seen, ids.astype(int), 1)
    assert len(pts) > 20
    assert (seen == 1).all(), np.bincount(seen)
    np.testing.assert_allclose(merged, pts[ids.astype(int)], atol=1e-6)
    # an owned point is >= overlap / 2 from the crop's edge, or nearer the ROI's edge than
    # the crop's (the outermost crops end at the ROI's edge, where stage 1 leaves a margin)
    rot = (merged - centre) @ np.array([[c, -s], [s, c]])
    to_roi_edge = np.array(size) / 2 - np.abs(rot)
    for t, A in enumerate(tiles.affines):
        o = tiles.owned[t]
        own = (rot[:, 0] >= o[0]) & (rot[:, 0] < o[1]) & (rot[:, 1] >= o[2]) & (rot[:, 1] < o[3])
        q = apply_affine(A, merged[own])
        to_crop_edge = np.minimum(q + 0.5, np.array([cw, ch]) - 0.5 - q)
        assert (to_crop_edge >= np.minimum(24.0, to_roi_edge[own]) - 1e-6).all()


def test_merge_reports_a_tip_on_an_ownership_boundary_once():
    """Two tiles decode one tip a fraction of a pixel apart, each on the other's side of
    their ownership boundary: it is reported once, from the tile where it is more central."""
    codec = HeatmapCodec((256, 256))
    tiles = codec.plan_tiles(np.array([300.0, 300.0]), 0.0, (200.0, 400.0))
    assert len(tiles) == 2 and tiles.owned[0][3] == tiles.owned[1][2]
    v_b = tiles.centre[1] + tiles.owned[0][3]  # the boundary, image y
    seen_by = [np.array([[310.0, v_b + 0.2]]), np.array([[310.0, v_b - 0.2]])]  # tile 0, tile 1
    other = np.array([[330.0, v_b + 40.0]])
    empty = (np.zeros((0, 2)), np.zeros(0, np.float32))
    dec = [[(codec.to_crop(np.vstack([seen_by[t], other]), tiles.affines[t]), np.array([0.9, 0.8], np.float32)),
            empty] for t in range(2)]
    (pts, scores), _ = codec.merge_tiles(dec, tiles)
    assert len(pts) == 2, pts
    assert np.abs(pts[:, 1] - v_b).min() <= 0.2 + 1e-9


def test_merge_drops_points_outside_the_frame():
    """A tile reaching past the frame's edge sees replicated pixels there, never a tip."""
    codec = HeatmapCodec((256, 256))
    tiles = codec.plan_tiles(np.array([100.0, 20.0]), 0.0, (200.0, 120.0))
    assert len(tiles) == 1
    pts = np.array([[100.0, 20.0], [100.0, -5.0], [150.0, -0.4]])
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    q = apply_affine(tiles.affines[0], pts)
    empty = (np.zeros((0, 2)), np.zeros(0, np.float32))
    (kept, s), _ = codec.merge_tiles([[(q, scores), empty]], tiles, image_size=(640, 480))
    np.testing.assert_allclose(kept, pts[[0, 2]], atol=1e-9)
    (all3, _), _ = codec.merge_tiles([[(q, scores), empty]], tiles)
    assert len(all3) == 3
