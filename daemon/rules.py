"""Overhang and count rules (``verdict_rules``): measured tips -> verdict with
machine-readable reasons.

``stack_layers`` orders one corner's tips along the stacking axis in the ROI frame,
``overhangs_um`` pairs each cathode with its two stacking neighbours, ``judge_corner``
applies a recipe (counts, overhang limits, minimum tip confidence; no ROI is NG
``roi_not_found``), ``judge_cell`` aggregates a cell's corners.

Note:
    C: number of cathodes.  Overhangs are ``(C, 2) float64`` in micrometres: for each
    cathode, ``[left, right]`` = against its neighbour with the lower / higher stacking
    index; NaN where that neighbour is not an anode (a missing layer).  Layer indices in
    reasons count all tips (anodes and cathodes) in stacking order from 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

OK, NG = "OK", "NG"
ANODE, CATHODE = 0, 1


@dataclass(frozen=True)
class OverhangLimits:
    """Accepted overhang range in micrometres (inclusive), optionally the expected total
    layer count (anodes + cathodes), and the smallest accepted tip confidence."""

    min_um: float
    max_um: float
    expected_layers: int | None = None
    min_confidence: float = 0.0
    max_gap_pitch: float = 1.6  # a step between same-class tips wider than this x their median: layer_gap

    def __post_init__(self) -> None:
        if not self.min_um < self.max_um:
            raise ValueError(f"overhang limits need min < max, got {self.min_um} >= {self.max_um}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {self.min_confidence}")


SIDES = ("left", "right")


def overhang_reasons(overhang_um: np.ndarray, limits: OverhangLimits) -> list[dict]:
    """Reasons for every cathode side outside ``limits``, ordered by cathode then side.

    Args:
        overhang_um: ``(C, 2)`` float, NaN for a side without an anode neighbour.
    """
    ov = np.asarray(overhang_um, dtype=np.float64).reshape(-1, 2)
    low = ov < limits.min_um  # NaN compares False: missing sides are a count problem
    high = ov > limits.max_um
    out = []
    for mask, code, lim in ((low, "overhang_low", limits.min_um), (high, "overhang_high", limits.max_um)):
        ci, si = np.nonzero(mask)
        out += [
            {"code": code, "cathode": int(c), "side": SIDES[s], "value_um": round(float(ov[c, s]), 3),
             "limit_um": float(lim)}
            for c, s in zip(ci, si)
        ]
    out.sort(key=lambda r: (r["cathode"], r["side"]))
    return out


def count_reasons(n_anode: int, n_cathode: int, expected_layers: int | None = None) -> list[dict]:
    """``count_mismatch`` unless anodes = cathodes + 1 (and the total matches, when expected)."""
    bad = n_anode != n_cathode + 1 or (expected_layers is not None and n_anode + n_cathode != expected_layers)
    if not bad:
        return []
    return [{"code": "count_mismatch", "anodes": int(n_anode), "cathodes": int(n_cathode),
             "expected_layers": expected_layers}]


def judge_geometry(overhang_um: np.ndarray, n_anode: int, n_cathode: int,
                   limits: OverhangLimits) -> tuple[str, list[dict]]:
    """Verdict for one corner from its counts and overhangs: ``("OK"|"NG", reasons)``."""
    reasons = count_reasons(n_anode, n_cathode, limits.expected_layers) + overhang_reasons(overhang_um, limits)
    return (NG if reasons else OK), reasons


def overhangs_um(kind: np.ndarray, u: np.ndarray, pixel_pitch_um: float) -> np.ndarray:
    """``(C, 2)`` overhang of each cathode against its lower/higher stacking neighbour:
    ``(u_anode - u_cathode) * pixel_pitch_um``, NaN where that neighbour is missing or not
    an anode.  ``kind (L,)`` ANODE/CATHODE and ``u (L,)`` (along the layers, tips to +u)
    in stacking order."""
    kind = np.asarray(kind)
    u = np.asarray(u, np.float64)
    cath = np.flatnonzero(kind == CATHODE)
    out = np.full((len(cath), 2), np.nan)
    for side, off in enumerate((-1, 1)):  # two sides, each vectorised over the cathodes
        nb = cath + off
        ok = (nb >= 0) & (nb < len(kind))
        ok[ok] &= kind[nb[ok]] == ANODE
        out[ok, side] = (u[nb[ok]] - u[cath[ok]]) * pixel_pitch_um
    return out


@dataclass
class Layers:
    """One corner's tips in stacking order: ``kind (L,)`` ANODE/CATHODE, ``uv (L, 2)`` in
    the ROI frame (u along the layers, tips to +u; v across), ``scores (L,)``, and
    ``source (L,)``: each tip's index in its class's input array."""

    kind: np.ndarray
    uv: np.ndarray
    scores: np.ndarray
    source: np.ndarray


def stack_layers(anodes: np.ndarray, anode_scores: np.ndarray, cathodes: np.ndarray,
                 cathode_scores: np.ndarray, to_canonical) -> Layers:
    """Sort a corner's tips along the stacking axis.  ``anodes (Na, 2)``, ``cathodes
    (Nc, 2)`` image ``(x, y)`` with scores ``(Na,)``, ``(Nc,)``; ``to_canonical`` maps
    image points ``(N, 2)`` to the ROI frame ``(N, 2) (u, v)`` (``RoiResult.to_canonical``)."""
    a = np.asarray(anodes, np.float64).reshape(-1, 2)
    c = np.asarray(cathodes, np.float64).reshape(-1, 2)
    uv = to_canonical(np.vstack([a, c])) if len(a) + len(c) else np.zeros((0, 2))
    kind = np.r_[np.full(len(a), ANODE), np.full(len(c), CATHODE)].astype(np.int8)
    scores = np.r_[np.asarray(anode_scores, np.float32).ravel(), np.asarray(cathode_scores, np.float32).ravel()]
    source = np.r_[np.arange(len(a)), np.arange(len(c))]
    order = np.argsort(uv[:, 1], kind="stable")
    return Layers(kind[order], uv[order], scores[order], source[order])


def gap_reasons(layers: "Layers", max_gap_pitch: float) -> list[dict]:
    """``layer_gap`` where neighbouring tips *of one class* along the stacking axis are
    more than ``max_gap_pitch`` times their median step apart: a layer of that class was
    not found there.  The counts cannot see an anode and a cathode missing together (a
    folded anode merging with its cathode hides both); this check can.  Per class,
    because an ROI angle off by a degree or two shifts all anode tips against all cathode
    tips along the stacking axis (they lie an overhang apart along the layers), while tips
    of one class stay evenly spaced."""
    out = []
    for kind, name in ((ANODE, "anode"), (CATHODE, "cathode")):
        idx = np.flatnonzero(layers.kind == kind)
        if len(idx) < 3:
            continue
        steps = np.diff(layers.uv[idx, 1])
        med = float(np.median(steps))
        if med <= 0:
            continue
        bad = np.flatnonzero(steps > max_gap_pitch * med)
        if len(bad):
            out.append({"code": "layer_gap", "kind": name, "after_layers": idx[bad].tolist(),
                        "gaps": [round(float(steps[i] / med), 2) for i in bad], "limit": float(max_gap_pitch)})
    return out


def confidence_reasons(layers: Layers, min_confidence: float) -> list[dict]:
    """``low_confidence`` for every tip scored below ``min_confidence`` (one reason, the
    offending layer indices and scores), or ``[]``."""
    bad = np.flatnonzero(layers.scores < min_confidence)
    if not len(bad):
        return []
    return [{"code": "low_confidence", "layers": bad.tolist(),
             "kinds": ["anode" if k == ANODE else "cathode" for k in layers.kind[bad]],
             "scores": [round(float(x), 3) for x in layers.scores[bad]], "limit": float(min_confidence)}]


@dataclass
class CornerVerdict:
    """A corner's verdict: ``"OK"|"NG"``, its reasons, and what was measured (``layers``
    and ``overhang_um (C, 2)``; empty when there was nothing to measure)."""

    verdict: str
    reasons: list[dict]
    layers: Layers | None = None
    overhang_um: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))

    def to_dict(self) -> dict:
        out: dict = {"verdict": self.verdict, "reasons": self.reasons}
        if self.layers is not None:
            out["n_anode"] = int((self.layers.kind == ANODE).sum())
            out["n_cathode"] = int((self.layers.kind == CATHODE).sum())
            out["overhang_um"] = [[None if not np.isfinite(x) else round(float(x), 3) for x in row]
                                  for row in self.overhang_um]
        return out


def judge_corner(roi, anodes: np.ndarray, anode_scores: np.ndarray, cathodes: np.ndarray,
                 cathode_scores: np.ndarray, pixel_pitch_um: float, limits: OverhangLimits) -> CornerVerdict:
    """The verdict of one corner image.  ``roi`` is its stage-1 ``RoiResult``: without an ROI
    the corner is NG ``roi_not_found`` (never judged on a guess).  Otherwise: counts,
    overhangs against ``limits``, gaps in the stack and the minimum tip confidence, all
    reasons together."""
    if not roi.ok:
        return CornerVerdict(NG, [{"code": "roi_not_found", "why": roi.reason, "detail": roi.detail}])
    layers = stack_layers(anodes, anode_scores, cathodes, cathode_scores, roi.to_canonical)
    ov = overhangs_um(layers.kind, layers.uv[:, 0], pixel_pitch_um)
    n_a, n_c = int((layers.kind == ANODE).sum()), int((layers.kind == CATHODE).sum())
    _, reasons = judge_geometry(ov, n_a, n_c, limits)
    reasons += gap_reasons(layers, limits.max_gap_pitch)
    reasons += confidence_reasons(layers, limits.min_confidence)
    return CornerVerdict(NG if reasons else OK, reasons, layers, ov)


def judge_cell(corners: dict[int, dict], n_corners: int = 4) -> dict:
    """A cell's verdict from its corners' verdict dicts (``CornerVerdict.to_dict``) keyed by
    corner index ``0..n_corners-1``: OK only when every corner arrived and is OK.  A missing
    corner is NG ``incomplete``; each NG corner's reasons come along with its index."""
    reasons: list[dict] = []
    missing = [k for k in range(n_corners) if k not in corners]
    if missing:
        reasons.append({"code": "incomplete", "missing_corners": missing})
    for k in sorted(corners):
        reasons += [{**r, "corner": int(k)} for r in corners[k].get("reasons", [])]
        if corners[k].get("verdict") != OK and not corners[k].get("reasons"):
            reasons.append({"code": "corner_ng", "corner": int(k)})  # NG without a reason: still NG
    return {"verdict": NG if reasons else OK, "reasons": reasons,
            "corners": {int(k): corners[k].get("verdict") for k in sorted(corners)}}
