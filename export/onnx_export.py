"""``polecheck export``: checkpoint -> ONNX with dynamic batch, height and width axes, codec
metadata, and a torch-vs-ONNX-Runtime parity check.

The ONNX file carries everything the daemon needs to use it without the training code:
metadata ``polecheck.codec`` (reference input size, size multiple, stride, sigma, classes),
``polecheck.model``
(HRNet config), ``polecheck.train`` (seed, steps, validation metrics).  Input ``x``
``(B, 1, h, w) float32`` from ``daemon.codec.normalise``, ``h`` and ``w`` any multiples of
the size multiple (the network is fully convolutional; the daemon fits one crop to an ROI);
output ``heatmaps`` ``(B, K, h/stride, w/stride)``.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from .hrnet import HRNet, HRNetConfig

OPSET = 17


def load_checkpoint(path: str | Path) -> tuple[HRNet, dict]:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    cfg = ck["config"]
    model = HRNet(HRNetConfig.from_dict(cfg["model"]))
    model.load_state_dict(ck["model"])
    return model.eval(), ck


def to_onnx_bytes(model: torch.nn.Module, input_size: tuple[int, int], metadata: dict[str, str]) -> bytes:
    """Export ``model`` for inputs ``(B, 1, h, w)``; ``input_size (w, h)`` is the size
    traced (batch, height and width stay dynamic)."""
    import onnx

    w, h = input_size
    buf = io.BytesIO()
    torch.onnx.export(model.eval(), torch.zeros(1, 1, h, w), buf, input_names=["x"], output_names=["heatmaps"],
                      dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"},
                                    "heatmaps": {0: "batch", 2: "height_out", 3: "width_out"}}, opset_version=OPSET,
                      dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    for k, v in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name = "polecheck"
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def parity(model: torch.nn.Module, onnx_bytes: bytes, x: np.ndarray) -> float:
    """Max absolute difference between torch and ONNX Runtime (CPU) heatmaps on ``x``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    got = sess.run(None, {"x": x})[0]
    return float(np.abs(ref - got).max())


def export(checkpoint: str | Path, out: str | Path, input_size: tuple[int, int] = (256, 256),
           parity_batch: int = 3, seed: int = 0) -> dict:
    """Write ``out`` (.onnx) from a training checkpoint; return ``{path, sha256, bytes,
    parity_max_abs}``.  The parity inputs are real phantom crops, normalised: batch
    ``parity_batch`` of ``input_size`` and one crop twice as tall (the dynamic axes)."""
    from daemon.codec import HeatmapCodec, normalise
    from .data import CropRecipe, build_crops

    model, ck = load_checkpoint(checkpoint)
    cfg = ck["config"]
    codec = {"input_size": list(input_size), "size_multiple": model.cfg.size_multiple, "stride": cfg["stride"],
             "sigma": cfg["sigma"], "classes": ["anode", "cathode"]}
    train = {"seed": cfg["seed"], "steps": ck["step"], "val": ck.get("metrics"), "crops": cfg["crops"]}
    meta = {"polecheck.codec": json.dumps(codec), "polecheck.model": json.dumps(cfg["model"]),
            "polecheck.train": json.dumps(train)}
    data = to_onnx_bytes(model, tuple(input_size), meta)
    HeatmapCodec(tuple(input_size), cfg["stride"], cfg["sigma"])  # validates the geometry
    raw, _, _ = build_crops(seed, parity_batch, CropRecipe(size=tuple(input_size)), jobs=1)
    tall, _, _ = build_crops(seed + 1, 1, CropRecipe(size=(input_size[0], 2 * input_size[1])), jobs=1)
    diff = max(parity(model, data, normalise(raw)[:, None]), parity(model, data, normalise(tall)[:, None]))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return {"path": str(out), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "parity_max_abs": diff}


__all__ = ["export", "to_onnx_bytes", "parity", "load_checkpoint", "OPSET"]
