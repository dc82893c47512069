"""Overhang and count rules: measured geometry -> verdict with machine-readable reasons.

Note:
    C: number of cathodes.  Overhangs are ``(C, 2) float64`` in micrometres: for each
    cathode, ``[left, right]`` = against its neighbour with the lower / higher stacking
    index; NaN where that neighbour is not an anode (a missing layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OK, NG = "OK", "NG"


@dataclass(frozen=True)
class OverhangLimits:
    """Accepted overhang range in micrometres (inclusive) and, optionally, the expected
    total layer count (anodes + cathodes)."""

    min_um: float
    max_um: float
    expected_layers: int | None = None

    def __post_init__(self) -> None:
        if not self.min_um < self.max_um:
            raise ValueError(f"overhang limits need min < max, got {self.min_um} >= {self.max_um}")


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
