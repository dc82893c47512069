"""Stage 1 (``roi_corners``): oriented FAST corners, the tip-band ROI, tip direction, and
the full-resolution sub-pixel corner set Q for the fusion step.

Pipeline for one frame (all pure functions; I/O-free):

1. Robust 8-bit window from percentiles of a strided subsample (gain/offset unknown).
2. Coarse detection at about ``coarse_side`` px: FAST segment-test keypoints (OpenCV), the
   intensity-centroid orientation of each (the ORB "oFAST" orientation, vectorised),
   top ``n_coarse`` by FAST response.
3. Cluster centre of the corners: the mode of a response-weighted, smoothed 2D histogram,
   then the median of the corners near that mode.  The mean would be dragged by distractor
   corners (screws, walls, the field-of-view rim); the mode ignores any number of scattered
   outliers as long as they are less dense than the tip band, and the local median makes
   the centre sub-cell without being pulled by the cluster's ragged edges.
4. Layer angle from the structure tensor around the centre; tip direction = which way
   along the layers the image gets brighter (the dark stack body is behind the tips),
   cross-checked by the mean oFAST orientation of the cluster's corners.
5. Profiles in the de-rotated window (tips to +u): the intensity accumulated along v gives
   the body->band->background steps along u, the gradient energy accumulated along u over
   the band gives the stack's extent along v, clamped to the rows that end like layers
   (dark behind the band, bright past it: not a wall or bar beside the stack).  The ROI
   bounds are the outer ends of the strongest transitions of the smoothed derivatives,
   stretched to single layers that stick out past the band's end or end before its
   start (too few rows for the mean profile: a long or a short anode), plus a margin on
   each side: ``margin_behind_px``, ``margin_ahead_px`` (past the band's
   end, the least certain bound) and ``margin_across_px``.
6. Full resolution inside the ROI: FAST, top ``n_corners`` (N) by response, orientation,
   one ``cv2.cornerSubPix`` step -> Q ``(N, 2)``.

Note:
    Points are ``(N, 2) float32 (x, y)`` in full-resolution image pixels, pixel centres at
    integer coordinates.  Directions 0..3 = tips pointing right/down/left/up.  The ROI is an
    oriented box: ``centre (2,)``, ``size (w, h)`` along/across the layers, and ``angle_deg``,
    the rotation that maps the canonical frame (tips to +x) onto the image.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field

import cv2
import numpy as np

REASONS = ("blank", "saturated", "no_band", "ambiguous_direction")
STRONG_RANK = 8  # the strong corners' cut-off is relative to the 8th-best coarse response
STEP_RUN = 0.5  # grey levels per profile px: part of a transition
STEP_STRONG = 2.0  # grey levels per profile px: a transition worth bounding the ROI
STEP_TAIL = 0.1  # x a step's steepest slope: where the band's last step stops rising this fast, it ends
STEP_BLOCK = 6.0  # grey levels per profile px falling: a wall or tray edge ends the band
STEP_SHALLOW = 0.35  # a rising transition behind the band less steep than this x the band's
# steepest step is shading (the field of view's rim, vignetting), not the layers' ends
# (development frames: such shading 0.11-0.28, every other step joined behind the band >= 0.55)
GAP_V = (12.0, 24.0)  # profile px (4 full-res px each at 1024 px): a gap in the tip corners'
# chain wider than four layer pitches, within these bounds, separates the stack from a
# fixture or wall
LAYER_ENERGY = 0.1  # between two rising steps along u, layer edges (|d/dv|) at least this
# share of the band's: the layers go on, so does the band; less is a film, a holder or
# bare background past the tips, whose far edge is one more rising step
LAYER_DENSE = 0.5  # past a step that reaches the background's level, the band goes on to the
# next rising step only where its layer edges are this dense (thin anodes past the cathode tips,
# whose mean is near the background's, running on over a grey plate)
LAYER_ALONE = 0.3  # ... and where under this share of the band's,
LAYER_ANISO = 2.0  # also at least this x the energy along the layers (|d/du|): layers run
# along u, while a grey block or film past the tips is as rough both ways (its noise);
# strong layer energy passes alone (a layer angle 10 deg off makes layers rough along u too);
# at 0.2 a plate with a fixture past the tips passed alone (0.23 x, ratio 1.6: 9200002 hard 144)
LAYER_RISE = 0.25  # x the body/background step: where the layer edges are sparse (under
# LAYER_ALONE), the rows at them brighten this much (energy-weighted) within the next step:
# layers end there; a bar along them runs on, and a plate's edge row brightens by its grey only
GAP_BRIGHT = 0.75  # share of the body/background step: a layer's gap in the body, past a short layer's tip
SHORT_REACH = 24  # profile px (~100 full-res px): how far behind the band's start a short layer may end
LONE_REACH = 48  # profile px (~190 full-res px): how far a single long layer may stick out
STACK_TOL = 3.0  # profile px (~12 full-res px) kept past the outermost rows that end like layers
SOLID = 0.3  # share of the band's columns: a row dark over at least this much of the band is
# part of a solid run (an anode: dark to its tip; a cathode row turns bright at the band's start)
MIN_LAYER_STEP = 32.0  # grey levels between the body behind the band and the background past it
MAX_LAYER = 7.0  # profile px: the thickest run of rows taken for one layer when no pitch is
# known (detect_roi passes its own: the chain's pitch, clipped to 3-6, + 1)
TRAY_ROWS = 0.4  # share of the rows: a dark run at least this long is the stack, not a tray beside it
TRAY_ONLY = 0.1  # x the body/background step: a later rising step whose rows outside a thick dark
# run rise less than this on average is a tray's end (layer steps: 0.33-0.46 on the development frames)
AXIS_REACH = 10.0  # deg: the layers' strongest edge direction is searched this far from the tensor's axis
AXIS_WIDTH = 6.0  # deg: ... and refined with the gradients this close to it
AXIS_ACROSS = 0.2  # the tips' |mean cos| to an axis below this: they look across it (on 3000
# development frames: p99.9 0.26 at 90 deg off the layers, 0.0-0.04 where a wall's axis won;
# along the layers p0.1 0.32, min 0.15)
CORNER_RADIUS = 6  # coarse px: the patches around the cluster's corners whose gradients give a layer axis
V_CAP = 16  # profile px: how far past the tip corners' chain the stack's edges may lie: the
# outermost two or three layers next to a wall can lose their tip corners


@dataclass(frozen=True)
class RoiParams:
    n_corners: int = 512  # N: size of the full-resolution corner set Q (64..1024)
    n_coarse: int = 768  # corners kept at the coarse scale
    coarse_side: int = 512  # longest side of the coarse image
    fast_threshold: int = 10  # FAST threshold on the 8-bit window (coarse)
    fast_probe_threshold: int = 20  # coarse FAST probe (speed only: the result does not depend on it)
    fast_threshold_full: int = 12  # FAST threshold at full resolution
    percentiles: tuple[float, float] = (0.5, 99.5)
    # margins added to the transitions, full-resolution px (docs/design.md, step 5).  Behind
    # the band and across the stack the bounds (the body's end, the stack's outer edges) lie
    # outside a good cell's tips already, but for rare frames (of 2400: a ragged line of
    # cathode ends, one tip 3.5 px behind the body's end; a stack edge 2.2 px inside the
    # outermost tip); ahead, the band's end is the least certain bound (the farthest tip up
    # to 12 px past it)
    margin_behind_px: float = 16.0
    margin_ahead_px: float = 24.0
    margin_across_px: float = 12.0
    min_corners: int = 6  # fewer corners in the cluster: no band (a 9-layer stack has 9 tips)
    strong_frac: float = 0.25  # coarse corners kept for clustering: response >= this x the 8th-best
    min_coherence: float = 0.08  # structure-tensor coherence below this: no layer direction, no band
    min_contrast: float = 0.1  # (hi - lo) / hi below this: blank
    max_clipped: float = 0.985  # share of pixels at the dtype's maximum above this: saturated
    orient_radius: int = 7  # oFAST patch radius at the coarse scale
    orient_radius_full: int = 5  # ... and for Q at full resolution
    subpix_win: int = 2  # cornerSubPix half window
    subpix_iter: int = 1  # cornerSubPix steps: the first brings FAST's contour pixel to the tip;
    # more move part of the points back behind it (corner_set)


@dataclass
class RoiResult:
    ok: bool
    reason: str | None = None  # one of REASONS when not ok
    detail: str = ""
    direction: int = -1  # 0..3 tips right/down/left/up
    angle_deg: float = 0.0  # canonical (tips +x) -> image rotation, 90*direction + fine
    centre: np.ndarray = field(default_factory=lambda: np.zeros(2))  # (2,) x, y
    size: tuple[float, float] = (0.0, 0.0)  # (w, h): along the layers, across them
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # axis-aligned x0, y0, x1, y1 (exclusive), clipped
    corners: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))  # Q (N, 2)
    corner_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (N,)
    corner_angles: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (N,) rad
    window: tuple[float, float] = (0.0, 0.0)  # intensity window (lo, hi)

    def polygon(self) -> np.ndarray:
        """The oriented ROI's corners, ``(4, 2) float64 (x, y)``."""
        w, h = self.size
        c = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
        return c @ _rot(self.angle_deg).T + self.centre

    def to_canonical(self, pts: np.ndarray) -> np.ndarray:
        """Image points ``(N, 2)`` -> ROI frame (tips to +u, origin at the centre)."""
        return (np.asarray(pts, np.float64).reshape(-1, 2) - self.centre) @ _rot(self.angle_deg)

    def contains(self, pts: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """``(N,) bool``: points at least ``margin`` px inside the oriented ROI."""
        q = self.to_canonical(pts)
        w, h = self.size
        return (np.abs(q[:, 0]) <= w / 2 - margin) & (np.abs(q[:, 1]) <= h / 2 - margin)


def _rot(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s], [s, c]])


# --------------------------------------------------------------------------- windowing
def area_downscale(img: np.ndarray, f: int) -> np.ndarray:
    """``img`` ``(H, W)`` uint8/uint16 -> ``(H // f, W // f)`` with OpenCV's INTER_AREA
    (for sides divisible by ``f``: the mean of each ``f x f`` block).  A 2x step of even
    sides uses OpenCV's bit-exact bilinear instead: sampling halfway between pixels, it
    gives the same numbers (tested) and is ~1.3x faster on an image in cache (99 vs 135 us
    for 1024x1024 uint16); one read from memory costs both the same (~290 us)."""
    h, w = img.shape
    if f == 1:
        return img
    if f == 2 and h % 2 == 0 and w % 2 == 0:
        return cv2.resize(img, (w // 2, h // 2), interpolation=cv2.INTER_LINEAR_EXACT)
    return cv2.resize(img, (w // f, h // f), interpolation=cv2.INTER_AREA)


def robust_window(img: np.ndarray, percentiles=(0.5, 99.5), stride: int = 4) -> tuple[float, float]:
    """Percentile window ``(lo, hi)`` of ``img`` ``(H, W)`` from every ``stride``-th pixel:
    the order statistics nearest the two percentiles.  Two single-index partitions, the
    second over what lies at or past the first, give exactly what one partition with both
    indices gives, 3x faster (26 vs 83 us for the 16k samples of a 512x512 image)."""
    sub = img[::stride, ::stride].flatten()  # a copy: partitioned in place
    k = [min(max(int(round(q / 100 * (sub.size - 1))), 0), sub.size - 1) for q in percentiles]
    ka, kb = min(k), max(k)
    sub.partition(ka)
    a = float(sub[ka])
    rest = sub[ka:]  # every value here is >= the ka-th smallest, every one before it <=
    rest.partition(kb - ka)
    b = float(rest[kb - ka])
    return (a, b) if k[0] <= k[1] else (b, a)


def to_8bit(img: np.ndarray, lo: float, hi: float, scratch: bool = False) -> np.ndarray:
    """Window ``img`` ``(H, W)`` uint8/uint16 to uint8: ``lo`` -> 0, ``hi`` -> 255, saturating.
    ``scratch``: ``img`` is the caller's own intermediate and may be overwritten (it is in
    cache; a new array's first writes are not)."""
    scale = 255.0 / max(hi - lo, 1e-6)
    if img.dtype == np.uint8 or img.dtype == np.uint16:
        # an integer scalar keeps OpenCV on its integer path (3x faster than a float one);
        # percentiles of integer images are integers
        shifted = cv2.subtract(img, int(round(lo)), dst=img if scratch else None) if lo > 0 else img
        return cv2.convertScaleAbs(shifted, alpha=scale)
    return np.clip((img.astype(np.float32) - lo) * scale, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- oFAST
_RESPONSE = operator.attrgetter("response")


def fast_corners(g8: np.ndarray, threshold: int, n: int, ordered: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """FAST-9 keypoints with non-max suppression, the ``n`` strongest; ``ordered`` keeps
    them in detection order (row-major), else their order is arbitrary.

    Returns ``pts (K, 2) float32 (x, y)`` and ``response (K,) float32``, K <= n.
    """
    kps = cv2.FastFeatureDetector_create(int(threshold), True).detect(g8)
    if not kps:
        return np.zeros((0, 2), np.float32), np.zeros(0, np.float32)
    pts = cv2.KeyPoint_convert(kps).astype(np.float32)
    # map(attrgetter) reads the responses 2.5x faster than a generator expression (10 vs
    # 24 us for 183 keypoints on the development VM)
    resp = np.fromiter(map(_RESPONSE, kps), np.float32, len(kps))
    if len(kps) > n:
        keep = np.argpartition(-resp, n - 1)[:n]
        if ordered:
            keep.sort()
        pts, resp = pts[keep], resp[keep]
    return pts, resp


def coarse_corners(g8: np.ndarray, p: "RoiParams") -> tuple[np.ndarray, np.ndarray]:
    """The coarse FAST corners of ``g8`` ``(h, w)``: threshold ``p.fast_threshold``, the
    ``p.n_coarse`` strongest, in detection order.  Returns ``pts (K, 2)``, ``response (K,)``
    like ``fast_corners``, or, when that is provably the same for ``detect_roi``, only those
    of them at or above ``p.fast_probe_threshold``.

    FAST with non-max suppression at threshold t finds exactly the corners it finds at a
    lower threshold whose response is >= t, in the same order with the same responses
    (tested).  ``detect_roi`` keeps only corners with a response >= ``strong_frac`` x the
    ``STRONG_RANK``-th best; when that cut-off is at or above the probe's threshold and the
    probe found no more than ``n_coarse`` corners, the probe's corners pass the cut-off
    exactly as the full set's would.  When the probe found more than ``n_coarse`` corners
    (it keeps the ``n_coarse + 1`` strongest), those at or above the cut-off are returned
    when at least one it kept lies below it: then every corner at or above the cut-off is
    among those kept, and there are at most ``n_coarse`` of them, all stronger than the
    full set's ``n_coarse + 1``-th, so the full set's ``n_coarse`` strongest hold them too.
    A noisy frame then skips the pass at the base threshold over its hundreds or thousands
    of weak corners (FAST's own work on them, mostly: 471 us for the 2,828 corners of one
    such frame, the KeyPoint objects and their responses about 0.04 us each); a
    low-contrast frame, whose cut-off lies below the probe's threshold, pays for a second
    FAST pass."""
    t1 = max(p.fast_threshold, p.fast_probe_threshold)
    if t1 > p.fast_threshold:
        pts, resp = fast_corners(g8, t1, p.n_coarse + 1, ordered=True)
        if len(resp) >= STRONG_RANK:
            cut = p.strong_frac * _kth_largest(resp, STRONG_RANK)
            if cut >= t1:
                if len(resp) <= p.n_coarse:
                    return pts, resp
                strong = resp >= cut  # (n_coarse + 1,) the probe was truncated
                if not strong.all():
                    return pts[strong], resp[strong]
    return fast_corners(g8, p.fast_threshold, p.n_coarse, ordered=True)


def _kth_largest(x: np.ndarray, k: int) -> float:
    """The ``k``-th largest of ``x`` ``(K,)``, K >= k."""
    return float(np.partition(x, len(x) - k)[len(x) - k])


@functools.lru_cache(maxsize=16)
def _disc_moments(radius: int) -> np.ndarray:
    """``((2r+1)^2, 2) float32``: the weights ``(dx, dy)`` of the intensity centroid over the
    disc of ``radius``, row-major over the square patch, zero outside the disc."""
    d = np.arange(-radius, radius + 1)
    dx, dy = np.meshgrid(d, d)
    inside = dx * dx + dy * dy <= radius * radius
    out = (np.stack([dx, dy], -1) * inside[..., None]).reshape(-1, 2).astype(np.float32)
    out.setflags(write=False)  # cached and shared
    return out


def square_patches(img: np.ndarray, pts: np.ndarray, radius: int) -> np.ndarray:
    """The ``(2r+1, 2r+1)`` patches of ``img`` ``(H, W)`` centred on each of ``pts``
    ``(K, 2)`` (rounded), edge-replicated: ``(K, 2r+1, 2r+1)`` of img's dtype.  One fancy
    index into a strided view of all windows; the image is padded only when a patch
    leaves it."""
    h, w = img.shape
    c = np.rint(pts).astype(np.intp).reshape(-1, 2)  # (K, 2)
    if len(c) and int(c.min()) >= radius and int(c[:, 0].max()) < w - radius \
            and int(c[:, 1].max()) < h - radius:
        src = img
    else:
        src = cv2.copyMakeBorder(img, radius, radius, radius, radius, cv2.BORDER_REPLICATE)
        c = np.clip(c, 0, (w - 1, h - 1)) + radius
    s = 2 * radius + 1
    src = np.ascontiguousarray(src)
    sy, sx = src.strides
    # win[y, x]: the patch centred on (x + r, y + r); a read-only view, no copy
    win = np.ndarray((src.shape[0] - s + 1, src.shape[1] - s + 1, s, s), src.dtype, src, 0, (sy, sx, sy, sx))
    win.flags.writeable = False
    return win[c[:, 1] - radius, c[:, 0] - radius]


def ofast_orientation(g8: np.ndarray, pts: np.ndarray, radius: int = 7) -> np.ndarray:
    """Intensity-centroid orientation (ORB) of each keypoint, ``(K,) float32`` radians:
    the angle of ``(m10, m01)`` over a disc of ``radius``; 0 = towards +x.  Vectorised:
    one gather of all patches, one mat-vec product (exact: integer pixels times integer
    offsets sum to far below 2^24 in float32)."""
    if len(pts) == 0:
        return np.zeros(0, np.float32)
    return patch_orientation(square_patches(g8, pts, radius).astype(np.float32), radius)


def patch_orientation(patches: np.ndarray, radius: int) -> np.ndarray:
    """``ofast_orientation`` from the float32 patches ``(K, 2R+1, 2R+1)`` around the
    keypoints, R >= ``radius`` (their centre ``2 radius + 1`` px are used): ``(K,)``
    float32 radians."""
    o = (patches.shape[1] - 1) // 2 - radius
    sub = patches[:, o:patches.shape[1] - o, o:patches.shape[2] - o].reshape(len(patches), (2 * radius + 1) ** 2)
    m = sub @ _disc_moments(radius)  # (K, 2): m10, m01
    return np.arctan2(m[:, 1], m[:, 0]).astype(np.float32)


def ofast_orientation_serial(g8: np.ndarray, pts: np.ndarray, radius: int = 7) -> np.ndarray:
    """Reference: the same orientation with a Python loop per keypoint (tests, bench)."""
    out = np.zeros(len(pts), np.float32)
    for i, (x, y) in enumerate(np.rint(pts).astype(int)):
        m10 = m01 = 0.0
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                if dx * dx + dy * dy <= radius * radius:
                    v = float(g8[min(max(y + dy, 0), g8.shape[0] - 1), min(max(x + dx, 0), g8.shape[1] - 1)])
                    m10 += dx * v
                    m01 += dy * v
        out[i] = math.atan2(m01, m10)
    return out


# --------------------------------------------------------------------------- cluster
def cluster_centre(pts: np.ndarray, weights: np.ndarray, shape: tuple[int, int],
                   link: float = 32.0, orientations: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Robust centre of the tip band's corners.

    The corners are binned on a grid of ``link / 2`` cells, occupied cells are linked to
    their 8 neighbours (dilation), and the connected component with the largest total
    response wins: the band's tips form long, dense chains, while distractor corners
    (screws, wall ends, the field-of-view rim) form small or sparse groups.  Given the
    corners' oFAST ``orientations``, the component's weight is the length of the
    resultant of its weighted orientations instead: the tips all look at the bright side
    ahead, while a fixture's corners (a plate with holes, a screw head) look out of it
    every way, and a short stack's tips must win over a fixture with more corners.  The
    centre is the median of the winning corners, which their ragged chain ends cannot drag.

    Args:
        pts: ``(K, 2)`` corners; weights: ``(K,)``; shape: ``(H, W)`` of their image;
        orientations: ``(K,)`` radians, or ``None``.
    Returns:
        ``centre (2,)`` and ``members (K,) bool``.
    """
    cell = max(2.0, link / 2)
    h, w = shape
    gh, gw = int(h // cell) + 1, int(w // cell) + 1
    ci = np.minimum((pts[:, 1] / cell).astype(int), gh - 1)
    cj = np.minimum((pts[:, 0] / cell).astype(int), gw - 1)
    grid = np.bincount(ci * gw + cj, weights=weights, minlength=gh * gw).reshape(gh, gw)
    occ = cv2.dilate((grid > 0).astype(np.uint8), None)  # 3x3
    n, lab = cv2.connectedComponents(occ, connectivity=8)
    comp = lab[ci, cj]  # (K,) each corner's component
    if orientations is None:
        comp_w = np.bincount(lab.ravel(), weights=grid.ravel(), minlength=n)
    else:  # the resultant of the weighted orientations: tips look one way, a fixture's corners every way
        comp_w = np.hypot(np.bincount(comp, weights=weights * np.cos(orientations), minlength=n),
                          np.bincount(comp, weights=weights * np.sin(orientations), minlength=n))
    comp_w[0] = 0.0
    members = comp == int(np.argmax(comp_w))
    mem = pts[members]
    return np.array([_quantile(mem[:, 0], 0.5), _quantile(mem[:, 1], 0.5)]), members


# --------------------------------------------------------------------------- geometry
def _centre_gradients(g: np.ndarray, centre: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Sobel ``gx, gy`` of the ``(2 half + 1)``-px square patch of ``g`` around ``centre``
    (clipped to the image), each ``(P,)`` float32: the layers around the band's centre."""
    x, y = np.rint(centre).astype(int)
    y0, y1 = max(y - half, 0), min(y + half + 1, g.shape[0])
    x0, x1 = max(x - half, 0), min(x + half + 1, g.shape[1])
    # both 3x3 Sobel derivatives in one pass, int16 (the float32 Sobel's values exactly, tested)
    gx, gy = cv2.spatialGradient(np.ascontiguousarray(g[y0:y1, x0:x1]))
    return gx.astype(np.float32).ravel(), gy.astype(np.float32).ravel()


def _tensor_axis(gx: np.ndarray, gy: np.ndarray) -> tuple[float, float]:
    """Structure tensor of gradients ``gx, gy`` (any equal shapes) -> ``(axis, coherence)``:
    the layer axis in radians in ``(-pi/2, pi/2]``, perpendicular to the gradients' mean
    direction, and the coherence in [0, 1]."""
    jxx, jyy, jxy = float((gx * gx).sum()), float((gy * gy).sum()), float((gx * gy).sum())
    grad = 0.5 * math.atan2(2 * jxy, jxx - jyy)
    coh = math.hypot(jxx - jyy, 2 * jxy) / max(jxx + jyy, 1e-9)
    axis = grad + math.pi / 2
    if axis > math.pi / 2:
        axis -= math.pi
    return axis, coh


def _corner_gradients(patches: np.ndarray, radius: int = CORNER_RADIUS) -> tuple[np.ndarray, np.ndarray]:
    """Central-difference ``gx, gy`` in the ``(2r+1)``-px patches around the corners, each
    ``(K (2r+1)^2,)`` float32, from the float32 patches ``(K, 2R+1, 2R+1)`` around them,
    R > ``radius`` (the oFAST orientation's, when they are large enough).

    Around a tip the layer's own long edges and its neighbours' dominate; a fixture's
    corner has two perpendicular edges and adds no coherent direction, and a wall next to
    the band covers only the few patches that touch it."""
    o = (patches.shape[1] - 1) // 2 - radius - 1
    patch = patches[:, o:patches.shape[1] - o, o:patches.shape[2] - o]  # (K, 2r+3, 2r+3)
    gx = 0.5 * (patch[:, 1:-1, 2:] - patch[:, 1:-1, :-2])
    gy = 0.5 * (patch[:, 2:, 1:-1] - patch[:, :-2, 1:-1])
    return gx.ravel(), gy.ravel()


AXIS_BINS = 180  # dominant_axis: 1 deg bins of the gradient direction (2 deg of the doubled angle)
_CIRCULAR_5 = np.arange(-2, AXIS_BINS + 2) % AXIS_BINS  # the bins, 2 more either side, wrapped
_ONES_5 = np.ones(5)
_CIRCULAR_5.setflags(write=False)
_ONES_5.setflags(write=False)


def dominant_axis(gx: np.ndarray, gy: np.ndarray, candidates, orientations: np.ndarray,
                  reach: float = AXIS_REACH, width: float = AXIS_WIDTH) -> float:
    """The layer axis (radians, in ``(-pi/2, pi/2]``) from the gradients ``gx, gy``
    ``(P,)`` of the patch around the band's centre, candidate axes ``candidates``
    (radians, the preferred first) and the tips' oFAST ``orientations`` ``(K,)``
    (radians).

    1. Each candidate moves to the strongest direction of the gradients within ``reach``
       degrees of it: the peak of their energy histogram (over doubled angles, 1 deg
       bins, 5 bins smoothed).  A structure tensor's axis is the gradients' *mean*
       direction, which rounded, bent or tapered tip ends, a tray's end or a wall at a
       slant pulled up to 10 deg off the layers on development frames; the histogram's
       peak is the layers' edges themselves.  Only peaks near a candidate count: a wall
       across the layers, or a straight edge 20 deg off them, can carry more energy.
    2. The first candidate's peak is kept unless
       - the tips look across it: their agreement ``|mean cos(orientation - axis)|`` is
         under ``AXIS_ACROSS`` (a wall's or a fixture's edges beside the tips won the
         patch).  Then a peak they look along more (agreement at least twice that, and
         at least ``AXIS_ACROSS``) with at least a tenth of its energy may replace it
         (a peak without energy is no edge direction); or
       - it lies at the edge of its reach (the strongest direction is beyond it).  Then a
         peak inside its reach with more energy, and at least half its agreement, may.
       Of those that may, the largest energy x agreement wins.
    3. The axis is the structure tensor of the gradients within ``width`` degrees of the
       peak.

    On 4500 development frames the preferred (more coherent) tensor's peak was 13-90 deg
    off the layers on 5 and tips were outside the ROI: on 3 the tips looked across it (a
    can wall or bar beside the tips; on one both tensors took the wall and the tips' mean
    orientation gave the layers back), on 1 it was at its reach (bent tips pulled the
    corners' tensor 27 deg off; the centre's was right); on the 5th the cluster is a
    fixture's, not the tips', and stays 90 deg off.  No other frame's axis moved by more
    than 0.3 deg.  Agreement alone does not choose: where the stack leaves the frame, the
    corners along the frame's edge look sideways, and the tips' mean orientation pointed
    60 deg off the layers at a peak with no energy."""
    jxx, jyy, jxy = gx * gx, gy * gy, gx * gy
    c, s = jxx - jyy, 2.0 * jxy  # (P,) each: the doubled gradient, of length gx^2 + gy^2
    nb = AXIS_BINS
    # cv2.phase is in [0, 2 pi]: the factor keeps 2 pi in the last bin
    idx = (cv2.phase(c, s).ravel() * np.float32((nb - 1e-3) / (2.0 * math.pi))).astype(np.intp)  # (P,)
    hist = np.bincount(idx, weights=jxx + jyy, minlength=nb)  # (nb,) gradient energy
    smooth = np.convolve(hist[_CIRCULAR_5], _ONES_5, "valid")  # (nb,) circular
    r, w = int(round(reach)), int(round(width))
    # each candidate's gradient-direction bin (axis + 90 deg) and the bins within reach
    k0 = np.rint(np.degrees(np.asarray(candidates, np.float64)) + 90.0).astype(np.intp)  # (C,)
    near = (k0[:, None] + np.arange(-r, r + 1)) % nb  # (C, 2r+1)
    j = np.argmax(smooth[near], axis=1)  # (C,)
    peaks = near[np.arange(len(k0)), j]  # (C,) bins
    energy = smooth[peaks]  # (C,)
    at_edge = (j == 0) | (j == 2 * r)
    axes = np.radians(peaks + 0.5) - math.pi / 2  # (C,) the peaks' layer axes
    agree = np.abs(np.cos(np.asarray(orientations, np.float64)[None, :] - axes[:, None]).mean(1)) \
        if len(orientations) else np.ones(len(axes))  # (C,)
    if agree[0] < AXIS_ACROSS:  # the tips look across the preferred peak: a wall's or a fixture's
        alt = (agree >= np.maximum(2 * agree[0], AXIS_ACROSS)) & (energy >= 0.1 * energy[0])
    elif at_edge[0]:  # the strongest direction near the preferred candidate lies beyond its reach
        alt = ~at_edge & (energy > energy[0]) & (agree >= 0.5 * agree[0])
    else:
        alt = np.zeros(len(peaks), bool)
    best = int(np.argmax(np.where(alt, energy * agree, -1.0))) if alt.any() else 0
    peak = int(peaks[best])
    pick = np.zeros(nb, np.float32)
    pick[np.arange(peak - w, peak + w + 1) % nb] = 1.0
    on = pick[idx]  # (P,) 1 for the gradients within ``width`` of the peak
    sc, ss = float(on @ c), float(on @ s)
    axis = 0.5 * math.atan2(ss, sc) + math.pi / 2
    return axis - math.pi if axis > math.pi / 2 else axis


def _smooth(p: np.ndarray, k: int) -> np.ndarray:
    """Box filter of width ``k`` (made odd) over a 1-D profile ``(L,)``, edges replicated."""
    k = max(1, int(k)) | 1
    return cv2.blur(np.asarray(p, np.float32).reshape(1, -1), (k, 1), borderType=cv2.BORDER_REPLICATE).ravel()


def _quantile(x: np.ndarray, q: float) -> float:
    """``np.quantile(x, q)`` (linear interpolation) of a 1-D ``x`` by partition, without
    np.percentile's overhead (it dominates on the short profiles here)."""
    pos = q * (len(x) - 1)
    k = int(pos)
    part = np.array(x)  # a copy; ndarray.partition skips np.partition's dispatch
    if k + 1 >= len(x):
        part.partition(k)
        return float(part[k])
    part.partition([k, k + 1])
    return float(part[k] + (pos - k) * (part[k + 1] - part[k]))


def _run_max(d: np.ndarray, runs: np.ndarray) -> np.ndarray:
    """``(R,)`` maximum of ``d`` over each ``[start, end)`` run (runs are non-empty, sorted)."""
    return np.maximum.reduceat(np.append(d, -np.inf), runs.ravel())[::2]


def _edge_energy(a: np.ndarray, b: np.ndarray, per_row: bool = False, k: int = 5) -> np.ndarray:
    """``|a - b|`` (two ``(R, W)`` uint8 views one px apart) averaged over the rows, ``(W,)``
    per column (or with ``per_row`` over the columns, ``(R,)`` per row), smoothed over
    ``k``."""
    return _smooth(cv2.reduce(cv2.absdiff(a, b), 1 if per_row else 0, cv2.REDUCE_AVG, dtype=cv2.CV_32F), k)


def _runs(mask: np.ndarray) -> np.ndarray:
    """``(R, 2)`` [start, end) of the True runs of a 1-D bool array."""
    m = np.zeros(len(mask) + 2, bool)
    m[1:-1] = mask
    return (m[1:] != m[:-1]).nonzero()[0].reshape(-1, 2)  # edges alternate: start, end


def _run_thickness(runs: np.ndarray, n: int) -> np.ndarray:
    """``(n,) int``: the thickness of the run each row lies in, of the disjoint ``[start,
    end)`` runs ``(K, 2)`` (``_runs``), 0 outside them."""
    th = runs[:, 1] - runs[:, 0]  # (K,)
    edge = np.zeros(n + 1, np.intp)
    edge[runs[:, 0]] += th  # starts are distinct, and so are ends
    edge[runs[:, 1]] -= th
    return np.cumsum(edge[:-1])


def _tray_rows(th: np.ndarray, width: float) -> np.ndarray:
    """``(R,) bool`` from the rows' run thickness ``th`` ``(R,)`` (``_run_thickness``): the
    rows of runs thicker than ``width`` rows but under ``TRAY_ROWS`` of all rows (a tray
    beside the stack; a run that long is the stack itself, its layers unresolved)."""
    return (th > width) & (th < TRAY_ROWS * len(th))


def _rows_of(runs: np.ndarray, n: int) -> np.ndarray:
    """``(n,) bool``: the rows of the disjoint ``[start, end)`` runs ``(K, 2)``."""
    edge = np.zeros(n + 1, np.int32)
    edge[runs[:, 0]] += 1
    edge[runs[:, 1]] -= 1
    return np.cumsum(edge[:-1]) > 0


def _leading(mask: np.ndarray) -> np.ndarray:
    """``(R,)``: how many of each row's first columns of ``mask`` ``(R, C)`` are True."""
    return np.where(mask.all(axis=1), mask.shape[1], mask.argmin(axis=1))


def _group_runs(runs: np.ndarray, join: float) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, ends)``, each ``(G,)``: the runs ``(R, 2)`` (sorted, R >= 1) joined into
    groups wherever the gap between two runs is smaller than ``join``."""
    first, last = _group_bounds((runs[1:, 0] - runs[:-1, 1] >= join).nonzero()[0], len(runs))
    return runs[first, 0], runs[last, 1]


def _group_bounds(breaks: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(first, last)``, each ``(G,)``: the index of the first and of the last member of
    each group of ``n`` sorted items, from ``breaks`` ``(G - 1,)``: the last member of each
    group but the final one (increasing)."""
    last = np.empty(len(breaks) + 1, np.intp)
    last[:-1], last[-1] = breaks, n - 1
    first = np.empty_like(last)
    first[0], first[1:] = 0, breaks + 1
    return first, last


def _grow_rows(mask: np.ndarray) -> np.ndarray:
    """``mask`` ``(R, ...)`` bool, each row or-ed with its neighbours along axis 0."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    return out


def _densest_span(v: np.ndarray, gap: float) -> tuple[float, float]:
    """``(lo, hi)`` of the run of ``v`` ``(K,)`` (K >= 1) with the most members, where a run
    ends at a gap wider than ``gap``: the stack's tips are a chain of corners at most a
    layer pitch or two apart, a fixture or wall beside the stack is a separate run."""
    s = np.sort(v)
    last = (s[1:] - s[:-1] > gap).nonzero()[0]  # (C,) the last member of each run but the final one
    if not len(last):
        return float(s[0]), float(s[-1])
    starts, ends = _group_bounds(last, len(s))
    k = int((ends - starts).argmax())  # the first of the longest runs
    return float(s[starts[k]]), float(s[ends[k]])


def _chain_gap(v: np.ndarray) -> float:
    """The widest gap ``_densest_span`` bridges in the tip corners' chain ``v`` ``(K,)``:
    four layer pitches (the upper-quartile step between corners; the outermost layers next to
    a wall can lose their corners), within ``GAP_V``, but at least two pitches + 1 px:
    where only some anode tips give corners, one missing corner leaves a gap of two."""
    s = np.sort(v)
    steps = s[1:] - s[:-1]
    steps = steps[steps > 1.5]  # several corners on one tip are < 1.5 px apart
    # the upper quartile: a tip often has two or three corners 2-3 px apart, and those
    # steps would pull a median below the pitch between tips
    pitch = _quantile(steps, 0.75) if len(steps) else GAP_V[0] / 4
    # a sparse chain (its corners 12+ px apart) still bridges one missing corner
    return float(max(min(max(4.0 * pitch, GAP_V[0]), GAP_V[1]), 2.0 * pitch + 1.0))


def _fail(reason: str, detail: str, window=(0.0, 0.0)) -> RoiResult:
    return RoiResult(ok=False, reason=reason, detail=detail, window=window)


# --------------------------------------------------------------------------- main
def detect_roi(img: np.ndarray, p: RoiParams = RoiParams(), full_resolution: bool = False) -> RoiResult:
    """Stage 1 on one frame ``(H, W)`` uint8/uint16.  ``full_resolution`` skips the coarse
    scale (the reference the benchmark compares against)."""
    if img.ndim != 2 or img.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"frame must be (H, W) uint8/uint16, got {img.shape} {img.dtype}")
    H, W = img.shape
    f = 1 if full_resolution else max(1, int(math.ceil(max(H, W) / p.coarse_side)))
    coarse = area_downscale(img, f)
    lo, hi = robust_window(coarse, p.percentiles)
    top = 255.0 if img.dtype == np.uint8 else 65535.0
    if hi - lo < p.min_contrast * max(hi, 1.0):
        clipped = float((coarse[::4, ::4] >= top).mean())
        if clipped > p.max_clipped:
            return _fail("saturated", f"{clipped:.1%} of pixels at {int(top)}", (lo, hi))
        return _fail("blank", f"window {lo:.0f}..{hi:.0f} has no contrast", (lo, hi))
    g = to_8bit(coarse, lo, hi, scratch=coarse is not img)  # the coarse image is not used again

    pts, resp = coarse_corners(g, p)
    if len(pts) < p.min_corners:
        return _fail("no_band", f"{len(pts)} corners", (lo, hi))
    # Tip corners are high-contrast (a dark needle end against the bright background);
    # the body's layer texture and detector noise give many weak ones that would chain the
    # whole frame into one cluster.  Keep the strong ones, relative to a robust top response.
    ref = _kth_largest(resp, STRONG_RANK) if len(resp) >= STRONG_RANK else float(resp.max())
    strong = resp >= p.strong_frac * ref
    pts, resp = pts[strong], resp[strong]
    if len(pts) < p.min_corners:
        return _fail("no_band", f"{len(pts)} strong corners", (lo, hi))
    # one gather of patches for the orientation and, around the cluster's, the gradients
    patches = square_patches(g, pts, max(p.orient_radius, CORNER_RADIUS + 1)).astype(np.float32)  # (K, s, s)
    orient = patch_orientation(patches, p.orient_radius)  # (K,)
    centre, members = cluster_centre(pts, resp, g.shape, link=64.0 / f, orientations=orient)
    if members.sum() < p.min_corners:
        return _fail("no_band", f"densest cluster has {int(members.sum())} corners", (lo, hi))

    # layer axis and tip direction
    mp = pts[members]  # (Km, 2)
    spread = float((mp.max(0) - mp.min(0)).max())
    half = int(min(max(spread, 16), max(g.shape) // 3))
    grads = _centre_gradients(g, centre, min(half, 48)), _corner_gradients(patches[members])
    axis, coh = _tensor_axis(*grads[0])
    axis_c, coh_c = _tensor_axis(*grads[1])
    if coh_c > coh:  # walls or fixtures in the centre patch: prefer the corners' surroundings
        axis, coh, axis_c = axis_c, coh_c, axis
    if coh < p.min_coherence:
        return _fail("no_band", f"no dominant layer direction (coherence {coh:.2f})", (lo, hi))
    angles = orient[members]
    # the tensors' axes are mean directions; the layers' edges are the strongest one near
    # them that the tips look along (the tips' mean orientation is the last candidate)
    mean_tip = math.atan2(float(np.sin(angles).sum()), float(np.cos(angles).sum()))
    axis = dominant_axis(*grads[0], (axis, axis_c, mean_tip), angles)
    ax = np.array([math.cos(axis), math.sin(axis)])
    # Tip direction: the tips' oFAST orientations look at the bright side ahead of them
    # (measured: right in every conflict with the body-side test, which a can wall just
    # past the tips can fool); the darker body behind the tips decides when they are split.
    vote = float(np.cos(angles - axis).mean())  # > 0: corners look along +axis
    if abs(vote) >= 0.3:
        sign = 1 if vote > 0 else -1
    else:
        sign = _brighter_side(g, centre, ax, min(half, 40))
        if sign == 0:
            return _fail("ambiguous_direction", f"corner orientations {vote:+.2f}, no darker side", (lo, hi))
    phi = (math.degrees(axis) + (0.0 if sign > 0 else 180.0) + 45.0) % 360.0 - 45.0
    direction = int(round(phi / 90.0)) % 4

    # profiles in the de-rotated window (tips to +u), at a scale where the band is ~100 px
    fp = 2 if min(g.shape) >= 384 else 1
    prof = area_downscale(g, fp)
    c_p = (centre + 0.5) / fp - 0.5
    side = max(prof.shape)
    lu, lv = int(0.35 * side), int(0.65 * side)
    R = _rot(phi)
    M = np.empty((2, 3), np.float32)  # window -> prof: [R | t]
    M[:, :2], M[:, 2] = R, c_p - R @ np.array([lu, lv])
    win = cv2.warpAffine(prof, M, (2 * lu + 1, 2 * lv + 1), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REPLICATE)  # (Hw, Ww) uint8
    # tip-like corners: their oFAST orientation looks along the tips (the bright side is
    # ahead); corners along the body's layer lines or on fixtures mostly do not
    tiplike = np.cos(angles - math.radians(phi)) > 0.5
    if tiplike.sum() < p.min_corners // 2:
        return _fail("no_band", f"only {int(tiplike.sum())} tip-like corners", (lo, hi))
    q = ((mp[tiplike] + 0.5) / fp - 0.5 - c_p) @ R + np.array([lu, lv])  # window coords
    cu = _quantile(q[:, 0], 0.5)
    gap_v = _chain_gap(q[:, 1])
    cv = _densest_span(q[:, 1], gap_v)
    v0, v1 = int(max(cv[0], 0)), int(min(cv[1] + 1, win.shape[0]))
    max_layer = gap_v / 4 + 1  # profile px: a layer pitch and one row (gap_v is four pitches)
    steps = _u_steps(win, v0, v1, cu, max_layer=max_layer)
    if steps is None:
        return _fail("no_band", "no body/background step along the layers", (lo, hi))
    band_end, levels = steps[1], steps[2:]
    ext_u = (steps[0], float(_lone_end(win, v0, v1, band_end, *levels, max_layer=max_layer)))
    # the tips lie in the band: the chain of tip-like corners there is the stack's anchor
    # across the layers (the chain before the band was known may run on into the corners
    # of a fixture or bar beside the stack, outside the band along the layers)
    inband = (q[:, 0] >= ext_u[0] - 4) & (q[:, 0] <= ext_u[1] + 4)
    span = _densest_span(q[inband, 1], gap_v) if inband.any() else cv
    ext_v = _v_extent(win, ext_u, span)
    if ext_v is None:
        return _fail("no_band", "no stack edges across the layers", (lo, hi))
    # the tips are corners: across the stack the ROI covers the anchor up to V_CAP px past
    # the edges (an edge search may stop one layer short at a tray or wall)
    ext_v = (min(ext_v[0], max(span[0], ext_v[0] - V_CAP)), max(ext_v[1], min(span[1], ext_v[1] + V_CAP)))
    ext_v = _layer_rows_span(win, ext_u, ext_v, span, max_layer=max_layer, tips_v=q[:, 1])
    # long layers are the stack's: where its rows leave out some of the chain's (a bar or
    # wall beside the stack, which may run into the can wall past the tips), they are
    # followed again in the stack's rows only (when any were followed: fewer rows to follow
    # never follow more)
    r0, r1 = max(v0, int(math.ceil(ext_v[0]))), min(v1, int(ext_v[1]) + 1)
    stack = slice(r0 - v0, max(r1 - v0, r0 - v0))  # the stack's rows, relative to v0
    if ext_u[1] > band_end and (r0, r1) != (v0, v1):
        ext_u = (ext_u[0], float(_lone_end(win, v0, v1, band_end, *levels, max_layer=max_layer, keep=stack)))
    # layers that end before the others (a short anode: negative overhang) lie behind the
    # band's start, in the stack's rows
    ext_u = (float(_short_start(win, v0, v1, int(ext_u[0]), *levels, max_layer=max_layer, keep=stack)), ext_u[1])

    # window coords -> full-resolution image
    scale = f * fp
    u0, u1 = (np.array(ext_u) - lu) * scale + (-p.margin_behind_px, p.margin_ahead_px)
    v0f, v1f = (np.array(ext_v) - lv) * scale + (-p.margin_across_px, p.margin_across_px)
    size = (float(u1 - u0), float(v1f - v0f))
    mid = np.array([(u0 + u1) / 2, (v0f + v1f) / 2])
    c_full = (c_p + 0.5) * scale - 0.5 + R @ mid
    res = RoiResult(ok=True, direction=direction, angle_deg=phi, centre=c_full, size=size, window=(lo, hi))
    poly = res.polygon()
    x0, y0 = np.floor(poly.min(0)).astype(int)
    x1, y1 = np.ceil(poly.max(0)).astype(int) + 1
    res.box = (max(int(x0), 0), max(int(y0), 0), min(int(x1), W), min(int(y1), H))
    corner_set(img, res, p)
    return res


def _brighter_side(g: np.ndarray, centre: np.ndarray, ax: np.ndarray, half: int) -> int:
    """+1 if the image is brighter ahead of ``centre`` along ``ax`` than behind it."""
    s = np.arange(4, half + 1, 2, dtype=np.float32)
    w = np.arange(-half, half + 1, 4, dtype=np.float32)
    perp = np.array([-ax[1], ax[0]], np.float32)
    grid = centre[None, None, :] + w[None, :, None] * perp  # (1, Wn, 2)

    def mean_at(sign: float) -> float:
        pts = grid + sign * s[:, None, None] * ax
        xs = np.clip(np.rint(pts[..., 0]).astype(int), 0, g.shape[1] - 1)
        ys = np.clip(np.rint(pts[..., 1]).astype(int), 0, g.shape[0] - 1)
        return float(g[ys, xs].mean())

    diff = mean_at(1.0) - mean_at(-1.0)
    return 0 if abs(diff) < 8 else (1 if diff > 0 else -1)


def _u_extent(win: np.ndarray, v0: int, v1: int, anchor, max_layer: float = MAX_LAYER) -> tuple[float, float] | None:
    """``(start, end)`` of the band along u in window columns: ``_u_steps``, then the long
    layers past its end (``_lone_layers_end``) in rows ``[v0, v1)``; ``None`` if no band.
    ``detect_roi`` runs the two parts itself: it follows the long layers again once the
    stack's rows are known."""
    steps = _u_steps(win, v0, v1, anchor, max_layer=max_layer)
    if steps is None:
        return None
    start, end, body, background = steps
    return start, float(_lone_end(win, v0, v1, end, body, background, max_layer=max_layer))


def _lone_end(win: np.ndarray, v0: int, v1: int, end: int, body: float, background: float,
              max_layer: float = MAX_LAYER, keep: slice = slice(None)) -> int:
    """``_lone_layers_end`` in rows ``[v0, v1)`` of the window ``(Hw, Ww)`` (``keep``
    relative to ``v0``), which also sees up to ``2 * max_layer + 1`` rows either side:
    a bar beside the stack with only its edge rows in ``[v0, v1)`` looks as thin as a
    layer there, and a thin dark run that sticks out past the tips is followed."""
    rows, pad = _padded_rows(win, v0, v1, max_layer)
    return _lone_layers_end(rows, end, body, background, max_layer=max_layer, keep=keep, pad=pad)


def _short_start(win: np.ndarray, v0: int, v1: int, start: int, body: float, background: float,
                 max_layer: float = MAX_LAYER, keep: slice = slice(None)) -> int:
    """``_short_layers_start`` in rows ``[v0, v1)`` of the window ``(Hw, Ww)`` (``keep``
    relative to ``v0``), which also sees up to ``2 * max_layer + 1`` rows either side: the
    background beside the stack is a thick bright run there, not a layer's gap."""
    rows, pad = _padded_rows(win, v0, v1, max_layer)
    return _short_layers_start(rows, start, body, background, max_layer=max_layer, keep=keep, pad=pad)


def _padded_rows(win: np.ndarray, v0: int, v1: int, max_layer: float) -> tuple[np.ndarray, tuple[int, int]]:
    """Rows ``[v0, v1)`` of the window ``(Hw, Ww)`` with up to ``2 * max_layer + 1`` rows
    either side, ``(R, Ww)``, and how many were added before and after."""
    pad = int(math.ceil(2.0 * max_layer)) + 1
    p0, p1 = min(pad, v0), max(min(pad, win.shape[0] - v1), 0)
    return win[v0 - p0:v1 + p1], (p0, p1)


def _u_steps(win: np.ndarray, v0: int, v1: int, anchor,
             max_layer: float = MAX_LAYER) -> tuple[float, int, float, float] | None:
    """Body -> band -> background steps along u of the de-rotated window ``(Hw, Ww)``.

    The intensity accumulated over the stack rises at the cathode ends (body -> band) and
    again at the anode tips (band -> background).  From the rising transition nearest the
    anchor (the tip-like corners' median u), earlier rising transitions are added until one
    starts at the body's level (that is the cathode step) or one is far shallower than the
    band's steps (under ``STEP_SHALLOW`` x the steepest: shading across the stack behind
    the band, the field of view's dark rim or vignetting; layer ends rise sharply); such a
    run that also rises less than 15 % of the body/background step is a faint edge inside
    the band (a separator past the cathode ends) and is passed over.  Later ones are
    added until one reaches the background's level (the anode step), and past such a
    step only where layer edges as dense as ``LAYER_DENSE`` x the band's lie before the
    next one (thin anodes, whose mean is near the background's, running on under a grey
    plate).  A dark object in between (a strong falling transition that sinks more than
    halfway back to the body: a wall, a tray end) stops the search, unless layer edges
    that dense run through it (a grey plate over the anodes); so does a stretch without
    layers before the next step (its layer-edge energy, |d/dv| per column, under
    ``LAYER_ENERGY`` x the band's, or under ``LAYER_ALONE`` x and not ``LAYER_ANISO`` x
    its energy along the layers, |d/du|: noise is as rough both ways): a film, holder or
    grey block past the anode tips, whose far edge is one more rising step.  Sparse edges
    (under ``LAYER_ALONE``) must also be those of layers that end at the next step: the
    rows beside them brighten within it by ``LAYER_RISE`` x the body/background step,
    weighted by the edges' energy (a bar along the layers runs on, a plate's edge row
    brightens by its grey only).  Nor is a step
    added where the rows of a dark run thicker than
    ``2 * max_layer`` rows (two layer pitches) brighten and the other rows hardly do
    (``TRAY_ONLY``): the end of a tray beside the stack that runs on past the tips; nor
    where one dark run only brightens so, thicker than ``max_layer`` (a layer), and every
    other dark run there is thicker still: the end of a bar beside the stack, with no
    layer going on past it (a long or short anode is as thin as the others).
    The last step's run is cut the same way: of its parts that rise at least
    ``STEP_TAIL`` x its steepest slope, those with layers between them are joined (the
    cathode and anode steps of a short band form one run) and the band ends with the
    last; past it the background only brightens slowly (vignetting), or a plate's edge
    right past the tips rises again.
    Returns ``(start, end, body, background)``: the band's first and
    last column (before any long layer past it) and the profile's two levels.
    """
    if v1 - v0 < 3:
        return None
    # The profile is a mean over many rows of the 8-bit window, so its noise is far below
    # 1 grey level per px: steps are judged in absolute grey levels per px, not relative
    # to the largest step (which may belong to a wall).
    prof = _smooth(cv2.reduce(win[v0:v1], 0, cv2.REDUCE_AVG, dtype=cv2.CV_32F), 5).astype(np.float64)
    d = np.empty_like(prof)  # np.gradient: central differences, one-sided at the ends
    d[1:-1] = 0.5 * (prof[2:] - prof[:-2])
    d[0], d[-1] = prof[1] - prof[0], prof[-1] - prof[-2]
    pos = _runs(d > STEP_RUN)
    steep = _run_max(d, pos) if len(pos) else np.zeros(0)  # (P,) each rising run's steepest slope
    strong = steep >= STEP_STRONG
    pos, steep = pos[strong], steep[strong]
    neg = _runs(d < -STEP_BLOCK)
    if len(pos) == 0:
        return None
    gap = np.maximum(pos[:, 0] - anchor, anchor - pos[:, 1]).clip(0)
    i = int(np.argmin(gap + 1e-3 * np.abs((pos[:, 0] + pos[:, 1]) / 2 - anchor)))  # nearest, then most central
    body = float(prof[: pos[i, 1]].min())  # the profile is smoothed: min/max are robust
    background = float(prof[pos[i, 0]:].max())
    tol = 0.15 * (background - body)
    last = len(prof) - 1

    def blocked(a: int, b: int, e: np.ndarray | None = None, band_e: float = 0.0) -> bool:
        # a dark object between the steps at columns a and b (a wall, a tray end): a strong
        # falling run, after which the profile sinks more than halfway back to the body's
        # level.  A shallow dip (a halo past the cathode ends) does not block.  Given the
        # layer-edge energy per column ``e``, nor does a dark object with layer edges
        # through it as dense as ``LAYER_DENSE`` x the band's: a grey plate over the tips
        if not len(neg) or not ((neg[:, 0] >= a) & (neg[:, 1] <= b)).any():
            return False
        sunk = prof[a:b + 1] < body + 0.5 * (float(prof[a]) - body)  # (b - a + 1,)
        if not sunk.any():
            return False
        return e is None or not _quantile(e[a:b + 1][sunk], 0.5) > LAYER_DENSE * band_e

    lo_i = hi_i = i
    # an earlier step far shallower than the band's steps so far is shading across the
    # stack behind the band (the field of view's dark rim, vignetting), not layer ends;
    # one that also rises less than ``tol`` is neither (a faint edge inside the band:
    # separator past the cathode ends) and is passed over
    rise = prof[np.minimum(pos[:, 1], last)] - prof[pos[:, 0]]  # (P,)
    k = lo_i - 1
    while prof[pos[lo_i, 0]] > body + tol and k >= 0 and not blocked(pos[k, 1], pos[lo_i, 0]):
        if steep[k] >= STEP_SHALLOW * steep[lo_i:i + 1].max():
            lo_i = k
        elif rise[k] >= tol:
            break
        k -= 1

    def short_of_background(k: int) -> bool:  # step k ends below the background
        return prof[min(pos[k, 1], last)] < background - tol

    # layer-edge energy per column: the band's layers give it, a film or bare background
    # past the tips does not
    rows = win[v0:v1]
    e = _edge_energy(rows[1:], rows[:-1])  # (W,) across the layers
    band_e = float(e[pos[lo_i, 0]:pos[i, 1]].max())

    e_u = _edge_energy(rows[:, 1:], rows[:, :-1])  # (W - 1,) along them

    def layers_on(a: int, b: int, dense: bool, c1: int | None = None) -> bool:
        # medians over the columns between the steps; given the next step's end ``c1``,
        # sparse layer edges must also be those of rows that brighten within that step
        if b <= a:
            return True
        e_v = _quantile(e[a:b], 0.5)
        if dense:
            return e_v >= LAYER_DENSE * band_e
        if e_v >= LAYER_ALONE * band_e:
            return True
        return e_v >= LAYER_ENERGY * band_e and e_v >= LAYER_ANISO * _quantile(e_u[a:b], 0.5) \
            and (c1 is None or edges_end(a, b, c1))

    def brighten(s: int, c1: int) -> np.ndarray:  # (R,) each row's rise over columns [s, c1]
        return cv2.reduce(rows[:, s:c1 + 1], 1, cv2.REDUCE_MAX).ravel().astype(np.float32) - rows[:, s]

    def edges_end(a: int, b: int, c1: int) -> bool:
        # the rows beside the layer edges between columns a and b brighten within the
        # step over [b, c1] by at least a quarter of the body/background step, weighted by
        # the edges' energy (``LAYER_RISE``): layers end there; a bar or wall along the
        # layers that runs on, or a plate's edge, does not
        r = _edge_energy(rows[1:, a:b], rows[:-1, a:b], per_row=True, k=1)  # (R-1,)
        rise = brighten(min(b, last), c1)  # (R,)
        pair = np.maximum(rise[1:], rise[:-1])  # (R-1,)
        return float(r @ pair) >= LAYER_RISE * (background - body) * float(r.sum())

    mid = 0.5 * (body + background)

    def tray_end(k: int) -> bool:
        # the next step rises in rows of a dark run thicker than two layer pitches at
        # step k's end (by over a quarter of the body/background step on average) and
        # hardly anywhere else (under ``TRAY_ONLY`` of it): the end of a tray or bar
        # beside the stack, past the tips; where layers end, their rows rise too.  Or it
        # rises so in one dark run only, thicker than a layer, and every other dark run
        # there is thicker still (no layer goes on past it): a bar's end
        c0, c1 = min(pos[k, 1], last), min(pos[k + 1, 1], last)
        runs = _runs(rows[:, c0] < mid)  # (K, 2)
        th = runs[:, 1] - runs[:, 0]  # (K,)
        short = th < TRAY_ROWS * len(rows)  # (K,) a longer run is the stack
        runs, th = runs[short], th[short]
        if not (th > max_layer).any():  # no run thicker than a layer: neither a tray nor a bar
            return False
        rise = brighten(c0, c1)  # (R,)
        amp = background - body
        cs = np.concatenate(([0.0], np.cumsum(rise, dtype=np.float64)))
        gained = cs[runs[:, 1]] - cs[runs[:, 0]]  # (K,) each run's summed rise
        up = gained / th > 0.25 * amp  # (K,) runs that brighten
        trays = th > 2.0 * max_layer  # (K,)
        # a bar: the one run that brightens, thicker than a layer, every other run thicker still
        alone = up.sum() == 1 and not (th[~up] <= th[up][0]).any()
        bar = up & (th > max_layer) if alone else np.zeros_like(up)  # (K,)
        for sel in (trays, bar):
            if sel.any():
                one = _rows_of(runs[sel], len(rise))  # (R,)
                if gained[sel].sum() / th[sel].sum() > 0.25 * amp \
                        and float(rise[~one].mean()) < TRAY_ONLY * amp:
                    return True
        return False

    while hi_i < len(pos) - 1 and not blocked(pos[hi_i, 1], pos[hi_i + 1, 0], e, band_e) \
            and layers_on(pos[hi_i, 1], pos[hi_i + 1, 0], dense=not short_of_background(hi_i),
                          c1=min(int(pos[hi_i + 1, 1]), last)) \
            and not tray_end(hi_i):
        hi_i += 1
    # inside the last step's run, its parts that rise at least ``STEP_TAIL`` x its steepest
    # slope are joined while layers lie between them (the cathode and anode steps may form
    # one run); past them the background only brightens slowly (vignetting), or a grey
    # plate's edge right past the tips rises again with no layers before it
    a = int(pos[hi_i, 0])
    parts = _runs(d[a:pos[hi_i, 1]] >= STEP_TAIL * steep[hi_i]) + a  # (J, 2)
    on = np.array([layers_on(int(c0), int(c1), dense=False) for c0, c1 in zip(parts[:-1, 1], parts[1:, 0])], bool)
    stop = max(int(np.argmin(np.append(on, False))),  # the first part with no layers past it,
               int(np.searchsorted(parts[:, 0], anchor, side="right")) - 1)  # not before the anchor
    # the profile is smoothed over 5 px: the step's own end lies up to 2 px past its part
    return float(pos[lo_i, 0]), int(min(parts[stop, 1] + 2, pos[hi_i, 1])), body, background


def _lone_layers_end(rows: np.ndarray, end: int, body: float, background: float,
                     reach: int = LONE_REACH, wall_frac: float = 0.2, max_layer: float = MAX_LAYER,
                     keep: slice = slice(None), pad: tuple[int, int] = (0, 0)) -> int:
    """Past the band's end (column ``end`` of ``rows (R, W)``, the stack's rows of the
    window), follow single layers that stick out further than the others: a long anode
    is one dark row in a hundred, too little for the mean profile, but it is the defect
    (or the borderline cell) the ROI must not cut off.

    Dark means below the body/background midpoint.  The search ends at the first column
    where ``wall_frac`` of the rows are dark (a wall or tray across the layers) or after
    ``reach`` columns.  Before that, a row that is dark from ``end`` on (it or a
    neighbouring row: a thin layer a fraction of a degree off the window's rows hops
    between rows) is followed to where it turns bright: a layer ends in background.  A
    row that never turns bright is followed to the end of the search only when its dark
    rows at ``end`` are at most ``max_layer`` rows thick (about a layer pitch): a long
    anode that runs into the field of view's dark rim or past the reach; a bar or tray
    along the layers that runs into a can wall is thicker than a layer and is not.  Nor is
    a thin one when the wall is bright again past it within the search: that is the can
    wall facing the tips, which no layer reaches (the rim stays dark), and a row that runs
    into it is the can's thin bar beside the stack, meeting it in an L; the other rows of
    its dark run at ``end`` (its blurred edges, which turn bright a little before the
    wall) and their neighbours are not followed either.  A dark run at
    ``end`` thicker than ``2 * max_layer`` rows (and under ``TRAY_ROWS`` of them) is a
    tray beside the stack: it is not followed even where it ends in background, and it
    does not count towards a wall, so a long anode beside it still is.  Only
    the rows ``keep`` selects are followed (the stack's, when they are known); the walls
    and the thickness of the dark runs are judged on all rows.  The first and last
    ``pad`` rows of ``rows`` lie beyond the stack's rows (outside ``keep`` and the walls'
    count): a bar beside the stack whose edge rows are among them is judged by its whole
    thickness.  Returns the column where the band ends."""
    seg = rows[:, end:end + reach]
    if seg.size == 0:
        return end
    inner = np.zeros(len(seg), bool)  # (R,) the stack's rows, without the pad
    inner[pad[0]:len(seg) - pad[1]] = True
    dark = seg < 0.5 * (body + background)  # (R, C)
    # a dark run at ``end`` thicker than two layers is a tray or bar beside the stack: not
    # followed, wherever it ends, and not a wall across the layers either
    at_end = _runs(dark[:, 0])  # (K, 2) runs of rows dark at ``end``
    th = _run_thickness(at_end, len(seg))  # (R,) 0: not dark at ``end``
    tray = _tray_rows(th, 2.0 * max_layer)  # (R,)
    walled = dark[inner & ~tray].sum(axis=0) >= wall_frac * int(inner.sum())
    walls = np.flatnonzero(walled)
    cw = int(walls[0]) if len(walls) else seg.shape[1]  # columns before the first wall
    if cw == 0:
        return end
    # a can wall is bright again past it (the field of view's dark rim is not): a row that
    # runs into it without turning bright is a bar of the can, not a layer
    can_wall = cw < seg.shape[1] and not walled[cw:].all()
    near = _grow_rows(dark[:, :cw] & inner[:, None])  # the pad only tells how thick a run is
    run = _leading(near)  # (R,) dark columns from ``end`` on
    # (R,) rows of a dark run at ``end`` no thicker than a layer (``slim``: than two), and
    # their neighbours (the hop above); rows that end in background are followed unless
    # they are a tray's or next to one (``near`` spreads a tray's rows by one)
    thin = _grow_rows((th > 0) & (th <= max_layer))
    slim = _grow_rows((th > 0) & (th <= 2.0 * max_layer))
    follow = (run > 0) & (((run < cw) & (slim | ~_grow_rows(tray))) | (thin & (not can_wall)))
    if can_wall and len(at_end):
        # a dark run at ``end`` with a row that runs into the can wall is the can's bar
        # meeting it: its blurred edge rows (and their neighbours, by the hop) turn bright
        # a little before the wall, and are no layers either
        hits = np.concatenate(([0], np.cumsum(run >= cw)))  # (R+1,) rows into the wall, cumulative
        bar = at_end[hits[at_end[:, 1]] > hits[at_end[:, 0]]]  # (J, 2) runs with such a row
        follow &= ~_grow_rows(_rows_of(bar, len(run)))
    follow, run = follow[inner][keep], run[inner][keep]
    return end + (int(run[follow].max()) if follow.any() else 0)


def _short_layers_start(rows: np.ndarray, start: int, body: float, background: float,
                        reach: int = SHORT_REACH, max_layer: float = MAX_LAYER,
                        keep: slice = slice(None), pad: tuple[int, int] = (0, 0)) -> int:
    """Behind the band's start (column ``start`` of ``rows (R, W)``, the stack's rows of the
    window), follow single layers that end before the others: a short anode (a negative
    overhang, the defect that matters most) or a cathode that ends before the step.  Each
    is one row in dozens, too little for the mean profile; its tip lies behind the step.

    In the body every row is dark; past such a layer's tip its row is a bright gap.  A row
    is followed back from ``start`` where, at ``start``, it is a gap (``GAP_BRIGHT`` of the
    way from the body's level to the background's: the body's paler separator bands are
    not) in a run of rows above the body/background midpoint that is no thicker than
    ``max_layer`` rows (about a layer pitch: background beside the stack is thicker) and
    lies between two of the stack's rows (a gap that reaches the ``pad`` rows beyond them
    is the one between the stack and a bar beside it).  It is followed while it, or a
    neighbouring row (a layer a fraction of a degree off the rows hops between them),
    stays above the midpoint, and counts only where it turns dark within ``reach``
    columns: the layer's tip.  A gap that runs on further is no short layer's (a missing
    layer, a separator band fading back into the body).  Only the rows ``keep`` selects
    (relative to the rows without the pad) are followed.  Returns the column where the
    band starts."""
    a = max(start - reach, 0)
    seg = rows[:, a:start + 1][:, ::-1]  # (R, C): columns start, start - 1, ..., a
    if seg.shape[1] < 2:
        return start
    inner = np.zeros(len(seg), bool)  # (R,) the stack's rows, without the pad
    inner[pad[0]:len(seg) - pad[1]] = True
    bright = seg >= 0.5 * (body + background)  # (R, C)
    # (R,) gaps at ``start``, in a bright run there no thicker than a layer and between two
    # of the stack's rows (not touching the pad)
    runs = _runs(bright[:, 0])  # (K, 2)
    runs = runs[(runs[:, 1] - runs[:, 0] <= max_layer) & (runs[:, 0] > pad[0]) & (runs[:, 1] < len(seg) - pad[1])]
    gap = _rows_of(runs, len(seg)) & (seg[:, 0] >= body + GAP_BRIGHT * (background - body))
    if not gap[inner][keep].any():  # most frames: no gap at the start
        return start
    back = _leading(_grow_rows(bright))  # (R,) columns back from ``start`` where a row or a neighbour is bright
    follow = gap & (back < seg.shape[1])  # (R,) turns dark within the reach: the body behind a tip
    follow, back = follow[inner][keep], back[inner][keep]
    return start - (int(back[follow].max()) if follow.any() else 0)


def _v_extent(win: np.ndarray, ext_u: tuple[float, float], anchor, min_gap: int = 12,
              cap: int = V_CAP) -> tuple[float, float] | None:
    """Stack edges along v: the layer-edge energy (|d/dv| accumulated along u over the band)
    is high across the stack and falls to the background's level past its outer layers.

    Rows whose energy reaches a quarter of the in-stack level (the 90th percentile over the
    anchor, the tip-like corners' v span) are hot; hot runs closer than ``min_gap`` px, or
    four periods of the hot runs (up to ``2 * min_gap``), are joined (longer than any gap
    between two layers, <= 9 px at this scale, so the dips between layers never split the
    stack, nor do a short layer's missing edges), and the joined run with the most energy
    inside the anchor is the stack.  Noise corners in a bright, noisy background can
    stretch the anchor, but not the stack's energy.  The outermost tips are corners too, so an edge is
    never more than ``cap`` px (two to three layer pitches) beyond the anchor: a wall or
    tray right next to the stack cannot stretch the ROI.  Returns ``(top, bottom)`` rows.
    """
    a, b = int(ext_u[0]), int(math.ceil(ext_u[1]))
    if b - a < 2:
        return None
    band = win[:, a:b]
    e = _edge_energy(band[1:], band[:-1], per_row=True, k=3)  # (Hw - 1,) e[i]: rows i, i+1
    lo_a, hi_a = int(max(anchor[0], 0)), int(min(anchor[1] + 1, len(e)))
    if hi_a - lo_a < 2:
        return None
    level = _quantile(e[lo_a:hi_a], 0.9)
    runs = _runs(e >= 0.25 * level)
    if not len(runs):
        return None
    # a short (defective) layer leaves no edges in the band for two or three layer
    # pitches: gaps up to four periods of the hot runs inside the anchor are joined too
    inside = runs[(runs[:, 0] >= lo_a) & (runs[:, 0] <= hi_a), 0]
    period = _quantile(np.diff(inside).astype(np.float64), 0.5) if len(inside) > 2 else 0.0
    join = float(min(max(4.0 * period, min_gap), 2 * min_gap))
    starts, ends = _group_runs(runs, join)
    csum = np.concatenate(([0.0], np.cumsum(e)))
    lo_e, hi_e = np.minimum(np.maximum(starts, lo_a), hi_a), np.minimum(np.maximum(ends, lo_a), hi_a)
    k = int(np.argmax(csum[hi_e] - csum[lo_e]))  # the group with the most energy inside the anchor
    return max(float(starts[k]), lo_a - cap), min(float(ends[k]) + 1.0, hi_a + cap)


def _layer_rows_span(win: np.ndarray, ext_u: tuple[float, float], ext_v: tuple[float, float], anchor,
                     depth: int = 4, gap: int = 2, join: int = 4, tol: float = STACK_TOL,
                     max_layer: float = MAX_LAYER, tips_v: np.ndarray | None = None) -> tuple[float, float]:
    """Clamp the stack's extent ``ext_v`` (rows of the de-rotated window ``(Hw, Ww)``)
    across the layers to the rows that end like layers, with ``tol`` rows to spare.

    A row ends like a layer when it is dark just behind the band (the stack's body, the
    ``depth`` columns before ``ext_u[0] - gap``) and bright somewhere between the band's
    start and ``depth`` columns past its end (the background past its tip).  A wall or
    bar along the layers beside the stack is dark on both sides and bare background is
    bright on both, so neither stretches the ROI across the layers any more; the energy
    search (``_v_extent``) reaches them because their edges look like layer edges.
    Passing rows closer than ``join`` rows are grouped; the tip corners' rows (``anchor``)
    and every group within ``join`` rows of them are kept, so a defect inside the stack
    (a short layer pair, bright behind the band) never splits it, and the outermost layers
    keep their rows when their tips have no corners.  The end of a bar along the layers
    can give tip-like corners too, so the anchor may span a bar: a run of rows never
    bright past the band, thicker than ``max_layer`` rows (about a layer pitch), between
    the group that overlaps the anchor most and an end of the span ends the span at the
    layer rows next to it.  A tray or bar that touches the stack and ends near the tips
    does end like a layer; given the tip-like corners' rows ``tips_v`` ``(K,)``, it is
    left out as a solid run (``_tray_bounds``).  The levels are the anchor rows' medians;
    there is no clamp when they differ by less than ``MIN_LAYER_STEP`` or the columns
    leave the window.  Returns ``(top, bottom)``, never wider than ``ext_v``."""
    a, b = int(ext_u[0]) - gap, int(math.ceil(ext_u[1])) + depth
    if a - depth < 0 or b > win.shape[1]:
        return ext_v
    v0, v1 = int(max(ext_v[0], 0)), int(min(math.ceil(ext_v[1]) + 1, win.shape[0]))
    lo_a, hi_a = int(max(anchor[0], v0)) - v0, int(min(anchor[1] + 1, v1)) - v0
    if v1 - v0 < 3 or hi_a - lo_a < 2:
        return ext_v
    behind = cv2.reduce(win[v0:v1, a - depth:a], 1, cv2.REDUCE_AVG, dtype=cv2.CV_32F).ravel()  # (R,)
    ahead = cv2.reduce(win[v0:v1, a + 2 * gap:b], 1, cv2.REDUCE_MAX).ravel().astype(np.float32)  # (R,)
    dark, bright = _quantile(behind[lo_a:hi_a], 0.5), _quantile(ahead[lo_a:hi_a], 0.5)
    if bright - dark < MIN_LAYER_STEP:
        return ext_v
    thr = 0.5 * (dark + bright)
    runs = _runs((behind < thr) & (ahead >= thr))  # (K, 2) of rows that end like layers
    if not len(runs):
        return ext_v
    starts, ends = _group_runs(runs, join + 1)  # gaps of up to ``join`` rows are bridged
    near = (ends >= lo_a - join) & (starts <= hi_a + join)  # the groups that touch the anchor
    lo, hi = min(lo_a, int(starts[near].min(initial=lo_a))), max(hi_a, int(ends[near].max(initial=hi_a)))
    # the end of a bar along the layers can give tip-like corners too, so the chain may
    # span the bar: a run of rows never bright past the band (a layer always ends before
    # it) thicker than a layer, between the group of rows that overlaps the chain most
    # and an end of the span, is such a bar; the span stops at the layer rows next to it
    core = int(np.argmax(np.minimum(ends, hi_a) - np.maximum(starts, lo_a)))
    shut = _runs(ahead < thr)  # (J, 2) runs of rows dark past the band
    bar = shut[(shut[:, 1] - shut[:, 0]) > max_layer]
    before, after = bar[bar[:, 1] <= starts[core]], bar[bar[:, 0] >= ends[core]]
    if len(before):  # from the first group of layer rows past the bar
        lo = max(lo, int(starts[starts >= before[-1, 1]].min()))
    if len(after):
        hi = min(hi, int(ends[ends <= after[0, 0]].max()))
    lo, hi = _can_bar_bounds(behind < thr, ahead < thr, lo_a, hi_a, int(starts[core]), int(ends[core]), lo, hi)
    if tips_v is not None and len(tips_v) and b - depth - (a + 2 * gap) >= 4:
        lo, hi = _tray_bounds(win[v0:v1, a + 2 * gap:b - depth], thr, np.asarray(tips_v, np.float64) - v0,
                              max_layer, lo, hi)
    return max(ext_v[0], v0 + lo - tol), min(ext_v[1], v0 + hi + tol)


def _can_bar_bounds(dark_behind: np.ndarray, shut: np.ndarray, lo_a: int, hi_a: int, core_lo: int, core_hi: int,
                    lo: int, hi: int) -> tuple[int, int]:
    """Narrow the stack's rows ``[lo, hi)`` at a thin bar of the can beside the stack.

    The can's wall past the tips and its bar along the layers beside the stack meet in an
    L, and its outer corner is a tip-like corner that chains onto the tips, so the anchor
    (the corners' rows ``[lo_a, hi_a)``) reaches the bar, and a bar as thin as a layer
    passes the ``max_layer`` test.  What sets it apart from an outermost layer is that it
    is not part of the stack's body: rows bright behind the band separate it from the
    body, and it is not bright past the band (it runs into the wall).  An outermost layer is
    part of the body behind the band; a short layer pair, bright behind the band, is
    bright past it too.  So when the anchor's end row (or the row next to it) lies in a
    run of ``dark_behind`` rows wholly beyond the layer rows that overlap the anchor most,
    ``[core_lo, core_hi)`` (which are dark behind the band: the body), and most of its
    rows are ``shut`` (its blurred edge rows may not be), the span ends at the run before
    it, never inside ``[core_lo, core_hi)``.

    ``dark_behind``, ``shut``: ``(R,) bool`` per row of the span.  Returns ``(lo, hi)``.
    """
    runs = _runs(dark_behind)  # (B, 2)
    if len(runs) < 2:
        return lo, hi
    rows = np.array([lo_a, lo_a + 1, hi_a - 1, hi_a - 2])
    k = np.searchsorted(runs[:, 1], rows, "right")  # (4,) the run each row is in, if any
    inside = k < len(runs)
    inside[inside] = runs[k[inside], 0] <= rows[inside]
    if inside[0] or inside[1]:
        j = int(k[0] if inside[0] else k[1])
        s, e = runs[j]
        if e <= core_lo and 2 * int(shut[s:e].sum()) >= e - s:  # a run follows: the core's
            lo = max(lo, min(int(runs[j + 1, 0]), core_lo))
    if inside[2] or inside[3]:
        j = int(k[2] if inside[2] else k[3])
        s, e = runs[j]
        if s >= core_hi and 2 * int(shut[s:e].sum()) >= e - s:  # a run precedes: the core's
            hi = min(hi, max(int(runs[j - 1, 1]), core_hi))
    return lo, hi


def _tray_bounds(band: np.ndarray, thr: float, tips_v: np.ndarray, max_layer: float,
                 lo: int, hi: int) -> tuple[int, int]:
    """Narrow the stack's rows ``[lo, hi)`` at a tray or bar along the layers that touches
    the stack and ends near the tips: its rows end like layers and its end gives tip-like
    corners that chain onto the tips', so neither the row test nor the anchor leaves it out.

    ``band`` ``(R, C)``: the span's rows of the band's columns; ``tips_v`` ``(K,)``: the
    tip-like corners' rows in the same frame.  Solid runs are rows dark (under ``thr``) over
    at least ``SOLID`` of the band: each anode is one, about a layer thick, and cathode and
    gap rows, which turn bright at the band's start, separate them.  A tray is a solid run
    thicker than both ``max_layer`` and twice the median run.  The stack lies on the side
    of the tip corners' median; the span ends at the tray's near rows, kept to half a layer
    past the last tip corner in the run (a layer that merges into the tray keeps its tip) or
    the median run's thickness (an outermost layer that lost its corner).  Corners within
    1.5 rows of the run's far edge are the tray's own end and do not count; a run with a
    tip corner within 1.5 ``max_layer`` rows of its far edge (less than ``max_layer`` rows
    of it would be left out) is layers, blurred layers that all stick out (a defect), and
    is kept whole.  Returns ``(lo, hi)``."""
    frac = cv2.reduce((band < thr).view(np.uint8), 1, cv2.REDUCE_AVG, dtype=cv2.CV_32F).ravel()  # (R,)
    solid = _runs(frac >= SOLID)  # (S, 2)
    if not len(solid):
        return lo, hi
    th = solid[:, 1] - solid[:, 0]
    med = _quantile(th, 0.5)
    solid = solid[th > max(max_layer, 2.0 * med)]
    if not len(solid):
        return lo, hi
    sv = np.sort(tips_v)  # (K,)
    mid, half = _quantile(sv, 0.5), 0.5 * max_layer
    s, e = solid[:, 0].astype(np.float64), solid[:, 1].astype(np.float64)  # (S,) each
    # past the median (the stack at the run's start): the last tip corner in the run
    i0, i1 = np.searchsorted(sv, s - 1.0), np.searchsorted(sv, e - 2.5)
    last = np.where(i1 > i0, sv[i1 - 1], -np.inf)  # i1 > i0 >= 0 where it is used
    cut = np.ceil(np.maximum(last + half, s + med))
    ok = (s > mid) & (cut < e - max_layer)
    if ok.any():
        hi = min(hi, int(cut[ok].min()))
    # before the median (the stack at the run's end): the first tip corner in the run
    j0, j1 = np.searchsorted(sv, s + 1.5, "right"), np.searchsorted(sv, e, "right")
    first = np.where(j1 > j0, sv[np.minimum(j0, len(sv) - 1)], np.inf)
    cut = np.floor(np.minimum(first - half, e - med))
    ok = (e <= mid) & (cut > s + max_layer)
    if ok.any():
        lo = max(lo, int(cut[ok].max()))
    return lo, hi


def corner_set(img: np.ndarray, res: RoiResult, p: RoiParams) -> None:
    """Fill ``res.corners`` with Q: the ``n_corners`` strongest full-resolution FAST corners
    inside the ROI, refined with ``p.subpix_iter`` ``cornerSubPix`` steps.

    FAST marks a pixel on a tip's contour, a median 1.1-1.3 px behind its extreme point
    along the layers (the tip the rules measure).  One ``cornerSubPix`` step brings it to
    0.1 px (normal phantoms) / 0.6 px (hard) behind it and narrows the scatter.  Further
    steps bring the median nearer still but move part of the points back behind the tip,
    which widens the scatter again (sd along the layers 0.90 -> 1.22 px normal, 1.22 ->
    1.66 px hard for 1 -> 6 steps) and takes the mean distance to the nearest tip up
    (docs/accuracy.md).  So the default is one step, which is also the cheapest."""
    x0, y0, x1, y1 = res.box
    crop = to_8bit(img[y0:y1, x0:x1], *res.window)
    pts, resp = fast_corners(crop, p.fast_threshold_full, 4 * p.n_corners)
    if len(pts):
        inside = res.contains(pts + (x0, y0))
        pts, resp = pts[inside], resp[inside]
    if len(pts) > p.n_corners:
        keep = np.argpartition(-resp, p.n_corners - 1)[: p.n_corners]
        pts, resp = pts[keep], resp[keep]
    if len(pts):
        angles = ofast_orientation(crop, pts, p.orient_radius_full)
        w = p.subpix_win
        crit = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, p.subpix_iter, 0.03)
        pts = cv2.cornerSubPix(crop, pts.reshape(-1, 1, 2).copy(), (w, w), (-1, -1), crit).reshape(-1, 2)
        res.corners = pts + np.array([x0, y0], np.float32)
        res.corner_scores = resp.astype(np.float32)
        res.corner_angles = angles


def detect_rois(frames: list[np.ndarray], p: RoiParams = RoiParams()) -> list[RoiResult]:
    """Batch API: stage 1 on each frame ``(H_i, W_i)``."""
    return [detect_roi(f, p) for f in frames]
