"""One frame through the judging stages, the code path the daemon and ``polecheck eval``
share: ``roi_corners -> keypoint_model -> refine -> verdict_rules`` (the names are the
metric ``stage`` labels).

``judge_frame`` runs them in a row and times each; ``refine_and_judge`` is the part after
the model, so that an evaluation can score several fusion settings or corner counts N on
one model run.

Note:
    Points are image ``(x, y)`` ``(N, 2)``; stage times are seconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from .fusion import FusionParams, fuse
from .keypoints import CropPlan, Tips, detect_tips, same_layer_keep
from .roi import RoiParams, RoiResult, corner_set, detect_roi
from .rules import CornerVerdict, OverhangLimits, judge_corner

STAGES = ("roi_corners", "keypoint_model", "refine", "verdict_rules")


@dataclass(frozen=True)
class JudgeSettings:
    """What the stages need besides the model: stage-1 parameters, the decoder's settings
    (``model`` config section), the fusion (None: off, the default) and the recipe's limits."""

    roi: RoiParams = RoiParams()
    threshold: float = 0.6
    low_threshold: float = 0.3
    crops: CropPlan = CropPlan()
    min_distance: float = 12.0
    max_batch: int = 8
    fusion: FusionParams | None = None
    one_tip_per_layer: bool = True
    limits: OverhangLimits = OverhangLimits(750.0, 2250.0)

    @classmethod
    def from_config(cls, cfg) -> "JudgeSettings":
        """From a ``daemon.config.Config``."""
        m, r = cfg.model, cfg.recipe
        return cls(roi=cfg.roi.params(), threshold=m.threshold, low_threshold=m.low_threshold,
                   crops=CropPlan.from_config(m), min_distance=m.min_distance_px, max_batch=m.max_batch,
                   fusion=cfg.fusion.params(),
                   limits=OverhangLimits(r.overhang_min_um, r.overhang_max_um, r.expected_layers, r.min_confidence,
                                          r.max_layer_gap))


@dataclass
class FrameResult:
    """A frame's verdict and what led to it: the ROI, the model's tips, the refined tips
    ``anodes (Na, 2)`` / ``cathodes (Nc, 2)`` with scores, and the stage times."""

    verdict: CornerVerdict
    roi: RoiResult
    tips: Tips | None = None
    anodes: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    anode_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    cathodes: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    cathode_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    times: dict = field(default_factory=dict)


def refine_and_judge(roi: RoiResult, tips: Tips | None, pixel_pitch_um: float, s: JudgeSettings,
                     stride: float, times: dict | None = None) -> FrameResult:
    """Stages ``refine`` and ``verdict_rules`` on a frame's ROI (with its corner set Q) and
    model tips (None when there is no ROI)."""
    times = dict(times or {})
    if not roi.ok or tips is None:
        t = time.perf_counter()
        v = judge_corner(roi, np.zeros((0, 2)), [], np.zeros((0, 2)), [], pixel_pitch_um, s.limits)
        times["verdict_rules"] = time.perf_counter() - t
        return FrameResult(v, roi, tips, times=times)
    t = time.perf_counter()
    a, sa, c, sc = tips.anodes, tips.anode_scores, tips.cathodes, tips.cathode_scores
    if s.one_tip_per_layer and len(a) + len(c) > 2:
        va, vc = roi.to_canonical(a)[:, 1], roi.to_canonical(c)[:, 1]
        v_all = np.r_[va, vc]
        ka, kc = same_layer_keep(va, sa, v_all), same_layer_keep(vc, sc, v_all)
        a, sa, c, sc = a[ka], sa[ka], c[kc], sc[kc]
    if s.fusion is not None:
        th = math.radians(roi.angle_deg)
        axis = np.array([math.cos(th), math.sin(th)])
        a, sa = fuse(a, sa, roi.corners, roi.corner_scores, axis, stride, s.fusion)
        c, sc = fuse(c, sc, roi.corners, roi.corner_scores, axis, stride, s.fusion)
    times["refine"] = time.perf_counter() - t
    t = time.perf_counter()
    v = judge_corner(roi, a, sa, c, sc, pixel_pitch_um, s.limits)
    times["verdict_rules"] = time.perf_counter() - t
    return FrameResult(v, roi, tips, a, sa, c, sc, times)


def judge_frame(img: np.ndarray, pixel_pitch_um: float, model, s: JudgeSettings) -> FrameResult:
    """All four stages on one frame ``(H, W)`` uint8/uint16 with ``model`` (a
    ``KeypointModel``).  A frame without an ROI is NG ``roi_not_found``."""
    times = {}
    t = time.perf_counter()
    roi = detect_roi(img, s.roi)
    times["roi_corners"] = time.perf_counter() - t
    tips = None
    if roi.ok:
        t = time.perf_counter()
        tips = detect_tips(img, roi, model, s.threshold, s.crops, s.max_batch, s.min_distance, s.low_threshold)
        times["keypoint_model"] = time.perf_counter() - t
    return refine_and_judge(roi, tips, pixel_pitch_um, s, model.codec.stride, times)


def with_corners(roi: RoiResult, img: np.ndarray, p: RoiParams, n_corners: int) -> RoiResult:
    """``roi`` with its corner set Q recomputed for ``n_corners`` (the ROI is the same: N
    only changes the full-resolution corners), for the N ablation."""
    out = replace(roi, corners=np.zeros((0, 2), np.float32), corner_scores=np.zeros(0, np.float32),
                  corner_angles=np.zeros(0, np.float32))
    corner_set(img, out, replace(p, n_corners=n_corners))
    return out
