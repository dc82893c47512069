"""The project's labelled dataset format (docs/dataset.md): ``NAME.png`` + ``NAME.json``.

Note:
    Points are ``(N, 2) float (x, y)``, x right, y down, ``(0, 0)`` = centre of the top-left
    pixel.  Images are ``(H, W)`` uint8 or uint16 PNG.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

REQUIRED_KEYS = ("anode", "cathode", "pixel_pitch_um", "overhang_um", "verdict", "reasons")


class DatasetError(ValueError):
    pass


@dataclass
class Sample:
    name: str
    image: np.ndarray  # (H, W) uint8 | uint16
    labels: dict

    @property
    def anode(self) -> np.ndarray:
        """``(Na, 2) float64 (x, y)``"""
        return np.asarray(self.labels["anode"], dtype=np.float64).reshape(-1, 2)

    @property
    def cathode(self) -> np.ndarray:
        """``(Nc, 2) float64 (x, y)``"""
        return np.asarray(self.labels["cathode"], dtype=np.float64).reshape(-1, 2)


def write_sample(out_dir: str | os.PathLike, name: str, image: np.ndarray, labels: dict) -> None:
    """Write ``NAME.png`` (lossless, 8 or 16 bit) and ``NAME.json`` atomically."""
    out = Path(out_dir)
    if image.dtype not in (np.uint8, np.uint16) or image.ndim != 2:
        raise DatasetError(f"{name}: image must be (H, W) uint8/uint16, got {image.shape} {image.dtype}")
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise DatasetError(f"{name}: PNG encoding failed")
    for path, data in ((out / f"{name}.png", buf.tobytes()),
                       (out / f"{name}.json", json.dumps(labels, separators=(",", ":")).encode())):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)


def validate_labels(name: str, labels: dict) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in labels]
    if missing:
        raise DatasetError(f"{name}.json: missing {', '.join(missing)}")
    for key in ("anode", "cathode"):
        arr = np.asarray(labels[key], dtype=np.float64)
        if arr.size and (arr.ndim != 2 or arr.shape[1] != 2 or not np.isfinite(arr).all()):
            raise DatasetError(f"{name}.json: {key} must be a list of finite [x, y]")
    if labels["verdict"] not in ("OK", "NG"):
        raise DatasetError(f"{name}.json: verdict must be OK or NG")
    if not (isinstance(labels["pixel_pitch_um"], (int, float)) and labels["pixel_pitch_um"] > 0):
        raise DatasetError(f"{name}.json: pixel_pitch_um must be a positive number")


def read_sample(directory: str | os.PathLike, name: str) -> Sample:
    d = Path(directory)
    image = cv2.imread(str(d / f"{name}.png"), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DatasetError(f"{name}.png: unreadable")
    if image.ndim == 3:  # 3 identical channels, as some public images are stored
        image = image[..., 0]
    labels = json.loads((d / f"{name}.json").read_text())
    validate_labels(name, labels)
    return Sample(name, image, labels)


def sample_names(directory: str | os.PathLike) -> list[str]:
    d = Path(directory)
    if not d.is_dir():
        raise DatasetError(f"{d}: not a directory")
    return sorted(p.stem for p in d.glob("*.json") if (d / f"{p.stem}.png").exists())


def iter_dataset(directory: str | os.PathLike) -> Iterator[Sample]:
    for name in sample_names(directory):
        yield read_sample(directory, name)
