"""The daemon (App): every frame exactly one verdict, cells, overload, journal recovery,
metrics scrape.  Real model, real sockets on loopback (ports chosen by the OS), small
256x256 phantoms so that thousands of frames take seconds."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections import Counter

import numpy as np
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from daemon.app import QUEUES, STAGES, App
from daemon.config import load_config
from daemon.demo import Subscriber, wait_subscribed
from daemon.feed import render_pool
from daemon.model import KeypointModel
from daemon.protocol import encode_frame, make_header, open_socket

CFG = load_config(None, environ={})
N_FRAMES = 2000


def app_config(**sections):
    """The default config on random loopback ports, metrics on a free port, with
    ``section={key: value}`` overrides."""
    base = {"ingest": {"endpoint": "bind:tcp://127.0.0.1:*"}, "output": {"endpoint": "bind:tcp://127.0.0.1:*"},
            "metrics": {"port": 0}}
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return CFG.model_validate({**CFG.model_dump(), **{k: {**CFG.model_dump()[k], **v} for k, v in base.items()}})


# For tests that compare every frame's judged result: no admission or deadline overload,
# whatever pauses the machine has (a 2 s stall on a shared CI host would otherwise turn a
# frame into NG overload, which has no points to compare)
NO_OVERLOAD = {"queue_size": 64, "admit_timeout_ms": 60_000.0, "deadline_ms": 600_000.0}


@pytest.fixture(scope="module")
def model():
    return KeypointModel(CFG.model.resolved_path(), CFG.model.sha256, ("CPUExecutionProvider",), threads=1)


@pytest.fixture(scope="module")
def pool():
    return render_pool(4, "defects", (256, 256), 16, seed=424242, jobs=1)


class ModelWrapper:
    """The real model ``m`` behind a stand-in: attributes come from ``m``, calls go to it
    (subclasses change ``__call__``)."""

    def __init__(self, m):
        self._m = m

    def __getattr__(self, name):
        return getattr(self._m, name)

    def __call__(self, x):
        return self._m(x)


class GatedModel(ModelWrapper):
    """The real model behind a gate: while ``gate`` is clear, model calls wait, so the
    queues behind the receiver fill up whatever the machine's speed (a fast machine keeps
    up with any flood the test can send)."""

    def __init__(self, m):
        super().__init__(m)
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, x):
        self.gate.wait(60.0)
        return self._m(x)

    def wait_for_overload(self, sub, timeout: float) -> None:
        """Open the gate once ``sub`` has seen a new NG overload verdict (or after ``timeout`` s)."""
        def overloaded() -> int:
            return sum(1 for v in list(sub.frames) if v["reasons"] and v["reasons"][0]["code"] == "overload")

        seen, end = overloaded(), time.monotonic() + timeout
        while overloaded() == seen and time.monotonic() < end:
            time.sleep(0.005)
        self.gate.set()


class Rig:
    """An App plus a PUSH socket into it and a subscriber on its verdicts; closes all."""

    def __init__(self, cfg, model, state_dir, sender: int = zmq.PUSH):
        self.app = App(cfg, model=model, state_dir=state_dir).start()
        self.ctx = zmq.Context()
        self.sub = Subscriber(self.ctx, self.app.endpoints["output"])
        wait_subscribed(self.sub)
        self.push = open_socket(self.ctx, sender, "connect:" + self.app.endpoints["ingest"], hwm=100_000)

    def send(self, f, seq: int, cell_id: str, scanner_id: str = "scan-A") -> None:
        h = make_header(f.image, scanner_id=scanner_id, cell_id=cell_id, corner=f.corner, seq=seq,
                        pixel_pitch_um=f.pixel_pitch_um)
        self.push.send_multipart(encode_frame(h, f.image), copy=False)

    def wait(self, frames: int, cells: int = 0, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while (len(self.sub.frames) < frames or len(self.sub.cells) < cells) and time.monotonic() < end:
            time.sleep(0.01)
        time.sleep(0.2)  # anything extra (a duplicate verdict) would arrive now

    def close(self) -> bool:
        self.push.close(0)
        drained = self.app.stop(10.0)
        self.sub.close()
        self.ctx.term()
        return drained


@pytest.fixture(scope="module")
def long_run(model, pool, tmp_path_factory):
    """``N_FRAMES`` frame slots through one App: judged frames, 1 in 97 malformed (a bad
    header JSON with its seq unknown, or a pixel buffer of the wrong size with it known),
    1 in 89 never sent (a sequence gap), and a burst that overloads the first queue.
    Returns the verdicts, the metrics scraped before the stop, and what was sent."""
    cfg = app_config(pipeline={"queue_size": 4, "admit_timeout_ms": 20.0}, cells={"timeout_ms": 1500.0})
    gated = GatedModel(model)
    rig = Rig(cfg, gated, tmp_path_factory.mktemp("state"))
    frames = [f for cell in pool for f in cell]
    sent, skipped, bad = [], [], []
    try:
        for seq in range(N_FRAMES):
            if seq % 500 == 0:  # a flood starts: the model stalls, as on a busy machine
                gated.gate.clear()
            elif seq % 500 == 61:  # the flood is sent: the model resumes once it has overloaded
                gated.wait_for_overload(rig.sub, 30.0)
            f = frames[seq % len(frames)]
            cell_id = f"cell-{seq // 4:05d}"
            if seq % 89 == 45:
                skipped.append(seq)
                continue
            if seq % 97 == 13:
                h = make_header(f.image, scanner_id="scan-A", cell_id=cell_id, corner=f.corner, seq=seq,
                                pixel_pitch_um=f.pixel_pitch_um)
                parts = encode_frame(h, f.image)
                if seq % 2:
                    parts[2] = bytes(parts[2])[:-2]  # size_mismatch, seq known
                else:
                    parts[1] = b"{not json"  # bad_header_json, seq unknown
                rig.push.send_multipart(parts)
                bad.append(seq)
            else:
                rig.send(f, seq, cell_id)
            sent.append(seq)
            # paced in bursts: mostly within capacity, every 500 frames a flood
            if seq % 500 > 60 and seq % 4 == 0:
                time.sleep(0.05)
        # the last frame may be a skipped seq: the gap is only visible once a later frame comes
        rig.send(frames[0], N_FRAMES, "cell-tail")
        sent.append(N_FRAMES)
        # one verdict per message received, one missing_frame per seq never seen (skipped, or
        # sent in a header that did not parse)
        rig.wait(len(sent) + len(skipped) + sum(1 for s in bad if s % 2 == 0), cells=N_FRAMES // 4)
        text = urllib.request.urlopen(f"http://127.0.0.1:{rig.app.metrics_port}/metrics", timeout=5).read().decode()
        counts = dict(rig.app.counts)
    finally:
        drained = rig.close()
    return {"frames": rig.sub.frames, "cells": rig.sub.cells, "metrics": text, "sent": sent, "skipped": skipped,
            "bad": bad, "counts": counts, "drained": drained}


def test_every_frame_gets_exactly_one_verdict(long_run):
    r = long_run
    frames = r["frames"]
    assert len(r["sent"]) + len(r["skipped"]) >= N_FRAMES
    bad_unknown = [s for s in r["bad"] if s % 2 == 0]
    # one verdict per message received plus one per seq never seen, nothing else
    assert len(frames) == len(r["sent"]) + len(r["skipped"]) + len(bad_unknown)
    with_seq = Counter(v["seq"] for v in frames if v["seq"] is not None)
    seqless = [v for v in frames if v["seq"] is None]
    assert len(seqless) == len(bad_unknown)
    assert all(v["reasons"][0]["kind"] == "bad_header_json" for v in seqless)
    # every seq 0..N has exactly one verdict, except the seqs of frames whose header did not
    # parse: those are covered by a missing_frame verdict instead (one each, not two)
    assert set(with_seq) == set(range(N_FRAMES + 1))
    assert max(with_seq.values()) == 1
    by_seq = {v["seq"]: v for v in frames if v["seq"] is not None}
    for s in r["skipped"] + bad_unknown:
        assert by_seq[s]["verdict"] == "NG" and by_seq[s]["reasons"][0]["code"] == "missing_frame"
    for s in r["bad"]:
        if s % 2:
            assert by_seq[s]["reasons"][0] == {**by_seq[s]["reasons"][0], "code": "bad_frame", "kind": "size_mismatch"}
    codes = Counter(v["reasons"][0]["code"] if v["reasons"] else "OK" for v in frames)
    judged = sum(1 for v in frames if "n_anode" in v)
    assert judged > N_FRAMES // 2 and codes["OK"] > N_FRAMES // 4, codes  # most frames were really judged
    assert codes["overload"] > 0, codes  # the floods overloaded the first queue
    assert codes["overhang_high"] + codes["overhang_low"] + codes["count_mismatch"] > 0, codes
    assert r["drained"]


def test_frame_verdicts_carry_what_the_line_needs(long_run):
    ok = [v for v in long_run["frames"] if v["verdict"] == "OK"]
    v = ok[0]
    for key in ("scanner_id", "cell_id", "corner", "seq", "ts_ns", "anodes", "cathodes", "overhang_um", "times_ms",
                "latency_ms", "model_sha256", "recipe", "roi"):
        assert key in v, key
    assert v["model_sha256"] == CFG.model.sha256
    assert len(v["anodes"]) == len(v["cathodes"]) + 1 == v["n_anode"]
    assert set(v["times_ms"]) >= {"frame_receiver", "roi_corners", "keypoint_model", "refine", "verdict_rules"}
    assert all(x is None or 750 <= x <= 2250 for row in v["overhang_um"] for x in row)


def test_cells_get_one_verdict_each(long_run):
    cells = long_run["cells"]
    ids = Counter(c["cell_id"] for c in cells)
    assert max(ids.values()) == 1
    assert {f"cell-{i:05d}" for i in range(N_FRAMES // 4)} <= set(ids)
    by_id = {c["cell_id"]: c for c in cells}
    # a cell with a skipped frame closes NG incomplete; a cell is OK only with 4 OK corners
    for s in long_run["skipped"]:
        c = by_id[f"cell-{s // 4:05d}"]
        assert c["verdict"] == "NG" and any(r["code"] == "incomplete" for r in c["reasons"])
    for c in cells:
        if c["verdict"] == "OK":
            assert sorted(c["corners"]) == ["0", "1", "2", "3"] and set(c["corners"].values()) == {"OK"}


def _samples(text: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_scrape(long_run):
    s = _samples(long_run["metrics"])
    frames = long_run["frames"]
    received = len(long_run["sent"])
    assert s[("polecheck_frames_received_total", ())] == received
    verdicts = Counter(v["verdict"] for v in frames)
    for verdict in ("OK", "NG"):
        assert s[("polecheck_verdicts_total", (("verdict", verdict),))] == verdicts[verdict]
    reasons = Counter(r["code"] for v in frames for r in v["reasons"])
    for code, n in reasons.items():
        assert s[("polecheck_reasons_total", (("code", code),))] == n
    assert s[("polecheck_frame_errors_total", (("kind", "bad_header_json"),))] == \
        sum(1 for b in long_run["bad"] if b % 2 == 0)
    for stage in STAGES:
        assert s[("polecheck_stage_duration_seconds_count", (("stage", stage),))] > 0, stage
        # fine buckets below 5 ms
        assert ("polecheck_stage_duration_seconds_bucket", (("le", "0.0025"), ("stage", stage))) in s
    judged = sum(1 for v in frames if "n_anode" in v)
    assert s[("polecheck_stage_duration_seconds_count", (("stage", "refine"),))] == judged
    for q in QUEUES:
        assert ("polecheck_queue_depth", (("queue", q),)) in s
        assert s[("polecheck_queue_capacity", (("queue", q),))] >= 1
    assert s[("polecheck_batch_size_count", ())] > 0
    assert s[("polecheck_batch_size_sum", ())] >= judged  # at least one crop per judged frame
    assert s[("polecheck_model_provider_info", (("provider", "CPUExecutionProvider"),
                                                ("wanted", "CPUExecutionProvider")))] == 1
    assert s[("polecheck_model_provider_fallback", ())] == 0
    assert any(k[0] == "polecheck_model_info" and ("sha256", CFG.model.sha256) in k[1] for k in s)
    assert any(k[0] == "polecheck_build_info" for k in s)
    assert s[("polecheck_up", ())] == 1
    assert s[("polecheck_frame_latency_seconds_count", ())] == len(frames)


class SlowModel(ModelWrapper):
    """The real model, 80 ms slower per call: a stand-in for an overloaded machine."""

    def __call__(self, x):
        time.sleep(0.08)
        return self._m(x)


def test_queue_depth_is_read_at_the_scrape(model, tmp_path):
    """``polecheck_queue_depth`` is each queue's size when Prometheus scrapes, not when a
    stage last looked."""
    from prometheus_client import generate_latest

    app = App(app_config(journal={"enabled": False}, archive={"enabled": False}), model=model, state_dir=tmp_path)
    for k in range(3):
        app.queues["refine"].put(k)
    s = _samples(generate_latest(app.metrics.registry).decode())
    assert s[("polecheck_queue_depth", (("queue", "refine"),))] == 3
    assert s[("polecheck_queue_depth", (("queue", "roi_corners"),))] == 0
    app.queues["refine"].get()
    s = _samples(generate_latest(app.metrics.registry).decode())
    assert s[("polecheck_queue_depth", (("queue", "refine"),))] == 2


def test_opencv_threads_hold_while_the_app_runs(model, tmp_path):
    """``pipeline.opencv_threads`` (1 by default) holds while the App runs, in its
    roi_corners processes too, and OpenCV's previous setting comes back at stop; 0 leaves
    OpenCV's setting alone."""
    import cv2

    before = cv2.getNumThreads()
    off = {"enabled": False}
    cv2.setNumThreads(3)
    try:
        # (pipeline overrides, OpenCV's threads while the App runs)
        for pipeline, running in (({"executor": "process"}, 1), ({"opencv_threads": 2}, 2),
                                  ({"opencv_threads": 0}, 3)):
            app = App(app_config(pipeline=pipeline, journal=off, archive=off), model=model,
                      state_dir=tmp_path).start()
            try:
                assert cv2.getNumThreads() == running, pipeline
                if app.pool is not None:
                    assert app.pool.submit(cv2.getNumThreads).result(60) == running
            finally:
                app.stop(5.0)
            assert cv2.getNumThreads() == 3, pipeline
    finally:
        cv2.setNumThreads(before)


def test_malloc_tuning_follows_the_config(model, tmp_path, monkeypatch):
    """``pipeline.malloc_tuning`` (on by default) tunes the allocator when the App starts;
    false leaves it alone."""
    import daemon.app

    calls = []
    monkeypatch.setattr(daemon.app, "tune_malloc", lambda: calls.append(1) or True)
    off = {"enabled": False}
    for pipeline, expected in (({}, 1), ({"malloc_tuning": False}, 0)):
        calls.clear()
        App(app_config(pipeline=pipeline, journal=off, archive=off), model=model, state_dir=tmp_path).start().stop(5.0)
        assert len(calls) == expected, pipeline


def test_deadline_overload_is_ng_never_dropped(model, pool, tmp_path):
    # one crop per call, 80 ms each: 40 frames need 3.2 s, far past a 150 ms deadline
    cfg = app_config(pipeline={"deadline_ms": 150.0, "queue_size": 64, "admit_timeout_ms": 1000.0,
                               "model_workers": 1}, model={"max_batch": 1}, journal={"enabled": False},
                     archive={"enabled": False})
    rig = Rig(cfg, SlowModel(model), tmp_path)
    frames = [f for cell in pool for f in cell]
    try:
        for seq in range(40):
            rig.send(frames[seq % len(frames)], seq, f"c{seq // 4}")
        rig.wait(40, cells=10)
    finally:
        rig.close()
    got = Counter(v["seq"] for v in rig.sub.frames)
    codes = Counter(v["reasons"][0]["code"] if v["reasons"] else "OK" for v in rig.sub.frames)
    assert sorted(got) == list(range(40)) and max(got.values()) == 1, (got, codes)
    assert codes["overload"] >= 10, codes  # the backlog outlived its deadline
    late = [v for v in rig.sub.frames if v["reasons"] and v["reasons"][0]["code"] == "overload"]
    assert all(v["verdict"] == "NG" and v["reasons"][0]["waited_ms"] >= 150.0 for v in late)  # rounded to 0.1 ms


def test_restart_recovers_sequence_and_open_cells(model, pool, tmp_path):
    cfg = app_config(cells={"timeout_ms": 60_000.0}, archive={"enabled": False})
    cell = pool[0]
    rig = Rig(cfg, model, tmp_path)
    try:
        for k in range(4):
            rig.send(cell[k], k, "cell-1")
        rig.send(cell[0], 4, "cell-2")
        rig.send(cell[1], 5, "cell-2")
        rig.wait(6, cells=1)
    finally:
        assert rig.close()
    assert len(rig.sub.frames) == 6 and [c["cell_id"] for c in rig.sub.cells] == ["cell-1"]
    # the daemon is down while seqs 6 and 7 are sent; after the restart seq 8 arrives
    rig = Rig(cfg, model, tmp_path)
    try:
        rig.send(cell[2], 8, "cell-2")
        rig.send(cell[3], 9, "cell-2")
        rig.wait(4, cells=1)
    finally:
        rig.close()
    by_seq = {v["seq"]: v for v in rig.sub.frames}
    assert sorted(by_seq) == [6, 7, 8, 9]
    assert by_seq[6]["reasons"][0]["code"] == by_seq[7]["reasons"][0]["code"] == "missing_frame"
    (c2,) = rig.sub.cells
    assert c2["cell_id"] == "cell-2" and sorted(c2["corners"]) == ["0", "1", "2", "3"]
    assert not any(r["code"] == "incomplete" for r in c2["reasons"])
    lines = [json.loads(x) for f in sorted((tmp_path / "journal").glob("*.jsonl")) for x in f.read_text().splitlines()]
    assert Counter(x["type"] for x in lines) == {"frame": 10, "cell": 2}


def test_incomplete_cell_and_ng_archive(model, pool, tmp_path):
    cfg = app_config(cells={"timeout_ms": 300.0}, archive={"budget_mb": 50.0})
    rig = Rig(cfg, model, tmp_path)
    try:
        for k in range(3):
            rig.send(pool[0][k], k, "cell-x")
        rig.push.send_multipart([b"frame/x", b"{}", b""])  # NG bad_frame: no image, nothing to archive
        rig.wait(4, cells=1, timeout=30)
    finally:
        rig.close()
    (c,) = rig.sub.cells
    assert c["verdict"] == "NG" and c["reasons"][0] == {"code": "incomplete", "missing_corners": [3]}
    ng = [v for v in rig.sub.frames if v["verdict"] == "NG" and "n_anode" in v]
    files = sorted(p.name for p in (tmp_path / "ng-archive").iterdir())
    assert len(files) == 3 * len(ng)  # raw PNG, overlay PNG, verdict JSON per judged NG frame
    for v in ng:
        stem = [f for f in files if f.endswith(f"_{v['seq']}_cell-x_{v['corner']}.json")]
        assert len(stem) == 1
    if ng:
        import cv2

        raw = [f for f in files if f.endswith(".png") and not f.endswith("_overlay.png")][0]
        img = cv2.imread(str(tmp_path / "ng-archive" / raw), cv2.IMREAD_UNCHANGED)
        assert img.dtype == np.uint16 and img.shape == (256, 256)


def test_archive_keeps_its_budget(tmp_path):
    from daemon.archive import Archive

    rng = np.random.default_rng(5)
    a = Archive(tmp_path, budget_mb=1.0, queue_size=64)
    for i in range(12):
        img = rng.integers(0, 65535, (256, 256), dtype=np.uint16)  # ~130 kB incompressible
        assert a.submit({"verdict": "NG", "reasons": [{"code": "overhang_low"}], "seq": i, "received_ns": i + 1},
                        img)
    a.close()
    assert a.written == 12
    total = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert total <= 1024 * 1024 and total == a.bytes
    kept = sorted(int(p.name.split("_")[2]) for p in tmp_path.glob("*.json"))
    assert kept == list(range(12 - len(kept), 12)) and 2 <= len(kept) < 12  # the oldest went first


def test_bench_pipeline_smoke():
    """`polecheck bench --stage pipeline` end to end on tiny frames: every variant judges
    every frame, none overloaded (the bench feeds with back-pressure)."""
    from daemon.bench import bench_pipeline

    res = bench_pipeline(size=(256, 256), bits=16, frames=16, pool_cells=2, rounds=2)
    assert len(res["rows"]) == 6
    assert len(res["serial_1t_runs_fps"]) == len(res["pipelined_runs_fps"]) == 2
    for name, row in res["rows"].items():
        assert row["frames"] == 16 and row["overload"] == 0, (name, row)
        assert row["frames_per_s"] > 0 and row["latency_p99_ms"] >= row["latency_p50_ms"] > 0
    assert res["pipelined_over_serial_1t"] > 0


class ReportsCuda(ModelWrapper):
    """The real (CPU) model reporting the CUDA provider: the bench's GPU branch on CPU."""

    provider = "CUDAExecutionProvider"


def test_bench_pipeline_on_a_gpu_provider(monkeypatch):
    """On a GPU provider the bench runs one session for the serial baseline and the App
    (ONNX Runtime's intra-op threads are a CPU setting, so no "ORT 2 threads" row), and
    measures what the second core adds on a CPU session of its own."""
    from daemon import bench
    from daemon.model import KeypointModel

    real = KeypointModel.from_config.__func__
    built, scaled = [], []

    def from_config(cls, m, threads=None, cache_dir=None):
        built.append(threads)
        return ReportsCuda(real(cls, m, threads, cache_dir))

    monkeypatch.setattr(KeypointModel, "from_config", classmethod(from_config))
    monkeypatch.setattr(bench, "core_scaling", lambda model: scaled.append(model.provider) or 2.0)
    res = bench.bench_pipeline(size=(256, 256), bits=16, frames=8, pool_cells=1, rounds=1)
    assert built == [1]
    assert scaled == ["CPUExecutionProvider"]
    assert res["provider"] == "CUDAExecutionProvider" and res["pipelined_over_serial_2t"] is None
    assert "serial, ORT 2 threads, unpaced" not in res["rows"] and len(res["rows"]) == 5
    for name, row in res["rows"].items():
        assert row["frames"] == 8 and row["overload"] == 0, (name, row)


class FlakyModel(ModelWrapper):
    """The real model, raising on every third call: a stand-in for a provider failure."""

    def __init__(self, m):
        super().__init__(m)
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        if self.calls % 3 == 0:
            raise RuntimeError("simulated ONNX Runtime failure")
        return self._m(x)


def test_stage_failure_is_ng_internal_error_and_bad_ids_are_not_trusted(model, pool, tmp_path):
    cfg = app_config(pipeline={"model_workers": 1, "batch_wait_ms": 0.0}, journal={"enabled": False},
                     archive={"enabled": False})
    rig = Rig(cfg, FlakyModel(model), tmp_path)
    frames = [f for cell in pool for f in cell]
    try:
        for seq in range(12):
            rig.send(frames[seq], seq, f"c{seq // 4}")
            time.sleep(0.1)  # one frame per model call
        # a header with an invalid seq: NG bad_frame; its seq must not feed the gap check
        h = json.loads(make_header(frames[0].image, scanner_id="scan-A", cell_id="c9", corner=0, seq=0,
                                   pixel_pitch_um=10.0).to_json())
        h["seq"] = -5
        rig.push.send_multipart([b"frame/scan-A", json.dumps(h).encode(), bytes(frames[0].image.nbytes)])
        rig.send(frames[0], 12, "c3")
        rig.wait(14, timeout=30)
        text = urllib.request.urlopen(f"http://127.0.0.1:{rig.app.metrics_port}/metrics", timeout=5).read().decode()
    finally:
        rig.close()
    codes = Counter(v["reasons"][0]["code"] if v["reasons"] else "OK" for v in rig.sub.frames)
    assert len(rig.sub.frames) == 14, codes  # 13 valid frames + the bad one, no missing_frame storm
    assert codes["internal_error"] >= 3 and codes["missing_frame"] == 0, codes
    errs = [v for v in rig.sub.frames if v["reasons"] and v["reasons"][0]["code"] == "internal_error"]
    assert all(v["verdict"] == "NG" and v["reasons"][0]["stage"] == "keypoint_model" for v in errs)
    bad = [v for v in rig.sub.frames if v["reasons"] and v["reasons"][0]["code"] == "bad_frame"]
    assert len(bad) == 1 and bad[0]["seq"] is None and bad[0]["reasons"][0]["kind"] == "bad_field"
    s = _samples(text)
    assert s[("polecheck_internal_errors_total", (("stage", "keypoint_model"),))] == len(errs)


def test_demo_runs_and_agrees_with_the_truth(tmp_path):
    """`polecheck demo` (the README's first command) end to end on small frames: every
    frame one verdict, and its summary's figures are the subscriber's."""
    from daemon.demo import run_demo

    cfg = CFG.model_validate({**CFG.model_dump(), "feed": {**CFG.feed.model_dump(), "size": (256, 256),
                                                           "pool_cells": 2, "seed": 7}})
    lines: list[str] = []
    s = run_demo(cfg, frames=16, rate_hz=40.0, preset="defects", state_dir=str(tmp_path), print_fn=lines.append)
    assert s["frames_sent"] == s["frame_verdicts"] == 16 and s["cell_verdicts"] == 4
    assert s["exactly_one_verdict_per_frame"]
    assert s["OK"] + s["NG"] == 16 and s["cells_OK"] + s["cells_NG"] == 4
    assert s["escapes"] + s["overkill"] == round((1 - s["truth_agreement"]) * 16)
    assert sum(line.startswith("seq") for line in lines) == 16 and any("summary" in line for line in lines)


def test_pub_sub_ingest(model, pool, tmp_path):
    """`ingest.socket: sub` (fan-out setups): the daemon subscribes to a PUB feed."""
    cfg = app_config(ingest={"socket": "sub"}, journal={"enabled": False}, archive={"enabled": False})
    rig = Rig(cfg, model, tmp_path, sender=zmq.PUB)
    try:
        time.sleep(0.5)  # the daemon's subscription reaches the PUB socket
        for seq in range(8):
            rig.send(pool[seq // 4][seq % 4], seq, f"p{seq // 4}")
        rig.wait(8, cells=2, timeout=30)
    finally:
        rig.close()
    assert sorted(v["seq"] for v in rig.sub.frames) == list(range(8)) and len(rig.sub.cells) == 2


class RecordingModel(ModelWrapper):
    """The real model; records the input shape of every call (thread-safe append)."""

    def __init__(self, m):
        super().__init__(m)
        self.shapes: list[tuple] = []

    def __call__(self, x):
        self.shapes.append(tuple(x.shape))
        return self._m(x)


def test_micro_batches_of_mixed_crop_sizes_match_the_serial_path(model, pool, tmp_path):
    """Crops are fitted to each ROI, so one micro-batch holds several sizes: it runs one
    model call per size, and every frame gets exactly the tips ``judge_frame`` (one frame
    at a time) finds, so a frame's result never depends on its batch-mates."""
    cfg = app_config(pipeline={**NO_OVERLOAD, "model_workers": 1, "batch_wait_ms": 200.0},
                     journal={"enabled": False}, archive={"enabled": False})
    rec = RecordingModel(model)
    _judge_pool_like_the_serial_path(cfg, rec, model, pool, tmp_path)
    sizes = {s[2:] for s in rec.shapes}
    assert len(sizes) >= 2, sizes  # the ROIs differ, so do their crops
    assert any(s[0] > 1 for s in rec.shapes), rec.shapes  # and some calls did batch


def _judge_pool_like_the_serial_path(cfg, app_model, model, pool, tmp_path) -> None:
    """Feed every frame of ``pool`` to an App on ``app_model``; assert that each frame went
    through the model (none NG before it, e.g. overload) and got the verdict and tips
    ``judge_frame`` gives with ``model``, one frame at a time."""
    from daemon.pipeline import JudgeSettings, judge_frame

    rig = Rig(cfg, app_model, tmp_path)
    frames = [f for cell in pool for f in cell]
    try:
        for seq, f in enumerate(frames):
            rig.send(f, seq, f"m{seq // 4}")
        rig.wait(len(frames), cells=len(pool), timeout=60)
    finally:
        rig.close()
    got = {v["seq"]: v for v in rig.sub.frames}
    assert sorted(got) == list(range(len(frames)))
    unjudged = {s: v["reasons"] for s, v in got.items() if "anodes" not in v}
    assert not unjudged, unjudged  # every frame went through the model (none NG overload)
    settings = JudgeSettings.from_config(cfg)
    for seq, f in enumerate(frames):
        ref = judge_frame(f.image, f.pixel_pitch_um, model, settings)
        v = got[seq]
        assert v["verdict"] == ref.verdict.verdict, seq
        for key, pts in (("anodes", ref.anodes), ("cathodes", ref.cathodes)):
            np.testing.assert_allclose(np.reshape(v[key], (-1, 2)), np.reshape(pts, (-1, 2)), atol=2e-3)


def test_fixed_shape_model_gets_one_input_shape_in_the_app(pool, tmp_path, record_session_shapes):
    """With ``model.fixed_shape`` (on by default for CUDA) the App's micro-batches reach the
    session as one shape only, ``(max_batch, 1, 256, 256)``, and each frame's tips are the
    ones ``judge_frame`` finds with the same model, one frame at a time."""
    cfg = app_config(pipeline={**NO_OVERLOAD, "batch_wait_ms": 50.0}, journal={"enabled": False},
                     archive={"enabled": False})
    m = cfg.model
    fixed = KeypointModel(m.resolved_path(), m.sha256, ("CPUExecutionProvider",), threads=1,
                          max_batch=m.max_batch, fixed_shape=True)
    shapes = record_session_shapes(fixed)
    _judge_pool_like_the_serial_path(cfg, fixed, fixed, pool, tmp_path)
    assert shapes and set(shapes) == {(m.max_batch, 1, 256, 256)}, set(shapes)


def test_the_serial_baseline_sends_the_apps_frame_message(model, pool, tmp_path):
    """The bench's serial baseline publishes the same frame verdict message as the App
    (the same keys, the same judged figures), so it does the same work per frame."""
    import threading

    from daemon.bench import _serial_daemon

    cfg = app_config(pipeline=NO_OVERLOAD, journal={"enabled": False}, archive={"enabled": False})
    frames = pool[0]
    rig = Rig(cfg, model, tmp_path)
    try:
        for seq, f in enumerate(frames):
            rig.send(f, seq, "s0")
        rig.wait(len(frames), cells=1, timeout=60)
    finally:
        rig.close()
    app_msgs = {v["seq"]: v for v in rig.sub.frames}

    ctx = zmq.Context()
    pull = open_socket(ctx, zmq.PULL, "bind:inproc://serial-in")
    pub = open_socket(ctx, zmq.PUB, "bind:inproc://serial-out")
    push = open_socket(ctx, zmq.PUSH, "connect:inproc://serial-in")
    sub = open_socket(ctx, zmq.SUB, "connect:inproc://serial-out")
    sub.setsockopt(zmq.SUBSCRIBE, b"verdict.frame")
    try:
        worker = threading.Thread(target=_serial_daemon, args=(cfg, model, pull, pub, len(frames)))
        worker.start()
        time.sleep(0.2)  # the subscription reaches the PUB socket
        for seq, f in enumerate(frames):
            h = make_header(f.image, scanner_id="scan-A", cell_id="s0", corner=f.corner, seq=seq,
                            pixel_pitch_um=f.pixel_pitch_um)
            push.send_multipart(encode_frame(h, f.image), copy=False)
        serial_msgs = {}
        while len(serial_msgs) < len(frames) and sub.poll(30_000):
            topic, payload = sub.recv_multipart()
            v = json.loads(payload)
            serial_msgs[v["seq"]] = v
            assert topic == b"verdict.frame/scan-A"
        worker.join(30)
    finally:
        for s in (push, sub):
            s.close(0)
        ctx.term()
    assert sorted(serial_msgs) == sorted(app_msgs) == list(range(len(frames)))
    for seq, a in app_msgs.items():
        s = serial_msgs[seq]
        assert set(s) == set(a) - {"_recv_ns"}, set(s) ^ set(a)  # _recv_ns: the test Subscriber's
        for k in ("verdict", "reasons", "n_corners", "roi", "recipe", "model_sha256", "cell_id", "corner"):
            assert s[k] == a[k], (seq, k)
        assert set(s["times_ms"]) >= {"roi_corners", "keypoint_model", "refine", "verdict_rules"}
