"""systemd integration without a dependency: the sd_notify datagram protocol.

``notify("READY=1")`` sends one datagram to the AF_UNIX socket named by ``$NOTIFY_SOCKET``
(a path, or ``@name`` for the abstract namespace); without it (not under systemd) it does
nothing.  ``watchdog_interval()`` is half of ``$WATCHDOG_USEC`` when that is meant for this
process (``$WATCHDOG_PID`` absent or ours), else None.  ``tune_malloc()`` sets glibc's
allocator up for a process that allocates the same arrays for every frame.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket

log = logging.getLogger("polecheck.service")

# glibc <malloc.h> mallopt parameters, and the values tune_malloc sets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # bytes: smaller blocks come from the heap (the most mallopt(3) allows on 64-bit)
TRIM_THRESHOLD = 1 << 30  # bytes of free heap top kept before any is given back to the kernel
_malloc_tuned: bool | None = None


def tune_malloc() -> bool:
    """Keep the per-frame arrays' memory in the process: blocks under 32 MiB from the heap
    (a fixed mmap threshold) and no trimming of the heap's top below 1 GiB.  True when
    glibc took both settings (once per process; later calls return the first answer).

    By default glibc serves blocks over a threshold that adapts to what was freed before
    (128 kB at start) with fresh mmaps, and gives the heap's free top back to the kernel
    past twice that.  Whether a frame's 0.1-2 MB arrays then cost fresh pages depends on the
    process's history: on 1024x1024 frames loaded from one file, stage 1 took 224 page faults
    on every call and ran 1.12-1.19x slower on a pinned Xeon core; the daemon fed by another
    process took 67-103 per frame, 1-4 tuned (docs/benchmarks.md).  Where glibc keeps its
    heap in huge pages (``glibc.malloc.hugetlb=1``) it trims in 2 MiB steps, and stage 1
    faulted only on its first call by default.
    The cost: freed memory under 1 GiB of heap top stays with the process (its RSS is its
    high-water mark), as a long-running service wants anyway.  Other C libraries (musl) or
    platforms: nothing is changed and False is returned."""
    global _malloc_tuned
    if _malloc_tuned is None:
        _malloc_tuned = False
        try:
            libc = ctypes.CDLL("libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError) as e:
            log.info("malloc not tuned (no glibc mallopt: %s)", e)
            return False
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        _malloc_tuned = ok
        if ok:
            log.info("malloc tuned: mmap threshold %d MiB, trim threshold %d MiB", MMAP_THRESHOLD >> 20,
                     TRIM_THRESHOLD >> 20)
        else:
            log.warning("malloc not tuned: glibc refused mallopt")
    return _malloc_tuned


def notify(message: str, environ=None) -> bool:
    """Send ``message`` (e.g. ``READY=1``, ``WATCHDOG=1``, ``STOPPING=1``, ``STATUS=...``);
    True when it was sent."""
    env = os.environ if environ is None else environ
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    elif not addr.startswith("/"):
        log.warning("NOTIFY_SOCKET %r is neither a path nor @abstract: not notifying", addr)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError as e:
        log.warning("sd_notify %s failed: %s", message.split("=")[0], e)
        return False


def watchdog_interval(environ=None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half the configured WatchdogSec), or None."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return max(int(usec) / 2e6, 0.01)
    except ValueError:
        return None


def run_service(cfg, environ=None, stop_event=None) -> int:
    """``polecheck run``: build and start the App, tell systemd READY, ping the watchdog
    while every stage is alive, report STATUS, and on SIGTERM/SIGINT send STOPPING and
    drain (``service.drain_s``).  Returns the exit code (0: drained in time)."""
    import gc
    import signal
    import threading
    import time

    from .app import App

    env = os.environ if environ is None else environ
    stop = stop_event or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    notify("STATUS=loading the model", env)
    app = App(cfg).start()
    # The model, the config and the imported modules live as long as the process: freeze
    # them out of the garbage collector's reach, so that a full collection under load does
    # not hold the GIL for tens of ms (measured on 2 cores: one ~44 ms gen-2 pause per ~600
    # frames at 47 frames/s without this, none with it).
    gc.freeze()
    log.info("gc: %d start-up objects frozen out of collection", gc.get_freeze_count())
    wd = watchdog_interval(env)
    notify(f"READY=1\nSTATUS={app.status()}\nMAINPID={os.getpid()}", env)
    log.info("ready%s", f" (watchdog every {wd:.1f} s)" if wd else "")
    next_status = time.monotonic() + cfg.service.status_interval_s
    tick = min(wd or 1.0, 1.0)
    while not stop.wait(tick):
        if wd is not None:
            if app.healthy(max(2 * wd, 1.0)):
                notify("WATCHDOG=1", env)
            else:
                log.error("a stage is stuck or dead: no watchdog ping (systemd will restart the service)")
        if time.monotonic() >= next_status:
            notify(f"STATUS={app.status()}", env)
            next_status += cfg.service.status_interval_s
    notify(f"STOPPING=1\nSTATUS=draining {app.in_flight} frame(s)", env)
    log.info("stopping: draining %d frame(s), at most %.1f s", app.in_flight, cfg.service.drain_s)
    drained = app.stop()
    return 0 if drained else 1
