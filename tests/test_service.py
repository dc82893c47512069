"""systemd integration: sd_notify datagrams, the watchdog interval, the unit file,
`polecheck run` as systemd runs it (READY, WATCHDOG, SIGTERM -> STOPPING + drain), and the
process's allocator setting (``tune_malloc``)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zmq

from daemon.feed import render_pool
from daemon.phantom import make_phantom
from daemon.protocol import encode_frame, make_header
from daemon.service import notify, watchdog_interval

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "polecheck.service"


@pytest.fixture
def notify_socket(tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    s.bind(path)
    s.settimeout(0.2)
    yield s, path
    s.close()


# Stage 1 on frames that arrive in one received buffer, in a process with no history of
# large frees (what sets glibc's adaptive mmap threshold): page faults per call.
_FAULTS = """
import json, resource, sys
if sys.argv[2] == "tuned":
    from daemon.service import tune_malloc
    assert tune_malloc()
import numpy as np, cv2
from daemon.roi import detect_roi
cv2.setNumThreads(1)
frames = list(np.load(sys.argv[1]))
for f in frames:
    detect_roi(f)
out = []
for r in range(8):
    for f in frames:
        a = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        assert detect_roi(f).ok
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - a)
print(json.dumps(out))
"""

# glibc's trimming itself, with a known history: one 4 MiB block freed (glibc's default
# then serves blocks up to 4 MiB from the heap and trims its free top past 8 MiB), then
# rounds that take 12 MiB from the heap's top and free it.  Page faults per round.
_TRIM = """
import json, resource, sys
if sys.argv[1] == "tuned":
    from daemon.service import tune_malloc
    assert tune_malloc()
import numpy as np
MB = 1 << 20
x = np.ones(4 * MB, np.uint8)
del x
out = []
for r in range(6):
    a = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    bufs = [np.ones(3 * MB, np.uint8) for _ in range(4)]
    del bufs
    out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - a)
print(json.dumps(out))
"""


def _faults(script: str, *args: str) -> np.ndarray:
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    return np.array(json.loads(r.stdout))


def _malloc_setting() -> dict:
    """What decides glibc's trimming and page size on this machine, for failure messages."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return {"thp": thp.read_text().strip() if thp.exists() else None, "libc": platform.libc_ver(),
            **{k: v for k, v in os.environ.items() if k.startswith(("GLIBC_TUNABLES", "MALLOC_", "LD_PRELOAD"))}}


_GLIBC = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                            reason="mallopt is glibc's; elsewhere tune_malloc changes nothing (and says so)")


@_GLIBC
def test_tuned_malloc_stops_the_heap_being_given_back():
    """What ``tune_malloc`` changes, on a history that shows it on any glibc: by default
    the freed 12 MiB are trimmed off the heap and faulted in again every round (2272 faults
    a round with 4 KiB pages; 5 with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, where the
    heap is in 2 MiB huge pages); tuned, the heap keeps them: no faults after round 1."""
    default, tuned = _faults(_TRIM, "default"), _faults(_TRIM, "tuned")
    assert (default[1:] > 0).all(), (default, _malloc_setting())
    assert (tuned[1:] == 0).all(), (tuned, _malloc_setting())


@_GLIBC
def test_tuned_malloc_keeps_stage_one_off_fresh_pages(tmp_path):
    """Stage 1 on 1024x1024 16-bit frames, tuned (the daemon's ``pipeline.malloc_tuning``):
    no page faults after the first calls, and never more than with glibc's default.
    How many the default takes depends on the machine: 224 on every call with 4 KiB heap
    pages (glibc 2.36 and 2.39, measured), 1 then 0 where glibc keeps its heap in huge
    pages and trims in 2 MiB steps (``glibc.malloc.hugetlb=1``; a CI machine showed the
    same), so the default's count is reported, not asserted."""
    path = tmp_path / "frames.npy"
    np.save(path, np.stack([make_phantom(np.random.SeedSequence([5150, i]), "normal", (1024, 1024), 16).image
                            for i in range(3)]))
    default, tuned = _faults(_FAULTS, str(path), "default"), _faults(_FAULTS, str(path), "tuned")
    assert np.median(tuned) == 0 and tuned.sum() <= max(2, 0.05 * default.sum()), (tuned, default, _malloc_setting())
    assert tuned.sum() <= default.sum(), (tuned, default, _malloc_setting())


def _messages(sock, until: str, timeout: float) -> list[str]:
    """Datagrams received until one contains ``until`` (or the timeout)."""
    out = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            msg = sock.recv(4096).decode()
        except socket.timeout:
            continue
        out.append(msg)
        if until in msg:
            break
    return out


def test_notify_path_and_abstract_socket(notify_socket):
    s, path = notify_socket
    assert notify("READY=1", {"NOTIFY_SOCKET": path})
    assert s.recv(100) == b"READY=1"
    a = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"polecheck-test-{os.getpid()}"
    a.bind("\0" + name)
    try:
        assert notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name})
        assert a.recv(100) == b"WATCHDOG=1"
    finally:
        a.close()
    assert not notify("READY=1", {})  # not under systemd: nothing to do


def test_watchdog_interval():
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # meant for another process
    assert watchdog_interval({}) is None


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_file_verifies(tmp_path):
    """``systemd-analyze verify`` on the shipped unit, with ExecStart pointed at this
    environment's console script (verify checks that the binary exists).  Verify exits 0 on
    settings it ignores, so its messages about the unit must be empty too."""
    exe = Path(sys.executable).parent / "polecheck"
    assert exe.exists(), "the console script is installed with the package"
    text = UNIT.read_text()
    assert "Type=notify" in text and "WatchdogSec=" in text and "Restart=on-failure" in text
    unit = tmp_path / "polecheck.service"
    unit.write_text(text.replace("/opt/polecheck/.venv/bin/polecheck", str(exe))
                    .replace("WorkingDirectory=/opt/polecheck", f"WorkingDirectory={ROOT}"))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    messages = [ln for ln in (r.stdout + r.stderr).splitlines() if "polecheck.service" in ln]
    assert r.returncode == 0 and not messages, r.stdout + r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return ""


def test_run_under_systemd_protocol(notify_socket, tmp_path):
    """`polecheck run` as a Type=notify service: READY after start-up, WATCHDOG pings,
    STATUS lines; SIGTERM sends STOPPING and drains: every frame it received gets its
    verdict, and it exits 0."""
    sock, path = notify_socket
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    in_port = push.bind_to_random_port("tcp://127.0.0.1")
    out_port, metrics_port = _free_port(), _free_port()
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000",
           "POLECHECK_INGEST__ENDPOINT": f"connect:tcp://127.0.0.1:{in_port}",
           "POLECHECK_OUTPUT__ENDPOINT": f"bind:tcp://127.0.0.1:{out_port}",
           "POLECHECK_METRICS__PORT": str(metrics_port), "POLECHECK_SERVICE__STATE_DIR": str(tmp_path / "state"),
           "POLECHECK_MODEL__PROVIDERS": "[CPUExecutionProvider]", "POLECHECK_SERVICE__STATUS_INTERVAL_S": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"verdict.frame")
    try:
        got = _messages(sock, "READY=1", 120)
        assert any("READY=1" in m for m in got), got
        got = _messages(sock, "WATCHDOG=1", 3)
        assert any("WATCHDOG=1" in m for m in got), got
        assert any(m.startswith("STATUS=") for m in _messages(sock, "STATUS=", 3))
        sub.connect(f"tcp://127.0.0.1:{out_port}")
        time.sleep(0.5)  # the subscription reaches the PUB socket
        cell = render_pool(2, "normal", (256, 256), 16, seed=99, jobs=1)
        for seq in range(8):
            f = cell[seq // 4][seq % 4]
            h = make_header(f.image, scanner_id="s", cell_id=f"c{seq // 4}", corner=f.corner, seq=seq,
                            pixel_pitch_um=f.pixel_pitch_um)
            push.send_multipart(encode_frame(h, f.image), copy=False)
        end = time.monotonic() + 30
        while "polecheck_frames_received_total 8.0" not in _scrape(metrics_port) and time.monotonic() < end:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # frames are still in flight
        got = _messages(sock, "STOPPING=1", 20)
        assert any("STOPPING=1" in m for m in got), got
        assert proc.wait(30) == 0
        seqs = []
        while sub.poll(500):
            seqs.append(json.loads(sub.recv_multipart()[1])["seq"])
        assert sorted(seqs) == list(range(8))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out = proc.stdout.read().decode(errors="replace")
        proc.stdout.close()
        push.close(0)
        sub.close(0)
        ctx.term()
    assert "drained" in out, out[-2000:]
    assert "start-up objects frozen out of collection" in out, out[-2000:]
