"""Append-only verdict journal: one JSON object per line, written before the verdict is
published, so that a restart loses nothing the line was told.

Files are ``journal-<first unix ms>.jsonl`` in one folder, rotated at ``max_file_mb``;
the oldest beyond ``keep_files`` are deleted.  ``fsync``: ``always`` (after each record),
``interval`` (at most every ``fsync_interval_ms``, and at close) or ``never`` (the OS
decides).  A torn last line (power cut mid-write) is skipped on recovery.

``recover(folder)`` reads the journal back at start-up: the last ``seq`` per scanner (so
that frames lost while the daemon was down become ``missing_frame`` verdicts) and the
frame verdicts of cells that had no cell verdict yet (so that those cells still close).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("polecheck.journal")


class Journal:
    def __init__(self, folder: str | os.PathLike, fsync: str = "interval", fsync_interval_ms: float = 200.0,
                 max_file_mb: float = 256.0, keep_files: int = 32, on_fsync=None):
        if fsync not in ("always", "interval", "never"):
            raise ValueError(f"journal fsync must be always|interval|never, got {fsync!r}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fsync, self.interval = fsync, fsync_interval_ms / 1000.0
        self.max_bytes, self.keep = int(max_file_mb * 1024 * 1024), keep_files
        self.on_fsync = on_fsync
        self._f = None
        self._last_sync = time.monotonic()
        self._dirty = False
        self._open()

    def _open(self) -> None:
        path = self.folder / f"journal-{time.time_ns() // 1_000_000:015d}.jsonl"
        self._f = open(path, "ab", buffering=0)
        self.path = path
        self._size = path.stat().st_size
        files = sorted(self.folder.glob("journal-*.jsonl"))
        for old in files[: max(0, len(files) - self.keep)]:
            old.unlink(missing_ok=True)

    def append(self, record: dict) -> None:
        """Write one record (a line) and fsync per the policy."""
        self.append_line(json.dumps(record, separators=(",", ":"), allow_nan=False).encode())

    def append_line(self, payload: bytes) -> None:
        """Write one JSON object ``payload`` (no newline) as a line; fsync per the policy."""
        line = payload + b"\n"
        if self._size + len(line) > self.max_bytes and self._size > 0:
            self._sync()
            self._f.close()
            self._open()
        self._f.write(line)
        self._size += len(line)
        self._dirty = True
        if self.fsync == "always" or (self.fsync == "interval" and time.monotonic() - self._last_sync >= self.interval):
            self._sync()

    def tick(self) -> None:
        """Let an ``interval`` policy flush while no verdicts come."""
        if self.fsync == "interval" and self._dirty and time.monotonic() - self._last_sync >= self.interval:
            self._sync()

    def _sync(self) -> None:
        if not self._dirty or self.fsync == "never":
            return
        t = time.perf_counter()
        os.fsync(self._f.fileno())
        if self.on_fsync:
            self.on_fsync(time.perf_counter() - t)
        self._last_sync = time.monotonic()
        self._dirty = False

    def close(self) -> None:
        if self._f is not None:
            if self.fsync != "never":
                self._dirty = True
                self._sync()
            self._f.close()
            self._f = None


@dataclass
class Recovered:
    """What a restart needs from the journal: ``last_seq`` per scanner id, and the frame
    verdicts of cells without a cell verdict (``open_cells[cell_id] = [record, ...]``)."""

    last_seq: dict = field(default_factory=dict)
    open_cells: dict = field(default_factory=dict)
    records: int = 0
    torn: int = 0


def recover(folder: str | os.PathLike, max_files: int = 4) -> Recovered:
    """Read the newest ``max_files`` journal files in order (see the module docstring)."""
    out = Recovered()
    folder = Path(folder)
    if not folder.is_dir():
        return out
    closed: set[str] = set()
    for path in sorted(folder.glob("journal-*.jsonl"))[-max_files:]:
        with open(path, "rb") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    out.torn += 1
                    continue
                out.records += 1
                if rec.get("type") == "frame":
                    sid, seq = rec.get("scanner_id"), rec.get("seq")
                    if sid is not None and isinstance(seq, int):
                        out.last_seq[sid] = max(seq, out.last_seq.get(sid, -1))
                    cid = rec.get("cell_id")
                    if cid is not None and rec.get("corner") is not None and cid not in closed:
                        out.open_cells.setdefault(cid, []).append(rec)
                elif rec.get("type") == "cell":
                    closed.add(rec.get("cell_id"))
                    out.open_cells.pop(rec.get("cell_id"), None)
    if out.torn:
        log.warning("journal %s: skipped %d torn line(s)", folder, out.torn)
    return out
