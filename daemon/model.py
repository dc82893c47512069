"""Stage 2 runtime (``keypoint_model``): the shipped ONNX HRNet under ONNX Runtime.

The file is checked against its pinned SHA-256 before it is parsed; a mismatch is a
start-up error, never a warning.  Providers come from config in order of preference
(TensorRT, CUDA, CPU); those this ONNX Runtime build or machine lacks are skipped and the
fallback is logged (``provider`` tells which one runs).  The codec geometry (input size,
stride, sigma, classes) is read from the model's metadata, so a model always decodes with
the convention it was trained with.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from .codec import MAX_CROP, HeatmapCodec

log = logging.getLogger("polecheck.model")


class ModelError(RuntimeError):
    """The model file is missing, does not match its pinned hash, or is not a polecheck model."""


class KeypointModel:
    """ONNX Runtime session for tip heatmaps.  ``__call__(x (B, 1, h, w) float32) ->
    (B, K, h/stride, w/stride) float32``.  ``(w, h)`` is ``codec.input_size`` for a model
    with a fixed input size; a model exported with dynamic ``h, w`` (``dynamic_size``)
    takes any multiple of ``size_multiple`` (its metadata) up to ``max_size (w, h)``.

    ``fixed_shape`` (``"auto"``: on for the CUDA provider): every session call gets one
    input shape, ``(max_batch, 1, h, w)`` with ``(w, h) = codec.input_size``: inputs must be
    tiles of that size, and a batch is padded with zero crops (their heatmaps dropped) or
    split.  ONNX Runtime's CUDA provider re-plans every convolution whenever the input shape
    changes: 50-500 ms a call with crops fitted to each ROI, against 1.6-2.1 ms for a
    repeated batch of 8 tiles (H200, docs/benchmarks.md)."""

    def __init__(self, path: str | Path, sha256: str | None = None,
                 providers: tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider"),
                 threads: int = 0, fp16: bool = True, io_binding: bool = False,
                 cache_dir: str | Path | None = None, max_size: tuple[int, int] = MAX_CROP,
                 max_batch: int = 8, cudnn_conv_algo_search: str = "EXHAUSTIVE", fixed_shape: str | bool = "auto"):
        import onnxruntime as ort

        if fixed_shape not in ("auto", True, False):
            raise ValueError(f"fixed_shape must be 'auto', true or false, got {fixed_shape!r}")
        if int(max_batch) < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"model file {path} not found")
        data = path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        if sha256 is not None and self.sha256 != sha256.lower():
            raise ModelError(f"model {path}: sha256 {self.sha256} does not match the pinned {sha256}")
        available = set(ort.get_available_providers())
        if not _has_nvidia_device():
            # onnxruntime-gpu lists the GPU providers on any machine; without a device they
            # can only fail (with a long library error), so they are skipped up front
            available -= {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
        ort.set_default_logger_severity(3)
        chosen = [p for p in providers if p in available]
        skipped = [p for p in providers if p not in available]
        if not chosen:
            raise ModelError(f"none of the providers {list(providers)} is available (have {sorted(available)})")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        profile = None
        if "TensorrtExecutionProvider" in chosen:  # TensorRT needs a profile for dynamic input sizes
            probe = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).get_inputs()[0].shape
            if not any(isinstance(d, int) for d in probe[2:]):
                profile = _trt_profile(max_size, max_batch)
        try:
            self.session = ort.InferenceSession(data, so, providers=[
                _provider_entry(p, fp16, cache_dir, profile, cudnn_conv_algo_search) for p in chosen])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ModelError(f"model {path}: {e}") from e
        self.wanted = tuple(providers)
        self.provider = self.session.get_providers()[0]
        #: True when the preferred provider is not the one running (logged, and a metric)
        self.fallback = self.provider != providers[0]
        self.fp16 = bool(fp16 and self.provider == "TensorrtExecutionProvider")
        if skipped or self.provider != chosen[0]:
            failed = [p for p in chosen if p not in self.session.get_providers()]
            log.warning("model providers: wanted %s, running on %s (not available here: %s%s)",
                        list(providers), self.provider, skipped or "none",
                        f"; failed to start: {failed}, see ONNX Runtime's error above" if failed else "")
        meta = self.session.get_modelmeta().custom_metadata_map
        if "polecheck.codec" not in meta:
            raise ModelError(f"model {path} has no polecheck.codec metadata (not exported by polecheck export)")
        c = json.loads(meta["polecheck.codec"])
        self.codec = HeatmapCodec(tuple(c["input_size"]), int(c["stride"]), float(c["sigma"]), tuple(c["classes"]))
        self.size_multiple = int(c.get("size_multiple", 0))
        dims = self.session.get_inputs()[0].shape  # [B, 1, h, w]: ints, or names where dynamic
        self.dynamic_size = self.size_multiple > 0 and not any(isinstance(d, int) for d in dims[2:])
        self.max_size = (int(max_size[0]), int(max_size[1])) if self.dynamic_size else tuple(self.codec.input_size)
        self.metadata = {k: json.loads(v) for k, v in meta.items() if k.startswith("polecheck.")}
        self.path = path
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name
        # IO binding: the output stays on the device between the run and the copy (CUDA,
        # TensorRT); on CPU it is plain session.run.
        self._device = "cuda" if self.provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        self.io_binding = bool(io_binding and self._device == "cuda")
        self.fixed_shape = self.provider == "CUDAExecutionProvider" if fixed_shape == "auto" else bool(fixed_shape)
        self.max_batch = int(max_batch)

    @classmethod
    def from_config(cls, m, threads: int | None = None, cache_dir: str | Path | None = None) -> "KeypointModel":
        """The model as the ``model`` config section ``m`` (``daemon.config.ModelConfig``)
        runs it; ``threads`` overrides ``m.threads``; ``cache_dir`` keeps TensorRT engines."""
        return cls(m.resolved_path(), m.sha256, tuple(m.providers), m.threads if threads is None else threads,
                   m.fp16, m.io_binding, cache_dir=cache_dir, max_size=m.max_crop_px or MAX_CROP,
                   max_batch=m.max_batch, cudnn_conv_algo_search=m.cudnn_conv_algo_search,
                   fixed_shape=m.fixed_shape)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        if self.dynamic_size and not self.fixed_shape:
            m, (mw, mh) = self.size_multiple, self.max_size
            if (x.ndim != 4 or x.shape[1] != 1 or x.shape[2] % m or x.shape[3] % m or not 0 < x.shape[2] <= mh
                    or not 0 < x.shape[3] <= mw):
                raise ValueError(f"model input must be (B, 1, h, w), h and w multiples of {m} up to "
                                 f"({mh}, {mw}), got {x.shape}")
        else:  # a fixed input size, or one input shape (fixed_shape): tiles of codec.input_size
            w, h = self.codec.input_size
            if x.ndim != 4 or x.shape[1:] != (1, h, w):
                raise ValueError(f"model input must be (B, 1, {h}, {w}){' tiles with fixed_shape' * self.fixed_shape}"
                                 f", got {x.shape}")
        return self._fixed_batches(x) if self.fixed_shape else self._run(x)

    def _fixed_batches(self, x: np.ndarray) -> np.ndarray:
        """``x (N, 1, h, w)`` in session calls of exactly ``(max_batch, 1, h, w)``: the last
        (or only) batch is padded with zero crops, whose heatmaps are dropped."""
        B, n = self.max_batch, len(x)
        out = []
        for i in range(0, max(n, 1), B):
            part = x[i:i + B]
            if len(part) < B:
                part = np.concatenate([part, np.zeros((B - len(part),) + x.shape[1:], np.float32)])
            out.append(self._run(part)[:max(0, min(B, n - i))])
        return out[0] if len(out) == 1 else np.concatenate(out)

    def _run(self, x: np.ndarray) -> np.ndarray:
        """One session call on ``x (B, 1, h, w)`` float32, C-contiguous."""
        if not self.io_binding:
            return self.session.run(None, {self._input: x})[0]
        b = self.session.io_binding()  # per call: a binding is not thread-safe
        b.bind_cpu_input(self._input, x)
        b.bind_output(self._output, self._device)
        self.session.run_with_iobinding(b)
        return b.copy_outputs_to_cpu()[0]

    def warm_up(self, batch: int, runs: int = 2) -> float:
        """Run ``runs`` zero batches of ``batch`` crops (graph optimisation, memory arenas,
        TensorRT engine build and, with ``fixed_shape``, cuDNN's algorithm search for the one
        input shape happen here, not on the first frame); returns the seconds taken."""
        import time

        w, h = self.codec.input_size
        t = time.perf_counter()
        for _ in range(runs):
            self(np.zeros((batch, 1, h, w), np.float32))
        return time.perf_counter() - t


def _has_nvidia_device() -> bool:
    """An NVIDIA driver device node exists (``/dev/nvidiactl``; also inside containers
    that were given the GPU)."""
    return Path("/dev/nvidiactl").exists()


def _trt_profile(max_size: tuple[int, int], max_batch: int) -> dict:
    """TensorRT optimisation profile for the input ``x`` (``name:BxCxHxW``): one engine for
    batch 1..``max_batch`` and crops from 64 px up to ``max_size (w, h)``, tuned for one
    256 x 512 crop (a typical ROI).  Only for a model with a dynamic input size."""
    w, h = int(max_size[0]), int(max_size[1])
    return {"trt_profile_min_shapes": "x:1x1x64x64",
            "trt_profile_opt_shapes": f"x:1x1x{min(512, h)}x{min(256, w)}",
            "trt_profile_max_shapes": f"x:{int(max_batch)}x1x{h}x{w}"}


def _provider_entry(name: str, fp16: bool, cache_dir: str | Path | None, profile: dict | None = None,
                    cudnn_conv_algo_search: str = "EXHAUSTIVE"):
    """``(provider, options)`` for ``InferenceSession``: TensorRT gets FP16, an engine cache
    and the dynamic-shape ``profile`` (``_trt_profile``); CUDA gets how cuDNN picks each
    convolution's algorithm for a new input shape (``model.cudnn_conv_algo_search``)."""
    if name == "TensorrtExecutionProvider":
        opts = {"trt_fp16_enable": bool(fp16)}
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir))
        opts.update(profile or {})
        return name, opts
    if name == "CUDAExecutionProvider":
        return name, {"cudnn_conv_algo_search": cudnn_conv_algo_search}
    return name, {}


__all__ = ["KeypointModel", "ModelError"]
