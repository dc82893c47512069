"""Frame protocol: round trip over real sockets, zero copy, every malformed kind by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zmq

from daemon.protocol import (ERROR_KINDS, FrameError, FrameLimits, decode_frame, encode_frame,
                             make_header, open_socket, recv_frame)

RNG = np.random.default_rng(7)


def _frame(dtype=np.uint16, shape=(48, 64), **kw):
    img = RNG.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
    hdr = make_header(img, scanner_id="s1", cell_id="c1", corner=2, seq=41, pixel_pitch_um=18.5,
                      ts_ns=1_700_000_000_000_000_000, **kw)
    return img, hdr


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_round_trip_over_real_sockets(pull_push, dtype):
    pull, push, limits = pull_push
    img, hdr = _frame(dtype, truth={"anode": [[1.5, 2.25]], "cathode": []})
    push.send_multipart(encode_frame(hdr, img), copy=False)
    f = recv_frame(pull, limits, timeout_ms=5000)
    assert f is not None
    assert f.header == hdr
    assert f.topic == b"frame/s1"
    assert f.image.dtype == dtype and f.image.shape == img.shape
    assert np.array_equal(f.image, img)
    assert not f.image.flags.writeable
    # zero copy: the array's memory is the received ZeroMQ frame's buffer
    buf = f.parts[2].buffer
    assert np.shares_memory(f.image, np.frombuffer(buf, dtype=np.uint8))


def test_recv_times_out(pull_push):
    pull, _, limits = pull_push
    assert recv_frame(pull, limits, timeout_ms=50) is None


def test_many_frames_arrive_in_order(pull_push):
    pull, push, limits = pull_push
    img, hdr = _frame(np.uint8, (16, 16))
    for i in range(200):
        push.send_multipart(encode_frame(make_header(img, scanner_id="s", cell_id=f"c{i // 4}", corner=i % 4,
                                                     seq=i, pixel_pitch_um=20), img), copy=False)
    seqs = [recv_frame(pull, limits, timeout_ms=5000).header.seq for _ in range(200)]
    assert seqs == list(range(200))


def _parts(hdr_dict=None, payload=None, topic=b"frame/s1", shape=(4, 6), dtype="uint16"):
    d = {"schema": 1, "scanner_id": "s1", "cell_id": "c", "corner": 0, "seq": 1, "ts_ns": 5,
         "shape": list(shape), "dtype": dtype, "pixel_pitch_um": 20.0}
    if hdr_dict is not None:
        d = hdr_dict(d)
    raw = d if isinstance(d, (bytes, str)) else json.dumps(d)
    raw = raw.encode() if isinstance(raw, str) else raw
    if payload is None:
        payload = bytes(shape[0] * shape[1] * 2)
    return [topic, raw, payload]


def _set(**kv):
    return lambda d: {**d, **kv}


def _drop(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


MALFORMED = {
    "bad_multipart": lambda: _parts()[:2],
    "bad_topic": lambda: _parts(topic=b"image/s1"),
    "header_too_large": lambda: _parts(_set(truth={"pad": "x" * 70000})),
    "bad_header_json": lambda: _parts(lambda d: b"{not json"),
    "bad_header_type": lambda: _parts(lambda d: b"[1, 2]"),
    "unsupported_schema": lambda: _parts(_set(schema=2)),
    "missing_field": lambda: _parts(_drop("cell_id")),
    "unknown_field": lambda: _parts(_set(colour="blue")),
    "bad_field": lambda: _parts(_set(corner=4)),
    "bad_dtype": lambda: _parts(_set(dtype="float32")),
    "bad_shape": lambda: _parts(_set(shape=[4, 6, 1])),
    "frame_too_large": lambda: _parts(_set(shape=[4096, 4096]), payload=b""),
    "size_mismatch": lambda: _parts(payload=bytes(47)),
}


def test_every_error_kind_has_a_case():
    assert set(MALFORMED) == set(ERROR_KINDS)


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_frames_are_rejected_by_name(kind):
    limits = FrameLimits(max_frame_bytes=4 * 1024 * 1024, max_side=8192, max_header_bytes=65536)
    with pytest.raises(FrameError) as ei:
        decode_frame(MALFORMED[kind](), limits)
    assert ei.value.kind == kind
    assert str(ei.value).startswith(kind + ":")


@pytest.mark.parametrize("field,value", [
    ("corner", True), ("corner", -1), ("seq", -1), ("seq", 1.5), ("ts_ns", "now"), ("scanner_id", ""),
    ("cell_id", 7), ("pixel_pitch_um", 0), ("pixel_pitch_um", "20"), ("truth", [1]),
])
def test_bad_field_values_name_the_field(field, value):
    with pytest.raises(FrameError) as ei:
        decode_frame(_parts(_set(**{field: value})))
    assert ei.value.kind == "bad_field" and field in str(ei.value)


@pytest.mark.parametrize("shape", [[0, 5], [5, -1], [5], "4x6", [4.0, 6], [True, 6], [9000, 4]])
def test_bad_shapes(shape):
    with pytest.raises(FrameError) as ei:
        decode_frame(_parts(_set(shape=shape)))
    assert ei.value.kind == "bad_shape"


def test_partial_header_is_kept_for_the_reject_verdict():
    with pytest.raises(FrameError) as ei:
        decode_frame(_parts(payload=bytes(3)))
    assert ei.value.header["cell_id"] == "c" and ei.value.header["seq"] == 1


def test_oversized_message_is_refused_by_the_socket(ctx):
    """ZMQ_MAXMSGSIZE: libzmq drops a part over the limit before allocating it."""
    limits = FrameLimits(max_frame_bytes=1024, max_header_bytes=1024)
    pull = open_socket(ctx, zmq.PULL, "bind:tcp://127.0.0.1:*", limits)
    push = open_socket(ctx, zmq.PUSH, f"connect:{pull.getsockopt(zmq.LAST_ENDPOINT).decode()}")
    try:
        img, hdr = _frame(np.uint8, (64, 64))  # 4096 bytes > 2048
        push.send_multipart(encode_frame(hdr, img), copy=False)
        assert recv_frame(pull, limits, timeout_ms=300) is None
    finally:
        push.close(0)
        pull.close(0)


def test_encode_rejects_mismatched_image():
    img, hdr = _frame(np.uint8, (8, 8))
    with pytest.raises(ValueError):
        encode_frame(hdr, np.zeros((8, 9), np.uint8))
    with pytest.raises(ValueError):
        make_header(np.zeros((8, 8), np.float32), scanner_id="s", cell_id="c", corner=0, seq=0, pixel_pitch_um=1)


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5", "listen:tcp://x:1", "bind:"])
def test_endpoint_must_say_bind_or_connect(ctx, endpoint):
    with pytest.raises(ValueError, match="bind:"):
        open_socket(ctx, zmq.PULL, endpoint)
