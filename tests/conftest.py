from __future__ import annotations

import pytest
import zmq


@pytest.fixture
def ctx():
    """A ZeroMQ context; every socket a test opens on it must be closed by that test's
    fixtures (linger 0), and the context is terminated afterwards."""
    c = zmq.Context()
    yield c
    c.term()


@pytest.fixture
def pull_push(ctx):
    """Connected PULL (bound on a random loopback port) and PUSH sockets."""
    from daemon.protocol import FrameLimits, open_socket

    limits = FrameLimits(max_frame_bytes=4 * 1024 * 1024, max_side=4096)
    pull = open_socket(ctx, zmq.PULL, "bind:tcp://127.0.0.1:*", limits)
    endpoint = pull.getsockopt(zmq.LAST_ENDPOINT).decode()
    push = open_socket(ctx, zmq.PUSH, f"connect:{endpoint}")
    yield pull, push, limits
    push.close(0)
    pull.close(0)


class _SessionShapes:
    """Stands in for an ONNX Runtime session: records the input shape of every call."""

    def __init__(self, session):
        self.session, self.shapes = session, []

    def run(self, outputs, feeds):
        self.shapes.append(next(iter(feeds.values())).shape)
        return self.session.run(outputs, feeds)


@pytest.fixture
def record_session_shapes():
    """``record(model) -> list``: from then on, the input shape of every session call
    ``model`` (a ``KeypointModel`` without IO binding) makes."""

    def record(model) -> list:
        model.session = rec = _SessionShapes(model.session)
        return rec.shapes

    return record
