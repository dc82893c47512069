"""``polecheck bench``: speed of the project's stages, measured in one run on this machine.

Each stage benchmark returns a dict of figures; the CLI prints them as a markdown table
and can write JSON.  Ratios between variants are measured in the same run (machines are
noisy; compare ratios, not absolute times across runs).
"""

from __future__ import annotations

import os
import platform
import time
from typing import Callable

import numpy as np

STAGES: dict[str, Callable[..., dict]] = {}


def stage(name: str):
    def deco(fn):
        STAGES[name] = fn
        return fn
    return deco


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, Python {platform.python_version()}, numpy {np.__version__}"


def timings(fn: Callable[[int], object], n: int, warmup: int = 1) -> np.ndarray:
    """Seconds per call of ``fn(i)`` for ``i`` in ``range(n)``, after ``warmup`` calls."""
    for i in range(warmup):
        fn(i)
    out = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out[i] = time.perf_counter() - t
    return out


def summary(t: np.ndarray) -> dict:
    return {"n": int(len(t)), "median_ms": round(float(np.median(t)) * 1e3, 3),
            "p99_ms": round(float(np.percentile(t, 99)) * 1e3, 3), "mean_ms": round(float(t.mean()) * 1e3, 3)}


@stage("phantom")
def bench_phantom(n: int = 20, size: tuple[int, int] = (1024, 1024), bits: int = 16, **_) -> dict:
    """Phantom rendering, one core, per preset."""
    import cv2

    from .phantom import make_phantom

    cv2.setNumThreads(1)
    out = {}
    for preset in ("normal", "hard", "defects"):
        t = timings(lambda i: make_phantom(np.random.SeedSequence([4242, i]), preset, size, bits), n)
        s = summary(t)
        s["images_per_s"] = round(1.0 / float(np.median(t)), 2)
        out[preset] = s
    return {"size": list(size), "bits": bits, "threads": 1, "presets": out}


def to_markdown(name: str, res: dict) -> str:
    lines = [f"### {name}", "", f"machine: {machine()}", ""]
    rows = res.get("presets") or res.get("rows") or {}
    if rows:
        keys = list(next(iter(rows.values())).keys())
        lines += ["| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for k, v in rows.items():
            lines.append(f"| {k} | " + " | ".join(str(v[c]) for c in keys) + " |")
    rest = {k: v for k, v in res.items() if k not in ("presets", "rows")}
    if rest:
        lines += ["", "settings: " + ", ".join(f"{k}={v}" for k, v in rest.items())]
    return "\n".join(lines) + "\n"


@stage("roi")
def bench_roi(n: int = 20, size: tuple[int, int] = (1024, 1024), bits: int = 16, repeat: int = 5, **_) -> dict:
    """Stage 1 on distinct pre-rendered frames (cycled, so each call reads a new frame),
    one core; the full-resolution detection (no coarse scale) is the reference."""
    import cv2

    from .phantom import make_phantom
    from .roi import RoiParams, detect_roi, ofast_orientation, ofast_orientation_serial, to_8bit

    cv2.setNumThreads(1)
    frames = [make_phantom(np.random.SeedSequence([31337, i]), "normal", size, bits).image for i in range(n)]
    p = RoiParams()
    order = [i % n for i in range(n * repeat)]
    coarse = timings(lambda k: detect_roi(frames[order[k]], p), len(order), warmup=2)
    full = timings(lambda k: detect_roi(frames[order[k]], p, full_resolution=True), n, warmup=1)
    res = detect_roi(frames[0], p)
    x0, y0, x1, y1 = res.box
    crop = to_8bit(frames[0][y0:y1, x0:x1], *res.window)
    pts = res.corners - np.array([x0, y0], np.float32)
    vec = timings(lambda k: ofast_orientation(crop, pts, 7), 50)
    ser = timings(lambda k: ofast_orientation_serial(crop, pts, 7), 5)
    rows = {
        "roi_corners (coarse + full-res Q)": summary(coarse),
        "reference: full-resolution detection": summary(full),
    }
    return {"rows": rows, "size": list(size), "bits": bits, "threads": 1, "N": p.n_corners,
            "full_over_coarse": round(float(np.median(full) / np.median(coarse)), 2),
            "orientation_serial_over_vectorised": round(float(np.median(ser) / np.median(vec)), 1),
            "corners_in_Q": int(len(res.corners))}


@stage("model")
def bench_model(n: int = 20, size: tuple[int, int] = (1024, 1024), bits: int = 16, threads: int = 2,
                model_path: str | None = None, **_) -> dict:
    """Stage 2: the shipped ONNX model under ONNX Runtime on CPU with ``threads`` intra-op
    threads, per crop, at batch 1 and batch 8, on real phantom tiles; and the whole
    ``detect_tips`` (tiling, sampling, normalisation, inference, decoding) per frame."""
    import cv2

    from .config import load_config
    from .keypoints import crops_for_roi, detect_tips
    from .model import KeypointModel
    from .phantom import make_phantom
    from .roi import detect_roi

    cv2.setNumThreads(1)
    cfg = load_config(None).model
    path = model_path or str(cfg.resolved_path())
    m = KeypointModel(path, None if model_path else cfg.sha256, providers=("CPUExecutionProvider",),
                      threads=threads)
    frames = [make_phantom(np.random.SeedSequence([27182, i]), "normal", size, bits).image for i in range(n)]
    rois = [detect_roi(f) for f in frames]
    pairs = [(f, r) for f, r in zip(frames, rois) if r.ok]
    crops = [crops_for_roi(f, r, m.codec) for f, r in pairs]  # (tiles, x) per frame
    xs = np.concatenate([x for _, x in crops])
    reps = max(1, 192 // len(xs))
    xs = np.concatenate([xs] * reps) if reps > 1 else xs
    b1 = timings(lambda k: m(xs[k % len(xs)][None]), min(len(xs), 64), warmup=3)
    nb = max(1, min(len(xs) // 8, 24))
    b8 = timings(lambda k: m(xs[8 * k:8 * k + 8]), nb, warmup=1) / 8
    per_frame = timings(lambda k: detect_tips(*pairs[k % len(pairs)], m, cfg.threshold, cfg.tile_overlap_px,
                                              cfg.max_batch, cfg.min_distance_px, cfg.low_threshold),
                        len(pairs), warmup=1)
    tiles = [len(t) for t, _ in crops]
    w, h = m.codec.input_size
    return {"rows": {"per crop, batch 1": summary(b1), "per crop, batch 8": summary(b8),
                     "per frame, detect_tips": summary(per_frame)},
            "crop": f"{w}x{h}", "threads": threads, "provider": m.provider, "tiles_per_frame": round(float(np.mean(tiles)), 2),
            "model_sha256": m.sha256[:12], "size": list(size), "bits": bits}
