"""Regenerate docs/previews/*.png: per preset, full frames (downscaled) beside a 1:1 crop
of the tip band, ground truth drawn on top (anode tips red, cathode tips green).

    python docs/make_previews.py
"""

from pathlib import Path

import cv2
import numpy as np

from daemon.phantom import draw_labels, make_phantom

OUT = Path(__file__).resolve().parent / "previews"


def sheet(preset: str, seed: int, bits: int) -> np.ndarray:
    ph = make_phantom(np.random.SeedSequence([2024, seed]), preset, (1024, 1024), bits)
    full = cv2.resize(draw_labels(ph.image, ph.labels), (512, 512), interpolation=cv2.INTER_AREA)
    tips = np.vstack([ph.labels["anode"], ph.labels["cathode"]])
    cx, cy = np.clip(tips.mean(0).astype(int) - 128, 0, 1024 - 256)
    lab = dict(ph.labels)
    lab["anode"] = (np.array(lab["anode"]) - [cx, cy]).tolist()
    lab["cathode"] = (np.array(lab["cathode"]) - [cx, cy]).tolist()
    crop = draw_labels(ph.image[cy:cy + 256, cx:cx + 256], lab)
    crop = cv2.resize(crop, (512, 512), interpolation=cv2.INTER_NEAREST)
    cv2.putText(crop, f"{preset} {bits}-bit, 1:1 crop x2", (10, 500), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 200, 255), 1)
    return np.hstack([full, np.full((512, 8, 3), 255, np.uint8), crop])


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for preset, seeds in (("normal", (1, 2, 3)), ("hard", (4, 5, 6)), ("defects", (7, 8, 9))):
        for k, seed in enumerate(seeds):
            bits = 8 if k == 1 else 16
            cv2.imwrite(str(OUT / f"{preset}_{k}.png"), sheet(preset, seed, bits), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"wrote {OUT}")
