"""The one heatmap codec: crop affine, crop sampling and normalisation, heatmap targets,
peak decoding.  Training (``export``) and the daemon both import it, so that they share one
coordinate convention; nothing else rescales coordinates.

Conventions:
    Image and crop points are ``(N, 2) float (x, y)``, pixel centres at integer coordinates.
    A crop is the canonical view of part of a frame: tips point to ``+x`` and layers are
    stacked along ``y``.  ``A`` is the ``(2, 3)`` image -> crop affine
    ``crop = scale * R(angle)^T (p - centre) + c0`` with ``c0`` the crop's centre pixel and
    ``angle_deg`` the canonical -> image rotation (as in ``RoiResult.angle_deg``).
    Heatmap pixel ``(j, i)`` sits on crop pixel ``(stride * j, stride * i)``: the grid of a
    stack of stride-2 convolutions with padding 1.
    Heatmaps are ``(K, Hh, Wh)`` (one channel per class), batches ``(B, K, Hh, Wh)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

CLASSES = ("anode", "cathode")
#: largest crop ``(w, h)`` fitted to an ROI by default (along, across the layers)
MAX_CROP = (512, 1024)


def _rot(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s], [s, c]])


def apply_affine(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """``(2, 3)`` affine applied to ``(N, 2)`` points -> ``(N, 2) float64``."""
    pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    return pts @ np.asarray(m)[:, :2].T + np.asarray(m)[:, 2]


def invert_affine(m: np.ndarray) -> np.ndarray:
    """Inverse of a ``(2, 3)`` affine."""
    a = np.linalg.inv(np.asarray(m, np.float64)[:, :2])
    return np.hstack([a, -a @ np.asarray(m, np.float64)[:, 2:3]])


def compose_affine(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """``outer o inner`` of two ``(2, 3)`` affines (``inner`` applied first)."""
    return np.hstack([outer[:, :2] @ inner[:, :2], outer[:, :2] @ inner[:, 2:3] + outer[:, 2:3]])


def normalise(crop: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.0)) -> np.ndarray:
    """Network input from a crop ``(h, w)`` (any dtype), or a batch ``(B, h, w)``: each crop
    mapped so that its ``percentiles`` go to 0 and 1 (gain, offset and bit depth drop out),
    clipped to ``[-0.25, 1.25]``.  Returns float32 of the same shape."""
    x = np.asarray(crop, np.float32)
    flat = x.reshape(-1, x.shape[-2] * x.shape[-1])
    sub = flat[:, ::3]
    lo, hi = np.percentile(sub, percentiles, axis=1)
    span = np.maximum(hi - lo, 1e-3 * np.maximum(np.abs(hi), 1.0))
    out = (flat - lo[:, None]) / span[:, None]
    return np.clip(out, -0.25, 1.25).reshape(x.shape).astype(np.float32)


def keep_strongest(close: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """``(N,) bool`` keep mask: item i stays unless an item j it is ``close (N, N) bool`` to
    ranks higher (``rank (N,)``; ties: the earlier wins).  One pairwise pass, no greedy loop."""
    idx = np.arange(len(rank))
    higher = (rank[None, :] > rank[:, None]) | ((rank[None, :] == rank[:, None]) & (idx[None, :] < idx[:, None]))
    return ~(close & higher).any(axis=1)


def _nms(pts: np.ndarray, scores: np.ndarray, min_distance: float) -> np.ndarray:
    """``(N,) bool`` keep mask: a point ``(N, 2)`` stays unless a stronger one (ties: the
    earlier) lies closer than ``min_distance``."""
    d2 = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)
    return keep_strongest(d2 < min_distance * min_distance, scores)


@dataclass(frozen=True)
class HeatmapCodec:
    """Encode/decode between tip points and heatmaps of one crop geometry.

    ``input_size`` is the crop ``(w, h)``; heatmaps are ``(K, h // stride, w // stride)``;
    ``sigma`` is the target Gaussian's standard deviation in heatmap pixels.
    """

    input_size: tuple[int, int] = (256, 256)
    stride: int = 2
    sigma: float = 1.0
    classes: tuple[str, ...] = CLASSES

    def __post_init__(self):
        w, h = self.input_size
        if w % self.stride or h % self.stride:
            raise ValueError(f"input_size {self.input_size} must be a multiple of stride {self.stride}")
        if self.sigma <= 0:
            raise ValueError("sigma must be > 0")

    @property
    def heatmap_size(self) -> tuple[int, int]:
        """``(w, h)`` of one heatmap."""
        return self.input_size[0] // self.stride, self.input_size[1] // self.stride

    # ------------------------------------------------------------------ crop affine
    def crop_affine(self, centre, angle_deg: float, scale: float = 1.0,
                    size: tuple[int, int] | None = None) -> np.ndarray:
        """``(2, 3)`` image -> crop affine: ``centre (2,)`` (image x, y) lands on the centre
        of a crop of ``size (w, h)`` (default ``input_size``), the canonical axis at
        ``angle_deg`` in the image becomes ``+x``."""
        w, h = size or self.input_size
        lin = scale * _rot(angle_deg).T
        c0 = np.array([(w - 1) / 2, (h - 1) / 2])
        return np.hstack([lin, (c0 - lin @ np.asarray(centre, np.float64))[:, None]])

    def warp(self, img: np.ndarray, A: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        """Sample the crop ``(h, w)`` of ``size (w, h)`` (default ``input_size``; dtype of
        ``img``) of ``img`` ``(H, W)`` through ``A`` (bilinear, edges replicated)."""
        return cv2.warpAffine(img, np.asarray(A, np.float64), tuple(size or self.input_size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE)

    @staticmethod
    def to_image(pts: np.ndarray, A: np.ndarray) -> np.ndarray:
        """Crop points ``(N, 2)`` -> image points ``(N, 2)`` through the inverse of ``A``."""
        return apply_affine(invert_affine(A), pts)

    @staticmethod
    def to_crop(pts: np.ndarray, A: np.ndarray) -> np.ndarray:
        """Image points ``(N, 2)`` -> crop points ``(N, 2)``."""
        return apply_affine(A, pts)

    # ------------------------------------------------------------------ tiling
    def plan_tiles(self, centre, angle_deg: float, size: tuple[float, float], overlap: float = 48.0,
                   scale: float = 1.0, max_size: tuple[int, int] | None = None, context: float = 0.0,
                   multiple: int = 16) -> "Tiles":
        """Crops that cover an oriented ROI (``centre (2,)``, ``size (w, h)`` along/across the
        layers, ``angle_deg`` canonical -> image) at ``scale``, overlapping by ``overlap``
        image px.  Each tile *owns* the part of the ROI nearer its centre than any other
        tile's (per axis), so a tip seen by two tiles is reported once, by the tile where it
        is furthest from the crop edge (>= overlap / 2).

        Crop size: ``input_size`` when ``max_size`` is None (fixed tiles).  With ``max_size
        (w, h)`` (a model that takes any input size) the crops are fitted to the ROI: per
        axis, the ROI plus ``context`` image px on each side is covered by as few crops as fit in
        ``max_size``, each the same length, rounded up to ``multiple`` px (the network's
        size granularity).  A typical ROI is then one crop with no pixel run twice, where
        fixed 256 px tiles run about 1.8x the ROI's area."""
        if max_size is None:
            crop = tuple(int(v) for v in self.input_size)
            extent = (float(size[0]), float(size[1]))
        else:  # extent in image px; the crop's length in crop px
            extent = (float(size[0]) + 2 * context, float(size[1]) + 2 * context)
            crop = tuple(_fit_axis(extent[i] * scale, int(max_size[i]), overlap * scale, multiple) for i in range(2))
        tw, th = (crop[0] / scale, crop[1] / scale)
        cu, bu = _tile_axis(extent[0], tw, overlap)
        cv, bv = _tile_axis(extent[1], th, overlap)
        R = _rot(angle_deg)
        uu, vv = np.meshgrid(cu, cv, indexing="xy")  # (nv, nu)
        local = np.stack([uu.ravel(), vv.ravel()], 1)  # (T, 2) in the ROI frame
        centres = local @ R.T + np.asarray(centre, np.float64)
        A = np.stack([self.crop_affine(c, angle_deg, scale, crop) for c in centres])
        iu, iv = np.meshgrid(np.arange(len(cu)), np.arange(len(cv)), indexing="xy")
        owned = np.stack([bu[iu.ravel()], bu[iu.ravel() + 1], bv[iv.ravel()], bv[iv.ravel() + 1]], 1)
        return Tiles(A, owned, np.asarray(centre, np.float64), float(angle_deg), (float(size[0]), float(size[1])),
                     crop)

    def merge_tiles(self, decoded: list[list[tuple[np.ndarray, np.ndarray]]], tiles: "Tiles",
                    tolerance: float = 4.0, image_size: tuple[int, int] | None = None,
                    slack: float = 8.0, same_tip: float = 8.0) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per class ``(points (N, 2) image x, y, scores (N,))`` from each tile's decoded
        crop points (``decoded[t][k]``), mapped back to the image.

        A tile's point is a candidate where that tile owns it, widened by ``slack`` px (two
        tiles decode a tip on their ownership boundary a fraction of a pixel apart, and each
        may put it on the other's side), inside the ROI (``tolerance`` px beyond its edge
        allowed) and, given the frame's ``image_size (w, h)``, inside the frame (a crop
        reaching past the frame's edge sees replicated border pixels there, never a tip).
        Candidates of one class closer than ``same_tip`` px (half the smallest same-class
        spacing) are one tip: the one furthest from its crop's edge is kept."""
        out = []
        R = _rot(tiles.angle_deg)
        w, h = tiles.size
        size = np.asarray(tiles.crop_size, np.float64)
        for k in range(len(self.classes)):
            pts, scs, margin = [np.zeros((0, 2))], [np.zeros(0, np.float32)], [np.zeros(0)]
            for t, dec in enumerate(decoded):
                crop_pts = np.asarray(dec[k][0], np.float64).reshape(-1, 2)
                p_img = self.to_image(crop_pts, tiles.affines[t])
                q = (p_img - tiles.centre) @ R
                o = tiles.owned[t]
                keep = ((q[:, 0] >= o[0] - slack) & (q[:, 0] < o[1] + slack)
                        & (q[:, 1] >= o[2] - slack) & (q[:, 1] < o[3] + slack))
                keep &= (np.abs(q[:, 0]) <= w / 2 + tolerance) & (np.abs(q[:, 1]) <= h / 2 + tolerance)
                if image_size is not None:
                    keep &= np.all((p_img >= -0.5) & (p_img <= np.asarray(image_size) - 0.5), axis=1)
                pts.append(p_img[keep])
                scs.append(np.asarray(dec[k][1], np.float32)[keep])
                margin.append(np.minimum(crop_pts[keep] + 0.5, size - 0.5 - crop_pts[keep]).min(axis=1))
            p, sc, m = np.concatenate(pts), np.concatenate(scs), np.concatenate(margin)
            if len(p) > 1:
                d = np.linalg.norm(p[:, None, :] - p[None, :, :], axis=2)
                # j beats i: nearer than same_tip and further from its crop edge (ties: first)
                keep = keep_strongest(d < same_tip, m)
                p, sc = p[keep], sc[keep]
            out.append((p, sc))
        return out

    # ------------------------------------------------------------------ targets
    def encode(self, points: list[np.ndarray] | tuple[np.ndarray, ...]) -> np.ndarray:
        """Targets ``(K, Hh, Wh) float32`` from one ``(N_k, 2)`` array of crop points per
        class: the maximum over the points of unit-peak Gaussians of ``sigma``."""
        wh, hh = self.heatmap_size
        out = np.zeros((len(self.classes), hh, wh), np.float32)
        if len(points) != len(self.classes):
            raise ValueError(f"need {len(self.classes)} point arrays, got {len(points)}")
        jx = np.arange(wh, dtype=np.float32)
        iy = np.arange(hh, dtype=np.float32)
        k = -0.5 / (self.sigma * self.sigma)
        for c, pts in enumerate(points):
            p = np.asarray(pts, np.float32).reshape(-1, 2) / self.stride
            far = 4 * self.sigma
            p = p[(p[:, 0] > -far) & (p[:, 0] < wh - 1 + far) & (p[:, 1] > -far) & (p[:, 1] < hh - 1 + far)]
            if len(p) == 0:
                continue
            gx = np.exp(k * np.square(jx[None, :] - p[:, :1]))  # (N, Wh)
            gy = np.exp(k * np.square(iy[None, :] - p[:, 1:]))  # (N, Hh)
            out[c] = np.einsum("ni,nj->nij", gy, gx).max(axis=0)
        return out

    # ------------------------------------------------------------------ decoding
    def decode(self, heatmaps: np.ndarray, threshold: float = 0.3, border: int = 0, min_distance: float = 0.0):
        """Peaks of ``heatmaps`` ``(K, Hh, Wh)`` -> per class ``(points (N, 2) crop x, y,
        scores (N,))``, refined to sub-pixel precision.

        Peaks: local maxima of a 3x3 neighbourhood above ``threshold``, ``border`` heatmap
        pixels at the edges ignored.  NMS: with ``min_distance`` (crop px) a peak is dropped
        when a stronger one lies closer than that, measured between the sub-pixel positions
        (a disc on the heatmap grid would also drop a tip whose neighbour is a grid distance
        of ``min_distance`` but more than that in fact away), so of two same-class peaks
        closer than that only the stronger stays (tips of one class are two layer pitches,
        >= 16 px, apart; a split tip's short prong is closer to its tip than that).
        Sub-pixel: one Newton step on the log of the heatmap
        smoothed by a Gaussian of ``sigma`` (DARK, Zhang et al. 2020): a Gaussian peak is a
        quadratic in log space, so the step is exact for an ideal target.  Scores are the
        raw peak values.
        """
        hm = np.asarray(heatmaps, np.float32)
        return [self._decode_one(hm[c], threshold, border, min_distance) for c in range(hm.shape[0])]

    def _decode_one(self, h: np.ndarray, threshold: float, border: int, min_distance: float = 0.0):
        # A peak is >= its 4 later neighbours (raster order) and > its 4 earlier ones, so a
        # plateau of equal maxima gives exactly one peak (its first pixel).  Only pixels
        # above the threshold (a few hundred of ~35 k) are compared with their neighbours.
        above = h > threshold
        if border > 0:
            above[:border], above[-border:], above[:, :border], above[:, -border:] = False, False, False, False
        iy, jx = np.nonzero(above)
        if len(iy) == 0:
            return np.zeros((0, 2), np.float64), np.zeros(0, np.float32)
        p = cv2.copyMakeBorder(h, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=-np.inf)
        y, x = iy + 1, jx + 1
        c = p[y, x]
        later = np.maximum.reduce([p[y, x + 1], p[y + 1, x - 1], p[y + 1, x], p[y + 1, x + 1]])
        earlier = np.maximum.reduce([p[y, x - 1], p[y - 1, x - 1], p[y - 1, x], p[y - 1, x + 1]])
        peak = (c >= later) & (c > earlier)
        iy, jx = iy[peak], jx[peak]
        if len(iy) == 0:
            return np.zeros((0, 2), np.float64), np.zeros(0, np.float32)
        offsets = self._dark_offsets(h, iy, jx)
        pts = (np.stack([jx, iy], axis=1).astype(np.float64) + offsets) * self.stride
        scores = h[iy, jx].astype(np.float32)
        if min_distance > 0 and len(pts) > 1:
            keep = _nms(pts, scores, min_distance)
            pts, scores = pts[keep], scores[keep]
        return pts, scores

    def _dark_offsets(self, h: np.ndarray, iy: np.ndarray, jx: np.ndarray) -> np.ndarray:
        """``(N, 2)`` sub-pixel offsets (x, y) in heatmap pixels at integer maxima."""
        k = int(2 * math.ceil(2 * self.sigma) + 1)
        sm = cv2.copyMakeBorder(cv2.GaussianBlur(h, (k, k), self.sigma), 1, 1, 1, 1, cv2.BORDER_REPLICATE)
        y, x = iy + 1, jx + 1
        # the log of the smoothed map at each peak's 3x3 neighbourhood: (N, 3, 3)
        lg = np.log(np.maximum(sm[y[:, None, None] + np.arange(-1, 2)[None, :, None],
                                  x[:, None, None] + np.arange(-1, 2)[None, None, :]], 1e-10))
        c = lg[:, 1, 1]
        dx = 0.5 * (lg[:, 1, 2] - lg[:, 1, 0])
        dy = 0.5 * (lg[:, 2, 1] - lg[:, 0, 1])
        dxx = lg[:, 1, 2] - 2 * c + lg[:, 1, 0]
        dyy = lg[:, 2, 1] - 2 * c + lg[:, 0, 1]
        dxy = 0.25 * (lg[:, 2, 2] - lg[:, 2, 0] - lg[:, 0, 2] + lg[:, 0, 0])
        det = dxx * dyy - dxy * dxy
        ok = (det > 1e-12) & (dxx < 0)
        safe = np.where(ok, det, 1.0)
        ox = np.where(ok, -(dyy * dx - dxy * dy) / safe, 0.0)
        oy = np.where(ok, -(dxx * dy - dxy * dx) / safe, 0.0)
        return np.clip(np.stack([ox, oy], axis=1), -1.0, 1.0)


@dataclass(frozen=True)
class Tiles:
    """The crops covering one ROI: ``affines (T, 2, 3)`` image -> crop, ``owned (T, 4)``
    ``(u0, u1, v0, v1)`` in the ROI frame (origin at ``centre``, ``+u`` along the tips),
    the ROI's ``size (w, h)`` and every crop's ``crop_size (w, h)``."""

    affines: np.ndarray
    owned: np.ndarray
    centre: np.ndarray
    angle_deg: float
    size: tuple[float, float]
    crop_size: tuple[int, int] = (256, 256)

    def __len__(self) -> int:
        return len(self.affines)


def _fit_axis(length: float, max_tile: int, overlap: float, multiple: int) -> int:
    """Crop length (a multiple of ``multiple``, at most ``max_tile`` rounded down to one)
    for covering ``length`` px with as few equal crops overlapping by ``overlap`` as fit."""
    top = max(multiple, int(max_tile) // multiple * multiple)
    n = 1 if length <= top else int(math.ceil((length - overlap) / max(top - overlap, 1.0)))
    need = (length + (n - 1) * overlap) / n
    return int(min(top, max(multiple, math.ceil(need / multiple) * multiple)))


def _tile_axis(length: float, tile: float, overlap: float) -> tuple[np.ndarray, np.ndarray]:
    """Tile centres ``(n,)`` along one ROI axis of ``length`` (centred at 0) and the ``n + 1``
    ownership bounds (outermost infinite)."""
    if length <= tile:
        n = 1
    else:
        n = int(math.ceil((length - overlap) / max(tile - overlap, 1.0)))
    half = max(length - tile, 0.0) / 2
    c = np.linspace(-half, half, n) if n > 1 else np.zeros(1)
    b = np.concatenate([[-np.inf], 0.5 * (c[1:] + c[:-1]), [np.inf]])
    return c, b


__all__ = ["CLASSES", "MAX_CROP", "HeatmapCodec", "Tiles", "normalise", "keep_strongest", "apply_affine",
           "invert_affine", "compose_affine"]
