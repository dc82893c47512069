"""Accuracy evaluations on fresh phantoms (docs/accuracy.md).

``roi_accuracy``: stage 1 against the phantom's ground truth: every tip inside the ROI
with ``margin`` px to spare, the tip direction, and how tight the ROI is (its area over
the area of the tips' axis-aligned bounding box).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

#: seed roots of the evaluation sets; no other code uses these.  Roots whose failures were
#: looked at while developing are retired: 7_000_00x, 7_100_00x (see docs/accuracy.md).
EVAL_SEEDS = {"normal": 7_200_001, "hard": 7_200_002, "defects": 7_200_003}


def _roi_one(args: tuple) -> dict:
    import cv2

    from .phantom import make_phantom
    from .roi import detect_roi

    cv2.setNumThreads(1)
    preset, i, size, bits, margin, root = args
    ph = make_phantom(np.random.SeedSequence([root, i]), preset, size, bits)
    t = time.perf_counter()
    r = detect_roi(ph.image)
    dt = time.perf_counter() - t
    tips = np.vstack([ph.labels["anode"], ph.labels["cathode"]])
    bb = np.ptp(tips, axis=0)
    out = {"i": i, "ok": r.ok, "reason": r.reason, "time_s": dt, "direction_ok": r.direction == ph.scene.orientation}
    if r.ok:
        out["contained"] = bool(r.contains(tips, margin).all())
        out["area_ratio"] = float(r.size[0] * r.size[1] / (bb[0] * bb[1]))
        out["n_q"] = int(len(r.corners))
    return out


def roi_accuracy(preset: str, n: int = 500, size=(1024, 1024), bits: int = 16, margin: float = 8.0,
                 jobs: int | None = None, progress=None, seed_root: int | None = None) -> dict:
    """Stage-1 accuracy on ``n`` fresh frames of ``preset`` (``seed_root`` overrides the
    evaluation set's, e.g. for a development set)."""
    root = EVAL_SEEDS[preset] if seed_root is None else int(seed_root)
    tasks = [(preset, i, tuple(size), bits, margin, root) for i in range(n)]
    jobs = jobs or os.cpu_count() or 1
    with ProcessPoolExecutor(jobs) as ex:
        rows = []
        for row in ex.map(_roi_one, tasks, chunksize=4):
            rows.append(row)
            if progress:
                progress(len(rows), n)
    ok = [r for r in rows if r["ok"]]
    ratios = np.array([r["area_ratio"] for r in ok]) if ok else np.zeros(1)
    t = np.array([r["time_s"] for r in rows])
    reasons: dict[str, int] = {}
    for r in rows:
        if not r["ok"]:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return {
        "preset": preset, "seed_root": root, "n": n, "size": list(size), "bits": bits, "margin_px": margin,
        "roi_found": len(ok) / n,
        "all_tips_contained": sum(r.get("contained", False) for r in rows) / n,
        "direction_correct": sum(r["direction_ok"] and r["ok"] for r in rows) / n,
        "area_ratio_median": float(np.median(ratios)), "area_ratio_p95": float(np.percentile(ratios, 95)),
        "area_ratio_max": float(ratios.max()), "area_ratio_le_3": float(np.mean(ratios <= 3.0)) * len(ok) / n,
        "q_size_median": float(np.median([r["n_q"] for r in ok])) if ok else 0.0,
        "failures": reasons,
        "failed_indices": [r["i"] for r in rows if not (r["ok"] and r.get("contained") and r["direction_ok"])],
        "time_ms_median": float(np.median(t) * 1e3), "time_ms_p99": float(np.percentile(t, 99) * 1e3),
    }
