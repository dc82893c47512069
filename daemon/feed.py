"""A synthetic scanner: publishes phantom cells (4 corners each) as protocol frames.

It pre-renders a pool of cells (in worker processes) and cycles it with fresh cell ids,
sequence numbers and timestamps, so that sending costs almost nothing and the feed can
outpace the daemon in benchmarks.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import zmq

from . import phantom
from .protocol import encode_frame, make_header, open_socket

log = logging.getLogger("polecheck.feed")


@dataclass
class PoolFrame:
    image: np.ndarray  # (H, W) uint8 | uint16
    corner: int
    pixel_pitch_um: float
    truth: dict


def _render_cell(args: tuple) -> list[PoolFrame]:
    seed, index, preset, size, bits = args
    cell = phantom.make_cell(np.random.SeedSequence([seed, index]), preset, tuple(size), bits)
    return [PoolFrame(p.image, c, p.labels["pixel_pitch_um"], p.labels) for c, p in enumerate(cell)]


def render_pool(n_cells: int, preset: str, size: tuple[int, int], bits: int, seed: int,
                jobs: int | None = None) -> list[list[PoolFrame]]:
    """``n_cells`` cells of 4 corners, deterministic from ``seed`` whatever ``jobs`` is."""
    jobs = max(1, min(jobs or os.cpu_count() or 1, n_cells))
    tasks = [(seed, i, preset, tuple(size), bits) for i in range(n_cells)]
    if jobs == 1:
        return [_render_cell(t) for t in tasks]
    with ProcessPoolExecutor(jobs) as ex:
        return list(ex.map(_render_cell, tasks))


class Feed:
    """Sends ``[topic, header, pixels]`` frames on a PUSH or PUB socket at ``rate_hz``
    (0 = unpaced), cell after cell, corners 0..3 in order."""

    def __init__(self, ctx: zmq.Context, endpoint: str, pool: list[list[PoolFrame]], *,
                 socket: str = "push", rate_hz: float = 20.0, scanner_id: str = "xray-sim-01",
                 hwm: int = 64, first_seq: int = 0):
        if not pool:
            raise ValueError("empty pool")
        kind = {"push": zmq.PUSH, "pub": zmq.PUB}[socket]
        self.sock = open_socket(ctx, kind, endpoint, hwm=hwm)
        self.pool, self.rate_hz, self.scanner_id = pool, rate_hz, scanner_id
        self.seq = first_seq
        self.sent = 0
        self._run_id = f"{os.getpid():x}{time.time_ns() & 0xFFFFFF:06x}"

    def close(self) -> None:
        self.sock.close(0)

    def send_cell(self, index: int, on_frame: Callable[[dict], None] | None = None) -> None:
        cell = self.pool[index % len(self.pool)]
        cell_id = f"{self.scanner_id}-{self._run_id}-{index:08d}"
        for f in cell:
            header = make_header(f.image, scanner_id=self.scanner_id, cell_id=cell_id, corner=f.corner,
                                 seq=self.seq, pixel_pitch_um=f.pixel_pitch_um, truth=f.truth)
            self.sock.send_multipart(encode_frame(header, f.image), copy=False)
            if on_frame:
                on_frame({"cell_id": cell_id, "corner": f.corner, "seq": self.seq,
                          "truth": f.truth.get("verdict")})
            self.seq += 1
            self.sent += 1
            self._pace()

    def _pace(self) -> None:
        if self.rate_hz <= 0:
            return
        if self.sent == 1:
            self._t0 = time.perf_counter()
        delay = self._t0 + self.sent / self.rate_hz - time.perf_counter()
        if delay > 0:
            time.sleep(delay)

    def run(self, n_frames: int | None = None, stop: threading.Event | None = None,
            on_frame: Callable[[dict], None] | None = None) -> int:
        """Send whole cells until ``n_frames`` (rounded up to whole cells) or ``stop``;
        ``on_frame`` gets each frame's ids and the phantom's true verdict."""
        index = 0
        while (n_frames is None or self.sent < n_frames) and not (stop and stop.is_set()):
            self.send_cell(index, on_frame)
            index += 1
        return self.sent
