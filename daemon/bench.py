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
def bench_roi(n: int = 20, size: tuple[int, int] = (1024, 1024), bits: int = 16, repeat: int = 25,
              preset: str = "normal", **_) -> dict:
    """Stage 1 on distinct pre-rendered ``preset`` phantoms (the goal's figure is on
    ``normal``; ``hard`` adds every interference, and its noise makes FAST slower), cycled,
    so each call reads a new frame, one core: ``repeat`` rounds over the ``n`` frames (500
    calls by default, so the p99 is the 5th-slowest call, not the slowest).  The
    full-resolution detection (no coarse scale) is the reference, timed in every 5th round,
    interleaved, so that the machine's drift hits both alike.  The tail is split in two:
    the slowest frame's median over its rounds (what content costs) and the 99th
    percentile of each call over its own frame's median (the machine's jitter on the same
    work)."""
    import cv2

    from .phantom import make_phantom
    from .roi import RoiParams, detect_roi, ofast_orientation, ofast_orientation_serial, to_8bit

    cv2.setNumThreads(1)
    frames = [make_phantom(np.random.SeedSequence([31337, i]), preset, size, bits).image for i in range(n)]
    p = RoiParams()
    detect_roi(frames[0], p), detect_roi(frames[0], p, full_resolution=True)  # warm-up
    coarse, full = [], []
    for r in range(repeat):
        coarse.append(timings(lambda i: detect_roi(frames[i], p), n))
        if r % 5 == 4 or (r == repeat - 1 and not full):
            full.append(timings(lambda i: detect_roi(frames[i], p, full_resolution=True), n))
    per_frame = np.stack(coarse)  # (rounds, n): call times by round and frame
    coarse, full = np.concatenate(coarse), np.concatenate(full)
    # the tail, split: what the frames' content costs (each frame's median over its rounds)
    # and the machine's jitter (each call over its own frame's median: same work, same data)
    frame_med = np.median(per_frame, axis=0)
    jitter = (per_frame / frame_med).ravel()
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
    return {"rows": rows, "size": list(size), "bits": bits, "preset": preset, "threads": 1, "N": p.n_corners,
            "full_over_coarse": round(float(np.median(full) / np.median(coarse)), 2),
            "slowest_frame_median_ms": round(float(frame_med.max()) * 1e3, 3),
            "fastest_frame_median_ms": round(float(frame_med.min()) * 1e3, 3),
            "same_frame_p99_over_median": round(float(np.percentile(jitter, 99)), 3),
            "orientation_serial_over_vectorised": round(float(np.median(ser) / np.median(vec)), 1),
            "corners_in_Q": int(len(res.corners))}


@stage("model")
def bench_model(n: int = 20, size: tuple[int, int] = (1024, 1024), bits: int = 16, threads: int = 2,
                model_path: str | None = None, providers: str = "cpu", preset: str = "normal", **_) -> dict:
    """Stage 2: the shipped ONNX model under ONNX Runtime on CPU with ``threads`` intra-op
    threads (``providers="cpu"``), or as the config runs it: providers, IO binding, FP16,
    fixed shape (``providers="config"``: the GPU path on a machine with one; the result says
    which provider ran), on real phantom crops: per fixed 256 px tile at batch 1 and batch
    8, per frame's crops fitted to its ROI (the default ``CropPlan``), and the whole
    ``detect_tips`` per frame (crops, sampling, normalisation, inference, decoding) with
    fitted crops and with fixed tiles, in one run."""
    import cv2

    from .config import load_config
    from .keypoints import CropPlan, crops_for_roi, detect_tips
    from .model import KeypointModel
    from .phantom import make_phantom
    from .roi import detect_roi

    cv2.setNumThreads(1)
    cfg = load_config(None).model
    path = model_path or str(cfg.resolved_path())
    if providers == "config":
        m = KeypointModel.from_config(cfg.model_copy(update={"path": path, "sha256": None if model_path else cfg.sha256}),
                                      threads=threads)
    elif providers == "cpu":
        m = KeypointModel(path, None if model_path else cfg.sha256, providers=("CPUExecutionProvider",),
                          threads=threads)
    else:
        raise ValueError(f"providers must be 'cpu' or 'config', got {providers!r}")
    frames = [make_phantom(np.random.SeedSequence([27182, i]), preset, size, bits).image for i in range(n)]
    rois = [detect_roi(f) for f in frames]
    pairs = [(f, r) for f, r in zip(frames, rois) if r.ok]
    plan = CropPlan.from_config(cfg).for_model(m)
    fixed = CropPlan(cfg.tile_overlap_px, None)
    tiled = [crops_for_roi(f, r, m.codec, fixed) for f, r in pairs]  # (tiles, x) per frame
    fitted = [crops_for_roi(f, r, m.codec, plan) for f, r in pairs]
    xs = np.concatenate([x for _, x in tiled])
    reps = max(1, 192 // len(xs))
    xs = np.concatenate([xs] * reps) if reps > 1 else xs
    b1 = timings(lambda k: m(xs[k % len(xs)][None]), min(len(xs), 64), warmup=3)
    nb = max(1, min(len(xs) // 8, 24))
    b8 = timings(lambda k: m(xs[8 * k:8 * k + 8]), nb, warmup=1) / 8
    fit = timings(lambda k: m(fitted[k % len(fitted)][1]), 2 * len(fitted), warmup=2)
    til = timings(lambda k: m(tiled[k % len(tiled)][1]), 2 * len(tiled), warmup=1)

    def tips(k: int, p: CropPlan):
        return detect_tips(*pairs[k % len(pairs)], m, cfg.threshold, p, cfg.max_batch, cfg.min_distance_px,
                           cfg.low_threshold)

    per_frame = timings(lambda k: tips(k, plan), len(pairs), warmup=1)
    per_frame_tiles = timings(lambda k: tips(k, fixed), len(pairs), warmup=1)
    area = lambda crops: float(np.mean([x.shape[0] * x.shape[2] * x.shape[3] for _, x in crops]))  # noqa: E731
    w, h = m.codec.input_size
    crops = "fitted crop(s)" if plan.max_size else "default crops (fixed_shape: tiles)"
    return {"rows": {f"per {w}x{h} tile, batch 1": summary(b1), f"per {w}x{h} tile, batch 8": summary(b8),
                     f"per frame, model on its {crops}": summary(fit),
                     "per frame, model on its fixed tiles": summary(til),
                     f"per frame, detect_tips, {crops}": summary(per_frame),
                     "per frame, detect_tips, fixed tiles": summary(per_frame_tiles)},
            "threads": threads, "provider": m.provider, "io_binding": m.io_binding, "fp16": m.fp16,
            "fixed_shape": m.fixed_shape, "dynamic_size": m.dynamic_size,
            "tiles_per_frame": round(float(np.mean([len(t) for t, _ in tiled])), 2),
            "fitted_crops_per_frame": round(float(np.mean([len(t) for t, _ in fitted])), 2),
            "fitted_over_tiled_pixels": round(area(fitted) / area(tiled), 3),
            "tiles_over_fitted_time": round(float(np.median(til) / np.median(fit)), 2),
            "model_sha256": m.sha256[:12], "size": list(size), "bits": bits, "preset": preset}


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB (Linux /proc)."""
    cur = peak = float("nan")
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    except OSError:
        pass
    return round(cur, 1), round(peak, 1)


def _serial_daemon(cfg, model, pull, pub, n: int) -> None:
    """The serial baseline: one thread receives a frame on ``pull``, runs ``judge_frame``
    (the same stages) and publishes the same verdict message as the App on ``pub``, one
    frame at a time, ``n`` frames; then closes both sockets (handed over by the thread that
    opened them).  It has no cell aggregation, journal or metrics."""
    from .app import VERDICT_TOPIC, _json, frame_message, header_fields, judged_fields, timing_fields
    from .pipeline import JudgeSettings, judge_frame
    from .protocol import decode_frame

    s = JudgeSettings.from_config(cfg)
    try:
        for _ in range(n):
            while not pull.poll(100):  # status messages until a frame comes, like the App's
                pub.send_multipart([b"status", b"{}"])
            t = time.monotonic()
            received_ns = time.time_ns()
            f = decode_frame(pull.recv_multipart(copy=False))
            hd = f.header
            res = judge_frame(f.image, hd.pixel_pitch_um, model, s)
            v = frame_message({"received_ns": received_ns, **header_fields(hd)}, res.verdict.verdict,
                              res.verdict.reasons, judged_fields(res), cfg.recipe.name, model.sha256)
            v.update(timing_fields(time.monotonic() - t, res.times))
            pub.send_multipart([VERDICT_TOPIC + b".frame/" + str(hd.scanner_id).encode(), _json(v)])
    finally:
        pull.close(0)
        pub.close(0)


def _load_process(conn, ingest: str, out: str, pool, frames: int, rate: float) -> None:
    """The bench's load generator (a child process): subscribe to the verdicts, push
    ``frames`` frames of ``pool`` at ``rate`` (0 = unpaced, back-pressure), wait for their
    verdicts; report over ``conn``: "go" when the feed starts, then the results."""
    import zmq

    from .demo import Subscriber, wait_subscribed
    from .feed import Feed

    ctx = zmq.Context()
    sub = Subscriber(ctx, out)
    feed = None
    try:
        wait_subscribed(sub)
        feed = Feed(ctx, "connect:" + ingest, pool, socket="push", rate_hz=rate)
        conn.send("go")
        t0 = time.perf_counter()
        feed.run(frames)
        while len(sub.frames) < frames and time.perf_counter() - t0 < 600:
            time.sleep(0.005)
        wall = time.perf_counter() - t0
        conn.send({"frames": len(sub.frames), "wall_s": wall,
                   "e2e_ms": [(v["_recv_ns"] - v["ts_ns"]) / 1e6 for v in sub.frames],
                   "codes": [r["code"] for v in sub.frames for r in v["reasons"]]})
    finally:
        if feed is not None:
            feed.close()
        sub.close()
        ctx.term()
        conn.close()


def core_scaling(model, seconds: float = 1.5) -> float:
    """How much the machine's second core adds right now: model calls per second (1 x 256 px
    crop, ONNX Runtime on 1 intra-op thread, which releases the GIL) from two threads at
    once over one thread alone.  2.0 = two full cores; a shared or busy host gives less.
    The pipelined/serial ratio cannot exceed what the machine's cores give, so the bench
    reports this beside it."""
    import threading

    w, h = model.codec.input_size
    x = np.zeros((1, 1, h, w), np.float32)

    def rate(k: int) -> float:
        counts = [0] * k
        stop = time.perf_counter() + seconds

        def spin(j: int) -> None:
            while time.perf_counter() < stop:
                model(x)
                counts[j] += 1

        threads = [threading.Thread(target=spin, args=(j,)) for j in range(k)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts) / seconds

    return rate(2) / max(rate(1), 1e-9)


def _run_load(ingest: str, out: str, pool, frames: int, rate: float) -> dict:
    """Run ``_load_process`` against a daemon in this process; adds ``daemon_cpu_s``, this
    process's CPU time from the feed's start to the last verdict."""
    import multiprocessing as mp

    mpc = mp.get_context("spawn")  # this process has ONNX Runtime and stage threads: no fork
    here, there = mpc.Pipe()
    proc = mpc.Process(target=_load_process, args=(there, ingest, out, pool, frames, rate), daemon=True)
    proc.start()
    try:
        if not here.poll(120) or here.recv() != "go":
            raise RuntimeError("bench load generator did not start")
        c0 = time.process_time()
        if not here.poll(900):
            raise RuntimeError("bench load generator did not finish")
        res = here.recv()
        res["daemon_cpu_s"] = time.process_time() - c0
        return res
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()


@stage("pipeline")
def bench_pipeline(n: int = 20, size: tuple[int, int] = (1024, 1024), bits: int = 16, frames: int = 200,
                   pool_cells: int = 6, preset: str = "normal", rate_fraction: float = 0.7, rounds: int = 3,
                   malloc: str = "tuned", **_) -> dict:
    """Feed -> verdict on ``frames`` frames of ``size`` ``bits``-bit phantoms over loopback
    ZeroMQ, all variants in one run:

    - serial baselines: one thread receives a frame, runs ``judge_frame`` (the same stages)
      and publishes its verdict, frame after frame, with OpenCV on 1 thread; with ONNX
      Runtime on 1 intra-op thread (truly serial) and, on the CPU provider, on 2 (the
      model alone spreads over the cores);
    - the App (pipelined) with the configured settings, with roi_corners in processes, and
      with its journal and NG archive on.
    Unpaced runs use back-pressure (no overload verdicts) and give the throughput: frames /
    (last verdict received - first frame sent).  The paced run feeds the App at
    ``rate_fraction`` of its throughput and gives the latency: verdict received - frame
    sent (the header's ``ts_ns``), p50/p99.  The feed and the verdict subscriber run in a
    child process (``_load_process``), so CPU per frame is the daemon process's alone;
    RSS is this process's (the feed's pool of ``pool_cells`` x 4 frames, kept here to hand
    to the child, included).

    The machine's speed drifts within minutes, so the truly serial baseline and the
    unpaced App run ``rounds`` times, alternating; their rows are the median-throughput
    run of each, and the ratio is of the medians (every run's throughput is listed).
    Before each round, ``core_scaling`` measures what the second core adds at that moment."""
    import tempfile
    import threading

    import cv2
    import zmq

    from .app import App
    from .config import load_config
    from .feed import render_pool
    from .model import KeypointModel
    from .protocol import open_socket

    cv_threads = cv2.getNumThreads()
    base = load_config(None)
    m = base.model
    models = {1: KeypointModel.from_config(m, threads=1)}
    on_cpu = models[1].provider == "CPUExecutionProvider"
    if on_cpu:  # ORT's intra-op threads are a CPU setting: on a GPU one session serves all
        models[2] = KeypointModel.from_config(m, threads=2)
    # the App runs the session as configured (model.threads)
    app_model = (models.get(m.threads) or KeypointModel.from_config(m)) if on_cpu else models[1]
    for mod in {*models.values(), app_model}:  # each session once
        mod.warm_up(m.max_batch, 2)
    # what the second core adds is a property of the machine's cores: measured on CPU
    # whatever provider the config runs
    cpu_model = models[1] if on_cpu else KeypointModel(m.resolved_path(), m.sha256, ("CPUExecutionProvider",), 1)
    pool = render_pool(pool_cells, preset, size, bits, 31415)

    def cfg_for(journal: bool = False, executor: str = "thread"):
        return base.model_copy(update={
            "ingest": base.ingest.model_copy(update={"endpoint": "bind:tcp://127.0.0.1:*"}),
            "output": base.output.model_copy(update={"endpoint": "bind:tcp://127.0.0.1:*"}),
            "metrics": base.metrics.model_copy(update={"enabled": False}),
            "journal": base.journal.model_copy(update={"enabled": journal}),
            "archive": base.archive.model_copy(update={"enabled": journal}),
            "pipeline": base.pipeline.model_copy(update={"admit_timeout_ms": 600_000.0, "deadline_ms": 600_000.0,
                                                         "executor": executor,
                                                         "malloc_tuning": malloc == "tuned"})})

    def run(rate: float, serial_threads: int = 0, **app_kw) -> dict:
        ctx = zmq.Context()
        app = thread = None
        tmp = tempfile.TemporaryDirectory(prefix="polecheck-bench-")
        cfg = cfg_for(**app_kw)
        try:
            if serial_threads:
                cv2.setNumThreads(1)  # truly serial: no OpenCV worker threads either (restored below)
                pull = open_socket(ctx, zmq.PULL, "bind:tcp://127.0.0.1:*", hwm=cfg.ingest.hwm)
                pub = open_socket(ctx, zmq.PUB, "bind:tcp://127.0.0.1:*")
                ingest, out = (sk.getsockopt(zmq.LAST_ENDPOINT).decode() for sk in (pull, pub))
                thread = threading.Thread(target=_serial_daemon, daemon=True,
                                          args=(cfg, models[serial_threads], pull, pub, frames))
                thread.start()
            else:
                app = App(cfg, model=app_model, state_dir=tmp.name).start()
                ingest, out = app.endpoints["ingest"], app.endpoints["output"]
            # the feed and the verdict subscriber run in their own process, as the scanner
            # and the PLC bridge would: they share the 2 cores, not this interpreter's GIL
            res = _run_load(ingest, out, pool, frames, rate)
            wall, cpu, e2e, codes = res["wall_s"], res["daemon_cpu_s"], np.array(res["e2e_ms"]), res["codes"]
            cur, peak = _rss_mb()
            return {"frames": res["frames"], "wall_s": round(wall, 2),
                    "frames_per_s": round(res["frames"] / wall, 2),
                    "cpu_ms_per_frame": round(cpu / max(1, res["frames"]) * 1e3, 1),
                    "latency_p50_ms": round(float(np.percentile(e2e, 50)), 1),
                    "latency_p99_ms": round(float(np.percentile(e2e, 99)), 1),
                    "overload": codes.count("overload"), "rss_mb": cur, "peak_rss_mb": peak}
        finally:
            if app is not None:
                app.stop(30.0)
            if thread is not None:
                thread.join(30.0)
            cv2.setNumThreads(cv_threads)
            ctx.term()
            tmp.cleanup()

    serial, piped, scaling = [], [], []
    for _ in range(max(1, rounds)):
        scaling.append(round(core_scaling(cpu_model), 2))
        serial.append(run(0.0, serial_threads=1))
        piped.append(run(0.0))

    def median_run(runs: list[dict]) -> dict:
        return sorted(runs, key=lambda r: r["frames_per_s"])[len(runs) // 2]

    rows = {"serial, ORT 1 thread, unpaced": median_run(serial)}
    if on_cpu:
        rows["serial, ORT 2 threads, unpaced"] = run(0.0, serial_threads=2)
    rows["pipelined App, unpaced"] = median_run(piped)
    rate = round(rate_fraction * rows["pipelined App, unpaced"]["frames_per_s"], 1)
    rows[f"pipelined App, paced {rate}/s"] = run(rate)
    rows["pipelined App, roi_corners in processes, unpaced"] = run(0.0, executor="process")
    rows["pipelined App + journal + NG archive, unpaced"] = run(0.0, journal=True)
    fps = {k: v["frames_per_s"] for k, v in rows.items()}
    return {"rows": rows,
            "pipelined_over_serial_1t": round(fps["pipelined App, unpaced"] / fps["serial, ORT 1 thread, unpaced"], 2),
            "pipelined_over_serial_2t": round(fps["pipelined App, unpaced"] / fps["serial, ORT 2 threads, unpaced"], 2)
            if on_cpu else None,
            "serial_1t_runs_fps": [r["frames_per_s"] for r in serial],
            "pipelined_runs_fps": [r["frames_per_s"] for r in piped],
            "pipelined_over_serial_1t_per_round": [round(a["frames_per_s"] / b["frames_per_s"], 2)
                                                   for a, b in zip(piped, serial)],
            "core_scaling_per_round": scaling,
            "size": list(size), "bits": bits, "preset": preset, "provider": models[1].provider,
            "fixed_shape": models[1].fixed_shape,
            "ort_threads": m.threads, "model_workers": base.pipeline.model_workers,
            "roi_workers": base.pipeline.roi_workers, "max_batch": m.max_batch,
            "batch_wait_ms": base.pipeline.batch_wait_ms}
