"""``polecheck demo``: the built-in synthetic scanner, the daemon and a verdict subscriber in
one process, on loopback ports chosen by the OS.  Verdicts are printed live; at the end a
summary: frames/s, OK/NG, and agreement with the phantoms' truth (which the feed knows and
the daemon never sees: the truth is recorded from the feed's side).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import zmq

class Subscriber:
    """SUB socket on the App's verdict endpoint, collecting verdicts in a thread."""

    def __init__(self, ctx: zmq.Context, endpoint: str, on_verdict=None):
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 1_000_000)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"verdict")
        self.sock.setsockopt(zmq.SUBSCRIBE, b"status")
        self.sock.connect(endpoint)
        self.frames: list[dict] = []
        self.cells: list[dict] = []
        self.alive = threading.Event()  # a status message arrived: the subscription is active
        self.on_verdict = on_verdict
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-subscriber", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            topic, body = self.sock.recv_multipart()
            if topic.startswith(b"status"):
                self.alive.set()
                continue
            v = json.loads(body)
            v["_recv_ns"] = time.time_ns()  # for end-to-end latency (the header's ts_ns is the send time)
            (self.frames if v["type"] == "frame" else self.cells).append(v)
            if self.on_verdict:
                self.on_verdict(v)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self.sock.close(0)


def wait_subscribed(sub: Subscriber, timeout: float = 10.0) -> None:
    """PUB/SUB joins asynchronously, and a PUB socket drops what no subscriber has asked
    for yet: wait until the first status message (the daemon sends one every
    ``output.status_interval_s``) has arrived, which proves the subscription is active."""
    if not sub.alive.wait(timeout):
        raise RuntimeError(f"no status message from the daemon within {timeout:g} s (is it running, is the "
                           "endpoint right?)")


def _line(v: dict, truth: dict) -> str:
    if v["type"] == "cell":
        codes = sorted({r["code"] for r in v["reasons"]})
        return f"  cell {v['cell_id'][-8:]}  {v['verdict']:2s}  {' '.join(codes)}"
    codes = sorted({r["code"] for r in v["reasons"]})
    t = truth.get((v.get("cell_id"), v.get("corner")))
    ov = [x for row in v.get("overhang_um", []) for x in row if x is not None]
    ovs = f"overhang {min(ov):4.0f}-{max(ov):4.0f} um" if ov else " " * 21
    lay = f"{v.get('n_anode', 0):2d}A/{v.get('n_cathode', 0):2d}C" if "n_anode" in v else "      "
    mark = "" if t is None else ("  truth " + t + ("" if t == v["verdict"] else "  <-- differs"))
    return (f"seq {v.get('seq')!s:>5} corner {v.get('corner')!s:>4}  {v['verdict']:2s}  {lay}  {ovs}  "
            f"{v.get('latency_ms', 0):6.1f} ms  {' '.join(codes)}{mark}")


def run_demo(cfg, frames: int = 120, rate_hz: float | None = None, preset: str | None = None,
             state_dir: str = "out/demo", quiet: bool = False, print_fn=print) -> dict:
    """Feed ``frames`` phantom frames (whole cells) through a fresh App; returns the summary."""
    from .app import App
    from .feed import Feed, render_pool

    f = cfg.feed
    preset = preset or f.preset
    rate = f.rate_hz if rate_hz is None else rate_hz
    cfg = cfg.model_copy(update={
        "ingest": cfg.ingest.model_copy(update={"endpoint": "bind:tcp://127.0.0.1:*", "socket": "pull"}),
        "output": cfg.output.model_copy(update={"endpoint": "bind:tcp://127.0.0.1:*"}),
        "metrics": cfg.metrics.model_copy(update={"port": 0}),
    })
    t = time.perf_counter()
    pool = render_pool(f.pool_cells, preset, f.size, f.bits, f.seed)
    print_fn(f"rendered {len(pool)} phantom cells ({preset}, {f.size[0]}x{f.size[1]} {f.bits}-bit) "
             f"in {time.perf_counter() - t:.1f} s")
    app = App(cfg, state_dir=state_dir).start()
    ctx = zmq.Context()
    truth: dict = {}
    stats = Counter()

    def on_verdict(v: dict) -> None:
        if not quiet:
            print_fn(_line(v, truth))

    sub = Subscriber(ctx, app.endpoints["output"], on_verdict)
    feed = None
    try:
        wait_subscribed(sub)
        feed = Feed(ctx, "connect:" + app.endpoints["ingest"], pool, socket="push", rate_hz=rate,
                    scanner_id=f.scanner_id)
        print_fn(f"daemon: model on {app.model.provider}, metrics http://{cfg.metrics.host}:{app.metrics_port}"
                 f"/metrics, NG archive {app.state_dir / 'ng-archive'}")
        print_fn(f"feeding {frames} frames at {rate:g} frames/s ...")
        t0 = time.perf_counter()
        sent = feed.run(frames, on_frame=lambda d: truth.__setitem__((d["cell_id"], d["corner"]), d["truth"]))
        deadline = time.monotonic() + 30.0 + cfg.cells.timeout_ms / 1000.0
        n_cells = sent // cfg.cells.corners
        while (len(sub.frames) < sent or len(sub.cells) < n_cells) and time.monotonic() < deadline:
            time.sleep(0.02)
        wall = time.perf_counter() - t0
    finally:
        if feed is not None:
            feed.close()
        app.stop()
        sub.close()
        ctx.term()
    for v in sub.frames:
        stats[v["verdict"]] += 1
        tv = truth.get((v.get("cell_id"), v.get("corner")))
        if tv is not None:
            stats["agree" if tv == v["verdict"] else ("escape" if tv == "NG" else "overkill")] += 1
    cell_truth: dict = {}
    for (cid, _), tv in truth.items():
        cell_truth[cid] = "NG" if tv == "NG" or cell_truth.get(cid) == "NG" else "OK"
    for v in sub.cells:
        stats["cell_" + v["verdict"]] += 1
        tv = cell_truth.get(v["cell_id"])
        if tv is not None:
            stats["cell_agree" if tv == v["verdict"] else ("cell_escape" if tv == "NG" else "cell_overkill")] += 1
    per_seq = Counter(v.get("seq") for v in sub.frames)
    summary = {
        "frames_sent": sent, "frame_verdicts": len(sub.frames), "cell_verdicts": len(sub.cells),
        "exactly_one_verdict_per_frame": len(per_seq) == sent and all(c == 1 for c in per_seq.values()),
        "wall_s": round(wall, 2), "frames_per_s": round(len(sub.frames) / wall, 2) if wall > 0 else 0.0,
        "OK": stats["OK"], "NG": stats["NG"], "cells_OK": stats["cell_OK"], "cells_NG": stats["cell_NG"],
        "truth_agreement": round(stats["agree"] / max(1, len(sub.frames)), 4),
        "escapes": stats["escape"], "overkill": stats["overkill"],
        "cell_truth_agreement": round(stats["cell_agree"] / max(1, len(sub.cells)), 4),
        "cell_escapes": stats["cell_escape"], "cell_overkill": stats["cell_overkill"],
        "reasons": dict(Counter(r["code"] for v in sub.frames for r in v["reasons"])),
        "provider": app.model.provider,
    }
    print_fn("")
    print_fn(f"summary: {summary['frame_verdicts']}/{sent} frames judged in {summary['wall_s']} s "
             f"({summary['frames_per_s']} frames/s; the feed paced at {rate:g}/s), "
             f"exactly one verdict per frame: {summary['exactly_one_verdict_per_frame']}")
    print_fn(f"  frames: {summary['OK']} OK, {summary['NG']} NG; agreement with the phantoms' truth "
             f"{summary['truth_agreement']:.1%} (escapes {summary['escapes']}, overkill {summary['overkill']})")
    print_fn(f"  cells:  {summary['cells_OK']} OK, {summary['cells_NG']} NG; agreement "
             f"{summary['cell_truth_agreement']:.1%} (escapes {summary['cell_escapes']}, "
             f"overkill {summary['cell_overkill']})")
    if summary["reasons"]:
        print_fn(f"  NG reasons: {summary['reasons']}")
    return summary
