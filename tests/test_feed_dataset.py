"""Scanner feed over real sockets, and the labelled dataset folder format."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import zmq

from daemon import phantom
from daemon.dataset import iter_dataset, read_sample, write_sample
from daemon.feed import Feed, render_pool
from daemon.protocol import FrameLimits, open_socket, recv_frame


def test_feed_sends_whole_cells_with_truth(ctx):
    pool = render_pool(2, "normal", (256, 256), 16, seed=5, jobs=1)
    pull = open_socket(ctx, zmq.PULL, "bind:tcp://127.0.0.1:*", FrameLimits())
    feed = Feed(ctx, f"connect:{pull.getsockopt(zmq.LAST_ENDPOINT).decode()}", pool, rate_hz=0)
    try:
        feed.run(n_frames=12)
        frames = [recv_frame(pull, timeout_ms=5000) for _ in range(12)]
    finally:
        feed.close()
        pull.close(0)
    assert feed.sent == 12
    assert [f.header.seq for f in frames] == list(range(12))
    assert [f.header.corner for f in frames] == [0, 1, 2, 3] * 3
    assert len({f.header.cell_id for f in frames}) == 3
    directions = [f.header.truth["tip_direction"] for f in frames[:4]]
    assert directions == list(phantom.DIRECTIONS)
    # the pool is cycled: cell 2 repeats cell 0's pixels under a new cell id
    assert np.array_equal(frames[8].image, frames[0].image)
    # a cell's four corners share the layer count and pixel pitch
    counts = {len(f.header.truth["anode"]) for f in frames[:4]}
    pitches = {f.header.pixel_pitch_um for f in frames[:4]}
    assert len(counts) == 1 and len(pitches) == 1


def test_pool_is_deterministic_whatever_the_jobs():
    a = render_pool(2, "hard", (192, 192), 8, seed=1, jobs=1)
    b = render_pool(2, "hard", (192, 192), 8, seed=1, jobs=2)
    assert all(np.array_equal(x.image, y.image) for ca, cb in zip(a, b) for x, y in zip(ca, cb))


def test_dataset_round_trip(tmp_path):
    for bits in (8, 16):
        ph = phantom.make_phantom(3, "defects", (200, 160), bits)
        write_sample(tmp_path, f"s{bits}", ph.image, ph.labels)
        back = read_sample(tmp_path, f"s{bits}")
        assert back.image.dtype == ph.image.dtype and np.array_equal(back.image, ph.image)
        assert back.labels == json.loads(json.dumps(ph.labels))
        assert back.anode.shape == (len(ph.labels["anode"]), 2)
    assert [s.name for s in iter_dataset(tmp_path)] == ["s16", "s8"]


def test_phantoms_cli_writes_the_dataset_format(tmp_path):
    out = tmp_path / "ds"
    r = subprocess.run([sys.executable, "-m", "daemon.cli", "phantoms", str(out), "--n", "3", "--preset", "defects",
                        "--seed", "9", "--size", "256", "192", "--bits", "8", "--jobs", "1", "--previews", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "images/s" in r.stdout
    samples = list(iter_dataset(out))
    assert len(samples) == 3 and all(s.image.shape == (192, 256) and s.image.dtype == np.uint8 for s in samples)
    lab = samples[0].labels
    assert set(lab) >= {"anode", "cathode", "pixel_pitch_um", "overhang_um", "verdict", "reasons"}
    assert (out / "previews" / f"{samples[0].name}.png").exists()
    # the same seed gives the same files
    again = phantom.make_phantom(np.random.SeedSequence([9, 0]), "defects", (256, 192), 8)
    assert np.array_equal(again.image, samples[0].image)
