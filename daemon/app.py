"""The daemon's composition root: one ``App`` runs

    frame_receiver -> roi_corners -> keypoint_model -> refine -> verdict_rules
                   -> cell_aggregator -> verdict_publisher

as threads connected by bounded queues (the names are the metric ``stage`` labels).

Every received frame leaves as exactly one frame verdict, published as JSON on a ZeroMQ
PUB socket after it is written to the journal:
- a frame that does not decode: NG ``bad_frame`` (with the protocol's error kind);
- a sequence gap: one NG ``missing_frame`` verdict per missing ``seq``;
- a frame that finds the first queue full for ``pipeline.admit_timeout_ms``, or is not
  through the model ``pipeline.deadline_ms`` after arrival: NG ``overload``;
- a frame still in flight when a drain runs out of time: NG ``shutdown``;
- otherwise the judging stages' verdict (``daemon.pipeline``: the code path ``polecheck
  eval`` scores).
Cells (``cell_id``, corners ``0..cells.corners-1``) get a cell verdict when their corners
are in, or NG ``incomplete`` after ``cells.timeout_ms``.

Threads, not processes, by default: OpenCV and ONNX Runtime release the GIL, frames stay
zero-copy views of the ZeroMQ buffers, and ``pipeline.executor: process`` (roi_corners in
worker processes) measured slower (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import zmq

from . import __version__
from .keypoints import crops_for_roi, run_model, tips_from_heatmaps
from .metrics import Metrics
from .model import KeypointModel
from .pipeline import FrameResult, JudgeSettings, refine_and_judge
from .protocol import FrameError, FrameLimits, decode_frame, open_socket
from .roi import detect_roi
from .rules import NG, OK, judge_cell
from .service import tune_malloc

log = logging.getLogger("polecheck.app")

#: stage names, in pipeline order; also the metric ``stage`` label values
STAGES = ("frame_receiver", "roi_corners", "keypoint_model", "refine", "verdict_rules", "cell_aggregator",
          "verdict_publisher")
QUEUES = ("roi_corners", "keypoint_model", "refine", "cell_aggregator", "verdict_publisher")
VERDICT_TOPIC = b"verdict"
#: decode errors raised after every header field was validated: their ids can be trusted
VALIDATED_HEADER_ERRORS = ("bad_dtype", "bad_shape", "frame_too_large", "size_mismatch")


@dataclass
class Job:
    """One frame on its way through the stages."""

    meta: dict  # scanner_id, cell_id, corner, seq, ts_ns, pixel_pitch_um, received_ns
    received: float  # time.monotonic() at arrival
    image: np.ndarray | None = None  # (H, W) uint8/uint16, a view of the ZeroMQ buffer
    frame: object = None  # the decoded Frame: keeps the receive buffers alive
    times: dict = field(default_factory=dict)  # stage -> seconds
    roi: object = None
    tiles: object = None
    crops: np.ndarray | None = None  # (T, 1, h, w) float32
    heatmaps: np.ndarray | None = None  # (T, K, h', w') float32
    result: FrameResult | None = None
    verdict: dict | None = None  # set once decided


def _roi_task(image: np.ndarray, roi_params, codec, plan):
    """roi_corners on one frame: the ROI with its corner set Q, then the model's crops.
    Module-level so that a process pool can run it."""
    t = time.perf_counter()
    roi = detect_roi(image, roi_params)
    t_roi = time.perf_counter() - t
    tiles = crops = None
    if roi.ok:
        tiles, crops = crops_for_roi(image, roi, codec, plan)
    return roi, tiles, crops, t_roi, time.perf_counter() - t - t_roi


def _init_roi_process(n: int, malloc_tuning: bool) -> None:
    """A roi_corners process's initializer: ``pipeline.opencv_threads`` (0 = OpenCV's
    default) and ``pipeline.malloc_tuning``."""
    if malloc_tuning:
        tune_malloc()
    if n:
        cv2.setNumThreads(n)


def _points(a: np.ndarray) -> list:
    return np.round(np.asarray(a, np.float64).reshape(-1, 2), 3).tolist()


def header_fields(hd) -> dict:
    """A decoded frame header's fields that its verdict message repeats (``FrameHeader``)."""
    return dict(scanner_id=hd.scanner_id, cell_id=hd.cell_id, corner=hd.corner, seq=hd.seq, ts_ns=hd.ts_ns,
                pixel_pitch_um=hd.pixel_pitch_um, shape=list(hd.shape), dtype=hd.dtype)


def frame_message(meta: dict, verdict: str, reasons: list[dict], extra: dict | None, recipe: str,
                  model_sha256: str) -> dict:
    """A frame verdict message (before its timings, ``timing_fields``): the header fields
    ``meta``, the verdict and reasons, ``extra`` (``judged_fields`` for a judged frame),
    the recipe and the model's hash."""
    return {"type": "frame", "schema": 1, **meta, "verdict": verdict, "reasons": reasons, **(extra or {}),
            "recipe": recipe, "model_sha256": model_sha256}


def timing_fields(latency_s: float, times: dict) -> dict:
    """A frame message's timings: receive-to-verdict ``latency_ms`` and per-stage ``times_ms``
    (``times``: stage -> seconds)."""
    return {"latency_ms": round(latency_s * 1000.0, 3), "times_ms": {k: round(x * 1000.0, 3) for k, x in times.items()}}


def judged_fields(res: FrameResult) -> dict:
    """What a judged frame's verdict message carries beyond its header fields, verdict and
    reasons: the verdict's figures (counts, overhangs), the refined points ``(N, 2)`` and
    scores, the ROI and the size of Q.  The App and the bench's serial baseline both use it."""
    extra = res.verdict.to_dict()
    extra.pop("verdict"), extra.pop("reasons")
    r = res.roi
    extra.update(
        anodes=_points(res.anodes), anode_scores=np.round(res.anode_scores, 3).tolist(),
        cathodes=_points(res.cathodes), cathode_scores=np.round(res.cathode_scores, 3).tolist(),
        roi={"direction": r.direction, "angle_deg": round(r.angle_deg, 3),
             "centre": np.round(r.centre, 2).tolist(), "size": [round(r.size[0], 2), round(r.size[1], 2)]}
        if r.ok else None,
        n_corners=int(len(r.corners)))
    return extra


class App:
    """One daemon instance built from a ``daemon.config.Config``.  ``start()`` opens the
    sockets and starts the stage threads; ``stop(drain_s)`` drains and closes."""

    def __init__(self, cfg, model: KeypointModel | None = None, state_dir: str | os.PathLike | None = None):
        self.cfg = cfg
        p = cfg.pipeline
        self.settings = JudgeSettings.from_config(cfg)
        self.metrics = Metrics(STAGES, QUEUES)
        m = cfg.model
        self.state_dir = Path(state_dir or cfg.service.state_dir or os.environ.get("STATE_DIRECTORY", "").split(":")[0]
                              or "var")
        # TensorRT builds its engine at the first load; the cache keeps restarts fast
        self.model = model or KeypointModel.from_config(m, cache_dir=self.state_dir / "trt-engines")
        self.metrics.set_model(self.model)
        self.limits = FrameLimits(cfg.ingest.max_frame_bytes, cfg.ingest.max_side, cfg.ingest.max_header_bytes)
        self.queues = {name: queue.Queue(p.queue_size) for name in QUEUES[:3]}
        # the verdict path is never the bottleneck; its queues are sized for a burst of
        # missing_frame/overload verdicts and still bounded
        for name in QUEUES[3:]:
            self.queues[name] = queue.Queue(max(1024, 8 * p.queue_size))
        for name, q in self.queues.items():
            self.metrics.queue_capacity.labels(queue=name).set(q.maxsize)
            self.metrics.queue_depth.labels(queue=name).set_function(q.qsize)  # read at each scrape
        self._stop = threading.Event()  # stage threads exit
        self._receiving = threading.Event()
        self._abort = threading.Event()  # drain ran out of time: remaining frames NG shutdown
        self._lock = threading.Lock()
        self.in_flight = 0  # admitted frames without a published verdict
        self.counts = {"frames": 0, "verdicts": 0, "OK": 0, "NG": 0, "cells": 0}
        self.beats: dict[str, float] = {}
        self.threads: list[threading.Thread] = []
        self.last_seq: dict[str, int] = {}
        self.cells: OrderedDict[str, dict] = OrderedDict()
        self.ctx = None
        self.ingest = self.pub = self.journal = self.archive = self.pool = None
        self.metrics_port: int | None = None
        self.endpoints: dict[str, str] = {}
        self.started = 0.0
        self._opencv_threads_before: int | None = None  # restored at stop

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "App":
        cfg = self.cfg
        log.info("polecheck %s: model %s (sha256 %s) on %s%s", __version__, self.model.path, self.model.sha256[:12],
                 self.model.provider, ", one input shape (fixed tiles, padded batches)"
                 if getattr(self.model, "fixed_shape", False) else "")
        if cfg.model.warmup_runs:
            dt = self.model.warm_up(cfg.model.max_batch, cfg.model.warmup_runs)
            log.info("model warm-up: %d x batch %d in %.2f s", cfg.model.warmup_runs, cfg.model.max_batch, dt)
        if cfg.journal.enabled:
            from .journal import Journal, recover

            folder = self.state_dir / "journal"
            rec = recover(folder)
            self.last_seq.update(rec.last_seq)
            now = time.monotonic()
            for cid, recs in rec.open_cells.items():
                self.cells[cid] = {"corners": {r["corner"]: r for r in recs}, "t0": now,
                                   "scanner_id": recs[0].get("scanner_id"), "dup": []}
            if rec.records:
                log.info("journal: recovered %d records, last seq %s, %d open cell(s)", rec.records,
                         rec.last_seq, len(rec.open_cells))
            self.journal = Journal(folder, cfg.journal.fsync, cfg.journal.fsync_interval_ms, cfg.journal.max_file_mb,
                                   cfg.journal.keep_files, on_fsync=self.metrics.journal_fsync.observe)
        if cfg.archive.enabled:
            from .archive import Archive

            self.archive = Archive(self.state_dir / "ng-archive", cfg.archive.budget_mb, cfg.archive.queue_size,
                                   self.metrics)
        if cfg.pipeline.malloc_tuning:  # process-wide and for good: glibc has no way back to its default
            tune_malloc()
        n_cv = cfg.pipeline.opencv_threads
        if n_cv:  # process-wide: every stage's OpenCV calls (and the roi_corners processes')
            self._opencv_threads_before = cv2.getNumThreads()
            cv2.setNumThreads(n_cv)
        if cfg.pipeline.executor == "process":
            self.pool = ProcessPoolExecutor(cfg.pipeline.roi_workers, initializer=_init_roi_process,
                                            initargs=(n_cv, cfg.pipeline.malloc_tuning))
        self.ctx = zmq.Context()
        self.pub = open_socket(self.ctx, zmq.PUB, cfg.output.endpoint, hwm=cfg.output.hwm)
        self.endpoints["output"] = self.pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        kind = {"pull": zmq.PULL, "sub": zmq.SUB}[cfg.ingest.socket]
        self.ingest = open_socket(self.ctx, kind, cfg.ingest.endpoint, self.limits, cfg.ingest.hwm)
        if cfg.ingest.endpoint.startswith("bind:"):
            self.endpoints["ingest"] = self.ingest.getsockopt(zmq.LAST_ENDPOINT).decode()
        else:
            self.endpoints["ingest"] = cfg.ingest.endpoint.partition(":")[2]
        if cfg.metrics.enabled:
            self.metrics_port = self.metrics.serve(cfg.metrics.host, cfg.metrics.port)
            log.info("metrics on http://%s:%d/metrics", cfg.metrics.host, self.metrics_port)
        p = cfg.pipeline
        self._spawn("frame_receiver", self._receiver)
        for i in range(p.roi_workers):
            self._spawn("roi_corners", self._roi_worker, i)
        for i in range(p.model_workers):
            self._spawn("keypoint_model", self._model_worker, i)
        for i in range(p.refine_workers):
            self._spawn("refine", self._refine_worker, i)
        self._spawn("cell_aggregator", self._aggregator)
        self._spawn("verdict_publisher", self._publisher)
        self._receiving.set()
        self.metrics.up.set(1)
        self.started = time.monotonic()
        log.info("pipeline up: ingest %s (%s), verdicts %s", self.endpoints["ingest"], cfg.ingest.socket,
                 self.endpoints["output"])
        return self

    def _spawn(self, stage: str, fn, index: int = 0) -> None:
        t = threading.Thread(target=self._guard, args=(stage, fn), name=f"{stage}-{index}", daemon=True)
        self.beats[t.name] = time.monotonic()
        self.threads.append(t)
        t.start()

    def _guard(self, stage: str, fn) -> None:
        """Run a stage loop; a crash is logged and stops the watchdog pings (systemd restarts us)."""
        try:
            fn()
        except Exception:
            log.exception("stage %s crashed", stage)
            self.beats[threading.current_thread().name] = -math.inf

    def _beat(self) -> None:
        self.beats[threading.current_thread().name] = time.monotonic()

    def healthy(self, max_age_s: float) -> bool:
        """Every stage thread has looped within ``max_age_s`` (none is stuck or dead)."""
        now = time.monotonic()
        return all(now - b <= max_age_s for b in self.beats.values()) and all(t.is_alive() for t in self.threads)

    def stop(self, drain_s: float | None = None) -> bool:
        """Stop receiving, let the frames in flight finish (at most ``drain_s``, default
        ``service.drain_s``; the rest become NG ``shutdown``), then close everything.
        True when the drain finished in time."""
        drain_s = self.cfg.service.drain_s if drain_s is None else drain_s
        self.metrics.up.set(0)
        self._receiving.clear()
        deadline = time.monotonic() + drain_s
        while self._busy() and time.monotonic() < deadline:
            time.sleep(0.01)
        drained = not self._busy()
        if not drained:
            log.warning("drain: %d frame(s) still in flight after %.1f s: NG shutdown", self.in_flight, drain_s)
            self._abort.set()
            end = time.monotonic() + 5.0
            while self._busy() and time.monotonic() < end:
                time.sleep(0.01)
        self._stop.set()
        for t in self.threads:
            t.join(5.0)
        if self.pool:
            self.pool.shutdown(cancel_futures=True)
        if self._opencv_threads_before is not None:
            cv2.setNumThreads(self._opencv_threads_before)
            self._opencv_threads_before = None
        for s in (self.ingest, self.pub):
            if s is not None:
                s.close(0)
        if self.ctx is not None:
            self.ctx.term()
        if self.journal:
            self.journal.close()
        if self.archive:
            self.archive.close()
        self.metrics.close()
        log.info("stopped: %d frames, %d verdicts (%s)", self.counts["frames"], self.counts["verdicts"],
                 "drained" if drained else "drain timed out")
        return drained

    def _busy(self) -> bool:
        return self.in_flight > 0 or any(q.qsize() for q in self.queues.values())

    def status(self) -> str:
        """One line for systemd's STATUS=."""
        up = max(time.monotonic() - self.started, 1e-9)
        c = self.counts
        return (f"{c['frames']} frames, {c['verdicts']} verdicts ({c['NG']} NG), {c['cells']} cells, "
                f"{c['verdicts'] / up:.1f} verdicts/s, in flight {self.in_flight}, {self.model.provider}")

    # ------------------------------------------------------------------ helpers
    def _put(self, name: str, job_or_msg) -> None:
        """Put on a queue, waiting while it is full (back-pressure) but never past a stop."""
        q = self.queues[name]
        while True:
            try:
                q.put(job_or_msg, timeout=0.1)
                return
            except queue.Full:
                if self._stop.is_set():
                    raise
            self._beat()

    def _get(self, name: str, timeout: float = 0.05):
        self._beat()
        try:
            return self.queues[name].get(timeout=timeout)
        except queue.Empty:
            return None

    def _decided(self, job: Job, code: str, **detail) -> None:
        """Give ``job`` an NG verdict with one reason and send it to the verdict path."""
        job.verdict = self._verdict(job, NG, [{"code": code, **detail}])
        self._put("cell_aggregator", job)

    def _failed(self, job: Job, stage: str, e: Exception) -> None:
        """A stage raised on this frame: NG ``internal_error``, logged with the traceback and
        counted; the stage goes on with the next frame."""
        log.exception("stage %s failed on frame %s seq %s", stage, job.meta.get("cell_id"), job.meta.get("seq"))
        self.metrics.internal_errors.labels(stage=stage).inc()
        job.crops = job.heatmaps = None
        self._decided(job, "internal_error", stage=stage, error=f"{type(e).__name__}: {e}"[:300])

    def _late(self, job: Job) -> bool:
        """Past its deadline, or the drain gave up: decided NG here (True)."""
        if self._abort.is_set():
            self._decided(job, "shutdown", detail="still in flight when the drain time ran out")
            return True
        age = time.monotonic() - job.received
        if age * 1000.0 > self.cfg.pipeline.deadline_ms:
            self._decided(job, "overload", waited_ms=round(age * 1000.0, 1),
                          limit_ms=self.cfg.pipeline.deadline_ms)
            return True
        return False

    def _verdict(self, job: Job, verdict: str, reasons: list[dict], extra: dict | None = None) -> dict:
        return frame_message(job.meta, verdict, reasons, extra, self.cfg.recipe.name, self.model.sha256)

    # ------------------------------------------------------------------ stages
    def _receiver(self) -> None:
        """frame_receiver: zero-copy receive, decode, sequence check, admission."""
        poller = zmq.Poller()
        poller.register(self.ingest, zmq.POLLIN)
        p = self.cfg.pipeline
        while not self._stop.is_set():
            self._beat()
            if not self._receiving.is_set() or not poller.poll(50):
                continue
            parts = self.ingest.recv_multipart(copy=False)
            t = time.perf_counter()
            job = Job({}, time.monotonic())
            job.meta["received_ns"] = time.time_ns()
            self.metrics.frames.inc()
            with self._lock:
                self.counts["frames"] += 1
                self.in_flight += 1
            try:
                frame = decode_frame(parts, self.limits)
            except FrameError as e:
                # the ids are known only where the header's fields passed validation (the
                # error came later); otherwise the seq is left to the gap check
                h = e.header if e.kind in VALIDATED_HEADER_ERRORS else {}
                job.meta.update({k: h.get(k) for k in ("scanner_id", "cell_id", "corner", "seq", "ts_ns")})
                self.metrics.frame_errors.labels(kind=e.kind).inc()
                log.warning("bad frame: %s", str(e)[:200])
                self._sequence(job.meta.get("scanner_id"), job.meta.get("seq"))
                self._decided(job, "bad_frame", kind=e.kind, detail=str(e)[:300])
                continue
            hd = frame.header
            job.meta.update(header_fields(hd))
            job.image, job.frame = frame.image, frame
            self._sequence(hd.scanner_id, hd.seq)
            job.times["frame_receiver"] = time.perf_counter() - t
            self.metrics.stage_seconds.labels(stage="frame_receiver").observe(job.times["frame_receiver"])
            try:
                self.queues["roi_corners"].put(job, timeout=p.admit_timeout_ms / 1000.0)
            except queue.Full:
                self._decided(job, "overload", queue="roi_corners", waited_ms=p.admit_timeout_ms)

    def _sequence(self, scanner_id, seq) -> None:
        """Sequence check: a gap becomes ``missing_frame`` verdicts, a step back is a
        scanner restart (counted, logged)."""
        if not isinstance(scanner_id, str) or not isinstance(seq, int) or isinstance(seq, bool):
            return
        last = self.last_seq.get(scanner_id)
        self.last_seq[scanner_id] = seq
        if last is None or seq == last + 1:
            return
        if seq <= last:
            self.metrics.seq_resets.inc()
            log.warning("scanner %s: seq %d after %d (scanner restart or duplicate)", scanner_id, seq, last)
            return
        missing = range(last + 1, seq)
        log.warning("scanner %s: %d frame(s) missing (seq %d..%d)", scanner_id, len(missing), last + 1, seq - 1)
        cap = self.cfg.pipeline.max_gap_verdicts
        for s in missing[:cap]:
            self._missing(scanner_id, s, s)
        if len(missing) > cap:
            self._missing(scanner_id, missing[cap], seq - 1)

    def _missing(self, scanner_id: str, first: int, last: int) -> None:
        job = Job({"received_ns": time.time_ns(), "scanner_id": scanner_id, "seq": first, "cell_id": None,
                   "corner": None}, time.monotonic())
        with self._lock:
            self.in_flight += 1
        detail = {"detail": "sequence gap: no frame arrived with this seq"}
        if last != first:
            detail = {"detail": "sequence gap over max_gap_verdicts: one verdict for the rest", "seq_last": last}
        self._decided(job, "missing_frame", **detail)

    def _roi_worker(self) -> None:
        """roi_corners: ROI, tip direction and corner set Q; then the model's crops."""
        codec, s = self.model.codec, self.settings
        plan = s.crops.for_model(self.model)
        while not self._stop.is_set():
            job = self._get("roi_corners")
            if job is None or self._late(job):
                continue
            t = time.perf_counter()
            try:
                if self.pool is not None:
                    fut = self.pool.submit(_roi_task, np.array(job.image), s.roi, codec, plan)
                    job.roi, job.tiles, job.crops, t_roi, t_crops = fut.result()
                else:
                    job.roi, job.tiles, job.crops, t_roi, t_crops = _roi_task(job.image, s.roi, codec, plan)
            except Exception as e:
                self._failed(job, "roi_corners", e)
                continue
            wall = time.perf_counter() - t
            job.times["roi_corners"] = wall - t_crops
            if job.roi.ok:
                job.times["keypoint_model"] = t_crops  # sampling the crops is the model stage's input work
            self.metrics.stage_seconds.labels(stage="roi_corners").observe(job.times["roi_corners"])
            self._put("keypoint_model" if job.roi.ok else "refine", job)

    def _model_worker(self) -> None:
        """keypoint_model: micro-batches of up to B = model.max_batch crops or T =
        pipeline.batch_wait_ms, whichever comes first."""
        B, T = self.cfg.model.max_batch, self.cfg.pipeline.batch_wait_ms / 1000.0
        pending: Job | None = None
        while not self._stop.is_set():
            first = pending or self._get("keypoint_model")
            pending = None
            if first is None or self._late(first):
                continue
            batch, n = [first], len(first.crops)
            t_end = time.monotonic() + T
            while n < B:
                wait = t_end - time.monotonic()
                try:
                    job = self.queues["keypoint_model"].get(timeout=wait) if wait > 0 else \
                        self.queues["keypoint_model"].get_nowait()
                except queue.Empty:
                    break
                if self._late(job):
                    continue
                if n + len(job.crops) > B:
                    pending = job  # starts the next batch
                    break
                batch.append(job)
                n += len(job.crops)
            t = time.perf_counter()
            # crops fitted to each ROI differ in size between frames: one model call per size
            groups: dict[tuple, list[Job]] = {}
            for j in batch:
                groups.setdefault(j.crops.shape[2:], []).append(j)
            try:
                for jobs in groups.values():
                    x = np.concatenate([j.crops for j in jobs])
                    hm = run_model(self.model, x, B)
                    self.metrics.batch_size.observe(len(x))
                    self.metrics.batch_frames.observe(len(jobs))
                    k = 0
                    for j in jobs:
                        j.heatmaps, k = hm[k:k + len(j.crops)], k + len(j.crops)
            except Exception as e:
                for j in batch:
                    self._failed(j, "keypoint_model", e)
                continue
            dt = time.perf_counter() - t
            for j in batch:
                j.crops = None
                j.times["keypoint_model"] = j.times.get("keypoint_model", 0.0) + dt
                self._put("refine", j)

    def _refine_worker(self) -> None:
        """refine (heatmap decode + corner-prior fusion) and verdict_rules."""
        s, codec = self.settings, self.model.codec
        while not self._stop.is_set():
            job = self._get("refine")
            if job is None:
                continue
            try:
                self._refine(job, s, codec)
            except Exception as e:
                self._failed(job, "refine", e)
                continue
            self._put("cell_aggregator", job)

    def _refine(self, job: Job, s: JudgeSettings, codec) -> None:
        """refine + verdict_rules on one job: sets ``job.result`` and ``job.verdict``."""
        tips = None
        if job.roi.ok:
            t = time.perf_counter()
            h, w = job.image.shape
            tips = tips_from_heatmaps(job.heatmaps, job.tiles, codec, (w, h), s.threshold, s.low_threshold,
                                      s.min_distance)
            job.heatmaps = None
            job.times["keypoint_model"] += time.perf_counter() - t
            self.metrics.stage_seconds.labels(stage="keypoint_model").observe(job.times["keypoint_model"])
        res = refine_and_judge(job.roi, tips, job.meta["pixel_pitch_um"], s, codec.stride, job.times)
        job.times = res.times
        for st in ("refine", "verdict_rules"):
            if st in res.times:
                self.metrics.stage_seconds.labels(stage=st).observe(res.times[st])
        job.result = res
        job.verdict = self._verdict(job, res.verdict.verdict, res.verdict.reasons, judged_fields(res))

    def _aggregator(self) -> None:
        """cell_aggregator: forwards frame verdicts and closes cells (all corners in, or NG
        incomplete after cells.timeout_ms; the oldest beyond cells.max_open)."""
        c = self.cfg.cells
        while not self._stop.is_set():
            job = self._get("cell_aggregator")
            t = time.perf_counter()
            now = time.monotonic()
            if job is not None:
                self._put("verdict_publisher", job)
                v = job.verdict
                cid, corner = v.get("cell_id"), v.get("corner")
                if isinstance(cid, str) and isinstance(corner, int):
                    cell = self.cells.get(cid)
                    if cell is None:
                        cell = self.cells[cid] = {"corners": {}, "t0": now, "scanner_id": v.get("scanner_id"),
                                                  "dup": []}
                    if corner in cell["corners"] or corner >= c.corners:
                        cell["dup"].append({"code": "bad_corner" if corner >= c.corners else "duplicate_corner",
                                            "corner": corner, "seq": v.get("seq")})
                    else:
                        cell["corners"][corner] = {"verdict": v["verdict"], "reasons": v["reasons"],
                                                   "seq": v.get("seq")}
                    if len(cell["corners"]) == c.corners:
                        self._close_cell(cid)
            while self.cells:
                cid, cell = next(iter(self.cells.items()))
                if now - cell["t0"] > c.timeout_ms / 1000.0 or len(self.cells) > c.max_open:
                    self._close_cell(cid)
                else:
                    break
            self.metrics.open_cells.set(len(self.cells))
            if job is not None:
                self.metrics.stage_seconds.labels(stage="cell_aggregator").observe(time.perf_counter() - t)

    def _close_cell(self, cid: str) -> None:
        cell = self.cells.pop(cid)
        corners = {k: {"verdict": x["verdict"], "reasons": x["reasons"]} for k, x in cell["corners"].items()}
        cv = judge_cell(corners, self.cfg.cells.corners)
        reasons = cv["reasons"] + cell["dup"]
        msg = {"type": "cell", "schema": 1, "scanner_id": cell["scanner_id"], "cell_id": cid,
               "verdict": NG if reasons else OK, "reasons": reasons, "corners": cv["corners"],
               "seqs": {int(k): x.get("seq") for k, x in cell["corners"].items()}, "ts_ns": time.time_ns(),
               "recipe": self.cfg.recipe.name}
        self._put("verdict_publisher", msg)

    def _publisher(self) -> None:
        """verdict_publisher: journal first, then PUB; NG frames to the archive; a status
        message every ``output.status_interval_s``."""
        next_status = 0.0
        while not self._stop.is_set():
            item = self._get("verdict_publisher")
            if self.journal:
                self.journal.tick()
            if time.monotonic() >= next_status:
                self.pub.send_multipart([b"status", _json({"type": "status", **self.counts, "in_flight": self.in_flight,
                                                           "ts_ns": time.time_ns()})])
                next_status = time.monotonic() + self.cfg.output.status_interval_s
            if item is None:
                continue
            t = time.perf_counter()
            if isinstance(item, Job):
                v = item.verdict
                v.update(timing_fields(time.monotonic() - item.received, item.times))
            else:
                v = item
            payload = _json(v)
            if self.journal:
                self.journal.append_line(payload)
            scanner = str(v.get("scanner_id") or "unknown").encode()
            self.pub.send_multipart([VERDICT_TOPIC + b"." + v["type"].encode() + b"/" + scanner, payload])
            if isinstance(item, Job):
                self.metrics.verdicts.labels(verdict=v["verdict"]).inc()
                for r in v["reasons"]:
                    self.metrics.reasons.labels(code=r.get("code", "?")).inc()
                self.metrics.latency.observe(time.monotonic() - item.received)
                # judged NG frames (and frames a stage failed on) are archived; overload and
                # shutdown verdicts are not: writing PNGs would add load when there is too much
                if v["verdict"] != OK and self.archive is not None and item.image is not None and (
                        item.result is not None or v["reasons"][0]["code"] == "internal_error"):
                    res = item.result
                    self.archive.submit(v, item.image, item.roi, res.anodes if res else None,
                                        res.cathodes if res else None)
                with self._lock:
                    self.in_flight -= 1
                    self.counts["verdicts"] += 1
                    self.counts[v["verdict"]] += 1
                item.image = item.frame = None  # release the ZeroMQ buffer
            else:
                self.metrics.cell_verdicts.labels(verdict=v["verdict"]).inc()
                with self._lock:
                    self.counts["cells"] += 1
            self.metrics.stage_seconds.labels(stage="verdict_publisher").observe(time.perf_counter() - t)


def _finite(x):
    """``x`` with non-finite floats as None, recursively (JSON has no NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _json(v: dict) -> bytes:
    """Compact JSON of a verdict; a NaN/inf (never expected) becomes null, not a crash."""
    try:
        return json.dumps(v, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        log.error("verdict with a non-finite number (seq %s): written as null", v.get("seq"))
        return json.dumps(_finite(v), separators=(",", ":"), allow_nan=False).encode()
