"""Frame wire protocol: ZeroMQ multipart ``[topic, header JSON, raw pixel buffer]``.

See docs/protocol.md.  The decoder validates every header field, checks the declared size
against the limits *before* touching the pixel buffer, checks that the buffer matches, and
returns the image as a zero-copy, read-only numpy view of the received buffer.  No pickle.

Note:
    H, W: image height and width; ``shape`` on the wire is ``[H, W]`` (numpy order).
    Pixels are little-endian; ``dtype`` is ``"uint8"`` or ``"uint16"``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import zmq

SCHEMA_VERSION = 1
TOPIC_PREFIX = b"frame"
DTYPES = {"uint8": np.dtype("u1"), "uint16": np.dtype("<u2")}

#: every kind of bad frame, by name (``FrameError.kind``)
ERROR_KINDS = (
    "bad_multipart",  # not exactly 3 parts
    "bad_topic",  # topic does not start with b"frame"
    "header_too_large",  # header part over the limit
    "bad_header_json",  # not UTF-8 JSON
    "bad_header_type",  # JSON but not an object
    "unsupported_schema",  # schema version not understood
    "missing_field",  # a required header field is absent
    "unknown_field",  # a header field this schema does not define
    "bad_field",  # a field of the wrong type or out of range
    "bad_dtype",  # dtype not uint8/uint16
    "bad_shape",  # shape not [H, W] of positive ints within max_side
    "frame_too_large",  # H * W * itemsize over max_frame_bytes (checked before the buffer)
    "size_mismatch",  # buffer length differs from H * W * itemsize
)


class FrameError(ValueError):
    """A frame that cannot be decoded.  ``kind`` is one of ``ERROR_KINDS``; ``header`` holds
    whatever parsed of the header (for the verdict that rejects the frame)."""

    def __init__(self, kind: str, message: str, header: dict | None = None):
        assert kind in ERROR_KINDS, kind
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.header = header or {}


@dataclass(frozen=True)
class FrameLimits:
    """Decoder limits; the socket's ZMQ_MAXMSGSIZE is set from them as well."""

    max_frame_bytes: int = 64 * 1024 * 1024
    max_side: int = 8192
    max_header_bytes: int = 64 * 1024


@dataclass(frozen=True)
class FrameHeader:
    scanner_id: str
    cell_id: str
    corner: int  # 0..3
    seq: int  # per-scanner frame counter, +1 per frame
    ts_ns: int  # acquisition time, ns since the Unix epoch
    shape: tuple[int, int]  # (H, W)
    dtype: str  # "uint8" | "uint16"
    pixel_pitch_um: float
    truth: dict | None = None  # phantom labels: demo scoring and eval only, never decisions
    schema: int = SCHEMA_VERSION

    def to_json(self) -> bytes:
        d = {
            "schema": self.schema,
            "scanner_id": self.scanner_id,
            "cell_id": self.cell_id,
            "corner": self.corner,
            "seq": self.seq,
            "ts_ns": self.ts_ns,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "pixel_pitch_um": self.pixel_pitch_um,
        }
        if self.truth is not None:
            d["truth"] = self.truth
        return json.dumps(d, separators=(",", ":"), allow_nan=False).encode()


@dataclass
class Frame:
    """A decoded frame.  ``image`` is ``(H, W)`` uint8/uint16, a read-only view of the
    received buffer; ``parts`` keeps the receive buffers alive while the view is in use."""

    topic: bytes
    header: FrameHeader
    image: np.ndarray
    parts: Sequence[Any] = field(default=(), repr=False)


# --------------------------------------------------------------------------- encode
def make_header(image: np.ndarray, *, scanner_id: str, cell_id: str, corner: int, seq: int,
                pixel_pitch_um: float, ts_ns: int | None = None, truth: dict | None = None) -> FrameHeader:
    """Header describing ``image`` ``(H, W)`` uint8/uint16."""
    dtype = {np.dtype("u1"): "uint8", np.dtype("u2"): "uint16"}.get(image.dtype)
    if dtype is None or image.ndim != 2:
        raise ValueError(f"image must be (H, W) uint8 or uint16, got {image.shape} {image.dtype}")
    return FrameHeader(scanner_id, cell_id, int(corner), int(seq),
                       time.time_ns() if ts_ns is None else int(ts_ns),
                       (int(image.shape[0]), int(image.shape[1])), dtype, float(pixel_pitch_um), truth)


def encode_frame(header: FrameHeader, image: np.ndarray, topic: bytes | None = None) -> list:
    """Multipart message for ``send_multipart(..., copy=False)``; the pixel part is a
    memoryview of ``image`` (little-endian, C-contiguous) when possible, so no copy is made."""
    if tuple(image.shape) != tuple(header.shape):
        raise ValueError(f"header shape {header.shape} != image shape {image.shape}")
    want = DTYPES[header.dtype]
    img = np.ascontiguousarray(image, dtype=want)
    return [topic or TOPIC_PREFIX + b"/" + header.scanner_id.encode(), header.to_json(), memoryview(img).cast("B")]


# --------------------------------------------------------------------------- decode
_STR_FIELDS = ("scanner_id", "cell_id")
_REQUIRED = ("schema", "scanner_id", "cell_id", "corner", "seq", "ts_ns", "shape", "dtype", "pixel_pitch_um")
_KNOWN = set(_REQUIRED) | {"truth"}


def _buffer(part: Any) -> memoryview:
    buf = part.buffer if isinstance(part, zmq.Frame) else memoryview(part)
    return buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def decode_header(raw: Any, limits: FrameLimits = FrameLimits()) -> FrameHeader:
    """Validate the header part; raises ``FrameError`` naming the kind of problem."""
    buf = _buffer(raw)
    if buf.nbytes > limits.max_header_bytes:
        raise FrameError("header_too_large", f"{buf.nbytes} bytes > {limits.max_header_bytes}")
    try:
        d = json.loads(bytes(buf).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FrameError("bad_header_json", str(e)) from None
    if not isinstance(d, dict):
        raise FrameError("bad_header_type", f"header must be a JSON object, got {type(d).__name__}")
    if d.get("schema") != SCHEMA_VERSION:
        raise FrameError("unsupported_schema", f"schema {d.get('schema')!r}, this decoder reads {SCHEMA_VERSION}", d)
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise FrameError("missing_field", f"missing {', '.join(missing)}", d)
    unknown = sorted(set(d) - _KNOWN)
    if unknown:
        raise FrameError("unknown_field", f"unknown {', '.join(unknown)}", d)

    def bad(name: str, why: str) -> FrameError:
        return FrameError("bad_field", f"{name}: {why} (got {d[name]!r:.80})", d)

    for name in _STR_FIELDS:
        if not isinstance(d[name], str) or not 0 < len(d[name]) <= 128:
            raise bad(name, "must be a string of 1..128 characters")
    if not _is_int(d["corner"]) or not 0 <= d["corner"] <= 3:
        raise bad("corner", "must be an integer 0..3")
    for name in ("seq", "ts_ns"):
        if not _is_int(d[name]) or not 0 <= d[name] < 2**63:
            raise bad(name, "must be a non-negative 64-bit integer")
    pp = d["pixel_pitch_um"]
    if not isinstance(pp, (int, float)) or isinstance(pp, bool) or not math.isfinite(pp) or not 0 < pp <= 10000:
        raise bad("pixel_pitch_um", "must be a number in (0, 10000]")
    if d.get("truth") is not None and not isinstance(d["truth"], dict):
        raise bad("truth", "must be an object or null")
    if d["dtype"] not in DTYPES:
        raise FrameError("bad_dtype", f"dtype {d['dtype']!r:.40} not in {sorted(DTYPES)}", d)
    shape = d["shape"]
    if (not isinstance(shape, list) or len(shape) != 2 or not all(_is_int(s) for s in shape)
            or not all(1 <= s <= limits.max_side for s in shape)):
        raise FrameError("bad_shape", f"shape must be [H, W] with 1 <= H, W <= {limits.max_side}, got {shape!r:.80}", d)
    nbytes = shape[0] * shape[1] * DTYPES[d["dtype"]].itemsize
    if nbytes > limits.max_frame_bytes:
        raise FrameError("frame_too_large", f"{nbytes} bytes > {limits.max_frame_bytes}", d)
    return FrameHeader(d["scanner_id"], d["cell_id"], d["corner"], d["seq"], d["ts_ns"],
                       (shape[0], shape[1]), d["dtype"], float(pp), d.get("truth"), d["schema"])


def decode_frame(parts: Sequence[Any], limits: FrameLimits = FrameLimits()) -> Frame:
    """``[topic, header, pixels]`` (bytes or ``zmq.Frame``) -> ``Frame`` with a zero-copy image."""
    if len(parts) != 3:
        raise FrameError("bad_multipart", f"expected 3 parts [topic, header, pixels], got {len(parts)}")
    topic = bytes(_buffer(parts[0]))
    if not topic.startswith(TOPIC_PREFIX):
        raise FrameError("bad_topic", f"topic {topic[:40]!r} does not start with {TOPIC_PREFIX!r}")
    header = decode_header(parts[1], limits)
    buf = _buffer(parts[2])
    h, w = header.shape
    dt = DTYPES[header.dtype]
    if buf.nbytes != h * w * dt.itemsize:
        raise FrameError("size_mismatch", f"buffer has {buf.nbytes} bytes, header says {h}x{w} {header.dtype} "
                         f"= {h * w * dt.itemsize}", dataclasses.asdict(header))
    image = np.frombuffer(buf, dtype=dt).reshape(h, w)
    image.flags.writeable = False
    return Frame(topic, header, image, parts)


# --------------------------------------------------------------------------- sockets
def open_socket(ctx: zmq.Context, kind: int, endpoint: str, limits: FrameLimits | None = None,
                hwm: int = 64) -> zmq.Socket:
    """Socket of ``kind`` from an endpoint string that says what to do: ``bind:tcp://...``
    or ``connect:tcp://...``.  ``limits`` sets ZMQ_MAXMSGSIZE so that libzmq refuses an
    oversized part before allocating it.  Linger is 0: closing never blocks."""
    how, sep, addr = endpoint.partition(":")
    if not sep or how not in ("bind", "connect") or not addr:
        raise ValueError(f"endpoint must be 'bind:<addr>' or 'connect:<addr>', got {endpoint!r}")
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if limits is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, limits.max_frame_bytes + limits.max_header_bytes)
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, TOPIC_PREFIX)
    try:
        (sock.bind if how == "bind" else sock.connect)(addr)
    except zmq.ZMQError:
        sock.close(0)
        raise
    return sock


def recv_frame(sock: zmq.Socket, limits: FrameLimits = FrameLimits(), timeout_ms: int | None = None) -> Frame | None:
    """Receive and decode one frame without copying its pixels; ``None`` on timeout.
    Raises ``FrameError`` for a malformed frame (the frame is consumed)."""
    if timeout_ms is not None and not sock.poll(timeout_ms, zmq.POLLIN):
        return None
    return decode_frame(sock.recv_multipart(copy=False), limits)
