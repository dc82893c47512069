"""NG archive: for every NG frame, the raw frame (lossless PNG, 8 or 16 bit as received),
an overlay PNG (ROI, tips, reasons) and the verdict JSON, within a disk budget.

Writing PNGs takes tens of ms, so a writer thread does it from a bounded queue; when the
queue is full the entry is skipped and counted (the verdict itself is never held up by the
archive).  Beyond ``budget_mb`` the oldest entries are deleted.  Entry names start with
the arrival time, so the oldest sort first, across restarts too.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from .roi import to_8bit

log = logging.getLogger("polecheck.archive")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def overlay(image: np.ndarray, verdict: dict, roi=None, anodes: np.ndarray | None = None,
            cathodes: np.ndarray | None = None) -> np.ndarray:
    """BGR uint8 picture of a judged frame ``image (H, W)``: the ROI polygon (yellow),
    anode tips ``(Na, 2)`` (red) and cathode tips ``(Nc, 2)`` (green), and the verdict
    with its reason codes."""
    if image.dtype == np.uint8:
        g = image
    else:
        lo, hi = np.percentile(image[::4, ::4], (0.5, 99.5))
        g = to_8bit(image, float(lo), float(max(hi, lo + 1)))
    out = cv2.cvtColor(np.ascontiguousarray(g), cv2.COLOR_GRAY2BGR)
    sh = 4
    if roi is not None and getattr(roi, "ok", False):
        poly = np.round(roi.polygon() * (1 << sh)).astype(np.int32)
        cv2.polylines(out, [poly], True, (0, 220, 255), 1, cv2.LINE_AA, shift=sh)
    for pts, colour in ((anodes, (40, 40, 255)), (cathodes, (40, 220, 40))):
        if pts is None:
            continue
        for x, y in np.round(np.asarray(pts, float).reshape(-1, 2) * (1 << sh)).astype(np.int64):
            cv2.circle(out, (int(x), int(y)), 3 << sh, colour, 1, cv2.LINE_AA, shift=sh)
    codes = ",".join(sorted({r.get("code", "?") for r in verdict.get("reasons", [])}))
    text = f"{verdict.get('verdict')} {verdict.get('cell_id', '')}/{verdict.get('corner', '')} {codes}"
    cv2.putText(out, text[:120], (10, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.8,
                (0, 0, 255) if verdict.get("verdict") != "OK" else (0, 200, 0), 2)
    return out


class Archive:
    """``submit(verdict, image, roi, anodes, cathodes)`` queues an NG frame; a thread writes it."""

    def __init__(self, folder: str | os.PathLike, budget_mb: float, queue_size: int = 16, metrics=None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.budget = int(budget_mb * 1024 * 1024)
        self.metrics = metrics
        self._q: queue.Queue = queue.Queue(queue_size)
        self._entries: list[tuple[str, int]] = []  # (stem, bytes), oldest first
        for f in sorted(self.folder.glob("*.json")):
            stem = f.name[:-5]
            self._entries.append((stem, sum(p.stat().st_size for p in self._files(stem) if p.is_file())))
        self.bytes = sum(b for _, b in self._entries)
        self.written = self.skipped = 0
        self._thread = threading.Thread(target=self._run, name="ng_archive", daemon=True)
        self._thread.start()

    def _files(self, stem: str) -> list[Path]:
        return [self.folder / f"{stem}{s}" for s in (".png", "_overlay.png", ".json")]

    def submit(self, verdict: dict, image: np.ndarray, roi=None, anodes=None, cathodes=None) -> bool:
        try:
            self._q.put_nowait((verdict, image, roi, anodes, cathodes))
            return True
        except queue.Full:
            self.skipped += 1
            if self.metrics:
                self.metrics.archive_skipped.inc()
            return False

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            try:
                self._write(*item)
            except Exception:  # a full disk must not stop the daemon: log and count
                log.exception("NG archive: write failed")
                self.skipped += 1
                if self.metrics:
                    self.metrics.archive_skipped.inc()

    def _write(self, verdict: dict, image: np.ndarray, roi, anodes, cathodes) -> None:
        ts = int(verdict.get("received_ns") or time.time_ns())
        stem = _SAFE.sub("_", f"{ts:020d}_{verdict.get('scanner_id', 'x')}_{verdict.get('seq', 'x')}_"
                              f"{verdict.get('cell_id', 'x')}_{verdict.get('corner', 'x')}")[:200]
        raw, ov, js = self._files(stem)
        if not cv2.imwrite(str(raw), np.ascontiguousarray(image)):
            raise OSError(f"could not write {raw}")
        cv2.imwrite(str(ov), overlay(image, verdict, roi, anodes, cathodes))
        js.write_text(json.dumps(verdict, separators=(",", ":")))
        size = sum(p.stat().st_size for p in (raw, ov, js))
        self._entries.append((stem, size))
        self.bytes += size
        self.written += 1
        while self.bytes > self.budget and len(self._entries) > 1:
            old, b = self._entries.pop(0)
            for p in self._files(old):
                p.unlink(missing_ok=True)
            self.bytes -= b
        if self.metrics:
            self.metrics.archived.inc()
            self.metrics.archive_bytes.set(self.bytes)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to ``timeout``), then stop the thread."""
        try:
            self._q.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
