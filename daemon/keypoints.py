"""Stages 2-3 glue: the tips of one frame from its ROI, through the model.

``tip_candidates``: cover the oriented ROI with canonical crops (``CropPlan``,
``HeatmapCodec.plan_tiles``), sample and normalise them, run the model in batches, decode
each crop's heatmaps and merge the crops' points back into image coordinates (each tip
reported once).  ``select_tips``:
the hysteresis that keeps strong peaks and the weak ones that continue the staircase.
``detect_tips`` is the two in a row.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .codec import MAX_CROP, keep_strongest, normalise


@dataclass
class Tips:
    """Tips of one frame: ``anodes (Na, 2)``, ``cathodes (Nc, 2)`` image ``(x, y)`` and their
    peak scores ``(Na,)``, ``(Nc,)``; ``tiles`` = number of crops run."""

    anodes: np.ndarray
    anode_scores: np.ndarray
    cathodes: np.ndarray
    cathode_scores: np.ndarray
    tiles: int = 0


@dataclass(frozen=True)
class CropPlan:
    """How an ROI becomes model crops (``HeatmapCodec.plan_tiles``): crops overlapping by
    ``overlap`` px; ``max_size (w, h)`` None for fixed ``codec.input_size`` tiles, else
    crops fitted to the ROI plus ``context`` px per side, at most ``max_size``, in steps of
    ``multiple`` px (``model`` config section: tile_overlap_px, max_crop_px, crop_context_px)."""

    overlap: float = 48.0
    max_size: tuple[int, int] | None = MAX_CROP
    context: float = 8.0
    multiple: int = 16

    @classmethod
    def from_config(cls, m) -> "CropPlan":
        """From the ``model`` config section (``daemon.config.ModelConfig``)."""
        return cls(m.tile_overlap_px, m.max_crop_px, m.crop_context_px)

    def for_model(self, model) -> "CropPlan":
        """This plan as ``model`` can run it: fixed tiles for a model with a fixed input size
        or one that runs one input shape (``fixed_shape``), steps of at least the model's
        ``size_multiple`` otherwise."""
        if self.max_size is None or not getattr(model, "dynamic_size", False) or getattr(model, "fixed_shape", False):
            return replace(self, max_size=None)
        m = int(model.size_multiple)
        top = getattr(model, "max_size", self.max_size)
        return replace(self, multiple=int(-(-max(self.multiple, m) // m) * m),
                       max_size=(min(self.max_size[0], top[0]), min(self.max_size[1], top[1])))

    def tiles(self, codec, roi):
        """The ``Tiles`` covering ``roi`` (a successful ``RoiResult``)."""
        return codec.plan_tiles(roi.centre, roi.angle_deg, roi.size, self.overlap, max_size=self.max_size,
                                context=self.context, multiple=self.multiple)


def crops_for_roi(img: np.ndarray, roi, codec, plan: CropPlan = CropPlan(max_size=None)):
    """``(tiles, x (T, 1, h, w) float32)``: the normalised crops covering ``roi`` (all
    crops of one ROI have one size)."""
    tiles = plan.tiles(codec, roi)
    crops = np.stack([codec.warp(img, A, tiles.crop_size) for A in tiles.affines])
    return tiles, normalise(crops)[:, None]


def run_model(model, x: np.ndarray, max_batch: int) -> np.ndarray:
    """``model`` on crops ``x (T, 1, h, w)`` in batches of at most ``max_batch``:
    heatmaps ``(T, K, h', w')``."""
    return np.concatenate([model(x[i:i + max_batch]) for i in range(0, len(x), max_batch)])


def candidates_from_heatmaps(hm: np.ndarray, tiles, codec, image_size: tuple[int, int],
                             low_threshold: float = 0.3, min_distance: float = 12.0
                             ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Decode the heatmaps ``hm (T, K, h, w)`` of the crops ``tiles`` and merge them into
    image coordinates: per class ``(points (N, 2) x, y, scores (N,))``; ``image_size``
    is ``(w, h)``."""
    decoded = [codec.decode(h, low_threshold, min_distance=min_distance) for h in hm]
    return codec.merge_tiles(decoded, tiles, image_size=image_size)


def tip_candidates(img: np.ndarray, roi, model, low_threshold: float = 0.3, plan: CropPlan = CropPlan(),
                   max_batch: int = 8, min_distance: float = 12.0) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """Every peak of at least ``low_threshold`` in ``roi``: per class ``(points (N, 2) image
    x, y, scores (N,))`` (``HeatmapCodec.decode`` with ``min_distance`` px NMS, tiles
    merged), and the number of tiles run."""
    codec = model.codec
    tiles, x = crops_for_roi(img, roi, codec, plan.for_model(model))
    hm = run_model(model, x, max_batch)
    image_size = (img.shape[1], img.shape[0])
    return candidates_from_heatmaps(hm, tiles, codec, image_size, low_threshold, min_distance), len(tiles)


def select_tips(pts: np.ndarray, scores: np.ndarray, threshold: float, low_threshold: float,
                reach: tuple[float, float] = (0.75, 1.25)) -> np.ndarray:
    """Hysteresis on one class's candidates ``pts (N, 2)``, ``scores (N,)``: a keep mask
    ``(N,)``.  A peak of at least ``threshold`` is a tip.  A weaker one (down to
    ``low_threshold``) is a tip when it continues the staircase: its nearest strong tip
    of the class lies between ``reach[0]`` and ``reach[1]`` times the strong tips' median
    nearest-neighbour spacing (one layer period; an outermost layer dimmed by a tray or a
    fixture beside it), not nearer (a split tip's prong) and not further (a fixture).
    Strong peaks are never dropped for lying apart: a short anode, the defect that matters
    most, sits far behind its neighbours along the layers."""
    strong = scores >= threshold
    weak = ~strong & (scores >= low_threshold)
    if strong.sum() < 3:
        return strong
    s = pts[strong]
    d_ss = np.linalg.norm(s[:, None] - s[None], axis=2)
    np.fill_diagonal(d_ss, np.inf)
    period = float(np.median(d_ss.min(axis=1)))
    keep = strong.copy()
    if weak.any():
        d_ws = np.linalg.norm(pts[weak][:, None] - s[None], axis=2).min(axis=1)
        keep[weak] = (d_ws >= reach[0] * period) & (d_ws <= reach[1] * period)
    return keep


def same_layer_keep(v: np.ndarray, scores: np.ndarray, v_all: np.ndarray, frac: float = 0.75) -> np.ndarray:
    """One tip per layer: a keep mask ``(N,)`` for one class's tips at stacking-axis
    positions ``v (N,)`` with ``scores (N,)``; ``v_all (M,)`` are all tips' positions
    (both classes).  The layer pitch is the median step between neighbouring tips; a tip
    within ``frac`` pitches of a stronger tip of its class is on the same layer (a split
    tip's prong, the second peak of a folded tip, a blob on the layer's line) and is
    dropped.  Real neighbours of one class are two pitches apart, so ``frac`` < 1 never
    merges two layers, not even across a missing one."""
    keep = np.ones(len(v), bool)
    steps = np.diff(np.sort(np.asarray(v_all, np.float64)))
    steps = steps[steps > 1.0]
    if len(v) < 2 or len(steps) < 2:
        return keep
    thr = frac * float(np.median(steps))
    return keep_strongest(np.abs(v[:, None] - v[None, :]) < thr, scores)


def tips_from_heatmaps(hm: np.ndarray, tiles, codec, image_size: tuple[int, int], threshold: float = 0.6,
                       low_threshold: float = 0.3, min_distance: float = 12.0) -> Tips:
    """The tips of one frame from its crops' heatmaps ``hm (T, K, h, w)``:
    ``candidates_from_heatmaps`` then ``select_tips`` per class (the daemon's path after
    a batched model call)."""
    (a, sa), (c, sc) = candidates_from_heatmaps(hm, tiles, codec, image_size, min(low_threshold, threshold),
                                                min_distance)
    ka = select_tips(a, sa, threshold, low_threshold)
    kc = select_tips(c, sc, threshold, low_threshold)
    return Tips(a[ka], sa[ka], c[kc], sc[kc], len(hm))


def detect_tips(img: np.ndarray, roi, model, threshold: float = 0.6, plan: CropPlan = CropPlan(),
                max_batch: int = 8, min_distance: float = 12.0, low_threshold: float = 0.3) -> Tips:
    """Tips of ``img`` ``(H, W)`` inside ``roi`` (a successful ``RoiResult``) with ``model``
    (a ``KeypointModel`` or any callable with a ``codec``): crops (``plan``), the model in
    batches of ``max_batch``, then ``tips_from_heatmaps``."""
    codec = model.codec
    tiles, x = crops_for_roi(img, roi, codec, plan.for_model(model))
    hm = run_model(model, x, max_batch)
    return tips_from_heatmaps(hm, tiles, codec, (img.shape[1], img.shape[0]), threshold, low_threshold,
                              min_distance)


__all__ = ["Tips", "CropPlan", "detect_tips", "tip_candidates", "select_tips", "crops_for_roi",
           "candidates_from_heatmaps", "tips_from_heatmaps", "same_layer_keep", "run_model"]
