"""Prometheus metrics of one App (its own registry, so several Apps can live in a process).

Series (all prefixed ``polecheck_``; docs/monitoring.md lists them with the alert rules):
``stage_duration_seconds{stage}`` (histogram, fine buckets below 5 ms),
``frame_latency_seconds`` (arrival -> verdict published), ``queue_depth{queue}``,
``queue_capacity{queue}``, ``frames_received_total``, ``frame_errors_total{kind}``,
``verdicts_total{verdict}``, ``cell_verdicts_total{verdict}``, ``reasons_total{code}``,
``batch_size`` (crops per model call), ``batch_frames`` (frames per model call),
``model_provider_info{provider,wanted}``, ``model_provider_fallback``, ``model_info{sha256,path}``,
``build_info{version,python,onnxruntime}``, ``journal_fsync_seconds``, ``archive_*``, ``open_cells``, ``internal_errors_total{stage}``.
"""

from __future__ import annotations

import platform
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from . import __version__

#: stage time buckets, seconds: 0.25 ms steps below 5 ms, then coarser up to 2.5 s
STAGE_BUCKETS = (0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.0035, 0.004, 0.0045, 0.005,
                 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)


class Metrics:
    """The App's series on a private ``registry``; ``serve(host, port)`` exposes them."""

    def __init__(self, stages: Iterable[str], queues: Iterable[str]):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.stage_seconds = Histogram("polecheck_stage_duration_seconds", "time a frame spends in a stage",
                                       ["stage"], registry=r, buckets=STAGE_BUCKETS)
        self.latency = Histogram("polecheck_frame_latency_seconds", "frame arrival to verdict published",
                                 registry=r, buckets=LATENCY_BUCKETS)
        self.queue_depth = Gauge("polecheck_queue_depth", "items waiting in a bounded queue", ["queue"], registry=r)
        self.queue_capacity = Gauge("polecheck_queue_capacity", "size of a bounded queue", ["queue"], registry=r)
        self.frames = Counter("polecheck_frames_received", "frames received (decoded or not)", registry=r)
        self.frame_errors = Counter("polecheck_frame_errors", "frames that could not be decoded", ["kind"],
                                    registry=r)
        self.verdicts = Counter("polecheck_verdicts", "frame verdicts published", ["verdict"], registry=r)
        self.cell_verdicts = Counter("polecheck_cell_verdicts", "cell verdicts published", ["verdict"], registry=r)
        self.reasons = Counter("polecheck_reasons", "NG reasons in frame verdicts", ["code"], registry=r)
        self.batch_size = Histogram("polecheck_batch_size", "crops per model call", registry=r,
                                    buckets=(1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256))
        self.batch_frames = Histogram("polecheck_batch_frames", "frames per model call", registry=r,
                                      buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
        self.provider = Gauge("polecheck_model_provider_info", "ONNX Runtime provider running the model (1)",
                              ["provider", "wanted"], registry=r)
        self.fallback = Gauge("polecheck_model_provider_fallback",
                              "1 when the model runs on a provider other than the first configured one", registry=r)
        self.model = Gauge("polecheck_model_info", "the loaded model (1)", ["sha256", "path", "fp16"], registry=r)
        self.build = Info("polecheck_build", "polecheck build", registry=r)
        self.journal_fsync = Histogram("polecheck_journal_fsync_seconds", "journal fsync duration", registry=r,
                                       buckets=STAGE_BUCKETS)
        self.archived = Counter("polecheck_archive_written", "NG frames written to the archive", registry=r)
        self.archive_skipped = Counter("polecheck_archive_skipped",
                                       "NG frames not archived (archive queue full or write error)", registry=r)
        self.archive_bytes = Gauge("polecheck_archive_bytes", "bytes held by the NG archive", registry=r)
        self.open_cells = Gauge("polecheck_open_cells", "cells waiting for corners", registry=r)
        self.internal_errors = Counter("polecheck_internal_errors", "frames a stage raised on (NG internal_error)",
                                       ["stage"], registry=r)
        self.seq_resets = Counter("polecheck_seq_resets", "scanner sequence numbers that went backwards", registry=r)
        self.up = Gauge("polecheck_up", "1 while the pipeline runs, 0 while it drains or stops", registry=r)
        try:
            import onnxruntime

            ort = onnxruntime.__version__
        except ImportError:  # pragma: no cover - a dependency
            ort = "missing"
        self.build.info({"version": __version__, "python": platform.python_version(), "onnxruntime": ort})
        for s in stages:
            self.stage_seconds.labels(stage=s)
        for q in queues:
            self.queue_depth.labels(queue=q)
        self._server = None

    def set_model(self, model) -> None:
        """Provider, fallback and model series from a ``KeypointModel``."""
        self.provider.labels(provider=model.provider, wanted=",".join(model.wanted)).set(1)
        self.fallback.set(1 if model.fallback else 0)
        self.model.labels(sha256=model.sha256, path=str(model.path), fp16=str(model.fp16).lower()).set(1)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP exporter; returns the port it listens on."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
