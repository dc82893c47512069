"""Stage 3 (``refine``): confidence-driven fusion of the heatmap tips with the gradient-based
corner set Q (the paper's corner prior).

Each decoded tip looks for support among the corners within ``radius`` (scaled to the
heatmap stride: a tip's decoding error is a fraction of a heatmap pixel, a corner that far
off belongs to something else).  The two positions are combined by inverse variance:

- the tip's variance is ``(sigma_tip / score)^2``: a weak or flat heatmap peak is less
  certain (the peak value is the codec's confidence, 1.0 for an ideal target);
- the corners' mean has variance ``sigma_corner^2 / n_eff`` with ``n_eff`` the effective
  number of supporting corners (weights: FAST response times a Gaussian of the distance);
- optionally (``bias_correction``), the corners are first shifted by the frame's median
  along-axis offset between corners and tips: Q's corners lie behind a rounded tip's
  extreme point (0.1-0.6 px median with one cornerSubPix step, docs/accuracy.md "Q").
  Off by default: the offset varies from layer to layer, and on the development frames
  the correction made the fused tips worse, not better.

A tip without support keeps its position and has its score multiplied by
``unsupported_factor``, so that the rules' minimum confidence can see it.

The sigmas are measured, not guessed (development root 555, docs/design.md): the HRNet's
tips scatter 0.1-0.35 px per axis, the nearest corners 0.75-1.6 px.  So the corners move
a tip by a few percent of their difference at most, and on these phantoms the fusion's
accuracy gain is small or negative (docs/design.md, "Fusion").

Note:
    Points ``(M, 2)`` / corners ``(N, 2)`` are image ``(x, y)``; ``axis (2,)`` is the unit
    vector along the layers towards the tips (``RoiResult.angle_deg``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FusionParams:
    radius_strides: float = 1.5  # support radius in heatmap strides (3 px at stride 2)
    sigma_tip: float = 0.25  # px, a tip's positional scatter at score 1
    sigma_corner: float = 1.0  # px, a corner's scatter around its tip after the bias
    unsupported_factor: float = 0.9  # score multiplier for a tip no corner supports
    bias_correction: bool = False  # shift the corners by the frame's median along-axis offset
    min_pairs_for_bias: int = 5  # ... only with at least this many supported tips


def corner_bias(points: np.ndarray, corners: np.ndarray, axis: np.ndarray, radius: float) -> float:
    """The frame's median along-``axis`` offset (px) of each tip's nearest corner within
    ``radius`` from the tip, over the tips that have one; 0.0 without any."""
    if not len(points) or not len(corners):
        return 0.0
    d = np.linalg.norm(corners[None] - points[:, None], axis=2)  # (M, N)
    j = d.argmin(axis=1)
    near = d[np.arange(len(points)), j] <= radius
    if not near.any():
        return 0.0
    return float(np.median((corners[j[near]] - points[near]) @ axis))


def fuse(points: np.ndarray, scores: np.ndarray, corners: np.ndarray, corner_scores: np.ndarray,
         axis: np.ndarray, stride: float, p: FusionParams = FusionParams()) -> tuple[np.ndarray, np.ndarray]:
    """Refine tips ``points (M, 2)`` with ``scores (M,)`` by the corners ``(N, 2)`` with
    FAST responses ``(N,)``.  Returns ``(points (M, 2), scores (M,))``; pure, vectorised."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    sc = np.asarray(scores, np.float64).ravel()
    q = np.asarray(corners, np.float64).reshape(-1, 2)
    qs = np.asarray(corner_scores, np.float64).ravel()
    if not len(pts):
        return pts.copy(), sc.astype(np.float32)
    if not len(q):
        return pts.copy(), (sc * p.unsupported_factor).astype(np.float32)
    axis = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    radius = p.radius_strides * stride
    d0 = np.linalg.norm(q[None] - pts[:, None], axis=2)  # (M, N)
    n_pairs = int((d0.min(axis=1) <= radius).sum())
    bias = corner_bias(pts, q, axis, radius) if p.bias_correction and n_pairs >= p.min_pairs_for_bias else 0.0
    qc = q - bias * axis
    diff = qc[None] - pts[:, None]  # (M, N, 2)
    d = np.linalg.norm(diff, axis=2)
    w = np.where(d <= radius, qs[None] * np.exp(-0.5 * (d / p.sigma_corner) ** 2), 0.0)  # (M, N)
    wsum = w.sum(axis=1)
    supported = wsum > 0
    n_eff = np.where(supported, wsum ** 2 / np.maximum((w ** 2).sum(axis=1), 1e-12), 0.0)  # Kish
    mean_off = np.einsum("mn,mnk->mk", w, diff) / np.maximum(wsum, 1e-12)[:, None]
    var_tip = (p.sigma_tip / np.clip(sc, 1e-3, None)) ** 2
    var_q = np.where(supported, p.sigma_corner ** 2 / np.maximum(n_eff, 1e-12), np.inf)
    gain = var_tip / (var_tip + var_q)  # 0 without support
    out = pts + gain[:, None] * mean_off
    out_scores = np.where(supported, sc, sc * p.unsupported_factor)
    return out, out_scores.astype(np.float32)
