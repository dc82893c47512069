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
        fn(n + i)  # indices past the timed ones
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
