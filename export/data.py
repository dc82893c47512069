"""Training crops: phantom scenes rendered straight into the model's canonical crop, plus
cheap per-batch augmentation.

A crop is placed the way stage 1 and the tiler place them at run time, with their errors
simulated: a random tip of the scene lands anywhere in the crop (tiles cut the band at any
place), the crop's rotation is the scene's canonical angle plus up to ``angle_jitter_deg``
(stage-1 angle error), and its scale varies by ``scale`` (pitch and magnification
spread).  A share ``p_context`` of the crops are *context* crops instead: centred on a
fixture, screw, tray or can wall, or anywhere stage 1's ROI can run on to beyond the
stack's ends, so the network sees edges and corners that are not tips (hard negatives,
labelled with whatever tips they happen to hold).  Rendering goes through ``daemon.phantom.crop_scene``: the frame's geometry,
illumination, PSF and noise sampled on the crop grid, so the labels stay exact.

Rendered crops are raw detector counts (14/16-bit) and cached; ``augment`` then draws, per
sample and per step, the 8-bit low-brightness window (with JPEG), gamma, extra blur and
noise, and normalises with the runtime's ``daemon.codec.normalise``.
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from daemon.codec import HeatmapCodec, apply_affine, normalise
from daemon.phantom import ANODE, CATHODE, crop_scene, get_spec, render, sample_scene, window_8bit


@dataclass(frozen=True)
class CropRecipe:
    """How training crops are drawn.  ``presets`` and ``weights`` pick the phantom preset."""

    size: tuple[int, int] = (160, 160)  # (w, h) of a training crop
    frame_size: tuple[int, int] = (1024, 1024)
    presets: tuple[str, ...] = ("normal", "hard", "defects")
    weights: tuple[float, ...] = (0.45, 0.35, 0.2)
    angle_jitter_deg: float = 2.0
    scale: tuple[float, float] = (0.9, 1.1)
    place: float = 0.45  # the chosen tip lands within +-place * size of the crop centre
    # context crops (hard negatives): centred on a fixture, screw, tray or wall, or anywhere
    # in the region an over-long stage-1 ROI can reach beyond the stack's ends
    p_context: float = 0.2
    context_reach: float = 350.0  # px beyond the outermost layers along the stack

    def to_dict(self) -> dict:
        return asdict(self)


def sample_crop(seed: int | np.random.SeedSequence, recipe: CropRecipe = CropRecipe()):
    """One training crop, deterministic from ``seed``.

    Returns ``(raw (h, w) uint16, anodes (Na, 2), cathodes (Nc, 2), meta)``: points are crop
    coordinates of every tip of the scene (also those outside the crop), ``meta`` has what
    ``augment`` needs for the 8-bit window (offset, open beam, white, jpeg) and the preset.
    """
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(int(seed))
    geo, place, noise = (np.random.default_rng(s) for s in ss.spawn(3))
    w = np.asarray(recipe.weights, np.float64)
    preset = recipe.presets[int(place.choice(len(w), p=w / w.sum()))]
    scene = sample_scene(geo, get_spec(preset), recipe.frame_size)
    tips = scene.tips_image()
    angle = 90.0 * scene.orientation + scene.rotation_deg + place.uniform(-1, 1) * recipe.angle_jitter_deg
    scale = place.uniform(*recipe.scale)
    cw, ch = recipe.size
    if place.random() < recipe.p_context:
        centre = apply_affine(scene.affine, _context_point(scene, place, recipe.context_reach))[0]
    else:
        t = tips[int(place.integers(len(tips)))]
        off = place.uniform(-recipe.place, recipe.place, 2) * np.array([cw, ch]) / scale
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        centre = t - np.array([[c, -s], [s, c]]) @ off  # the tip sits at +off from the crop centre
    codec = HeatmapCodec(recipe.size)
    A = codec.crop_affine(centre, angle, scale)
    cs = crop_scene(scene, A, recipe.size)
    raw = render(cs, noise, 16)
    pts = cs.tips_image()
    im = scene.imaging
    gain = (im["full_scale"] * im["bg_frac"] - im["offset_adu"]) / im["dose"]
    meta = {"offset": im["offset_adu"], "open_beam": gain * im["dose"], "white": im["window8"],
            "jpeg": im["jpeg"], "preset": preset, "full_scale": im["full_scale"]}
    return raw, pts[cs.kind == ANODE], pts[cs.kind == CATHODE], meta


def _context_point(scene, rng: np.random.Generator, reach: float) -> np.ndarray:
    """A canonical ``(u, v)`` for a context crop: the centre of an opaque extra shape
    (fixture, screw, tray, wall; jittered by 40 px) when the scene has one and a coin says
    so, else a uniform point of the tip band's neighbourhood extended by ``reach`` along
    the stack (where stage-1 ROIs that run on too far end)."""
    solid = [p for p in scene.prims if p["tau"] > 0.2 and p["shape"] in ("disc", "box", "band")]
    u0, u1 = float(scene.u_end.min()) - 60.0, float(scene.u_end.max()) + 150.0
    v0, v1 = float(scene.v.min()) - reach, float(scene.v.max()) + reach
    if solid and rng.random() < 0.6:
        p = solid[int(rng.integers(len(solid)))]
        if p["shape"] == "band":  # a wall or tray: a point on its inner edge near the tips
            edge = p["at"] - p["half"] if p["axis"] == "u" else p["at"]
            along = rng.uniform(u0, u1) if p["axis"] == "v" else rng.uniform(v0, v1)
            c = np.array([edge, along]) if p["axis"] == "u" else np.array([along, edge])
        else:
            c = np.asarray(p["c"], np.float64)
        return c + rng.uniform(-40, 40, 2)
    return np.array([rng.uniform(u0, u1), rng.uniform(v0, v1)])


def _sample_many(args):
    seeds, recipe = args
    return [sample_crop(s, recipe) for s in seeds]


def build_crops(seed_root: int, n: int, recipe: CropRecipe = CropRecipe(), jobs: int = 0, progress=None):
    """``n`` crops from seeds ``seed_root + i`` (a process pool of ``jobs``, 0 = all cores).

    Returns ``raw (n, h, w) uint16``, ``points`` (list of ``(anodes, cathodes)``) and
    ``metas`` (list of dict)."""
    import os

    jobs = jobs or os.cpu_count() or 1
    seeds = [seed_root + i for i in range(n)]
    chunk = 64
    parts = [(seeds[i:i + chunk], recipe) for i in range(0, n, chunk)]
    raws, points, metas = [], [], []
    if jobs == 1:
        results = map(_sample_many, parts)
        pool = None
    else:
        pool = ProcessPoolExecutor(jobs)
        results = pool.map(_sample_many, parts)
    try:
        for part in results:
            for raw, an, ca, meta in part:
                raws.append(raw)
                points.append((an, ca))
                metas.append(meta)
            if progress is not None:
                progress(len(part))
    finally:
        if pool is not None:
            pool.shutdown()
    return np.stack(raws), points, metas


@dataclass(frozen=True)
class Augment:
    p_8bit: float = 0.4
    p_jpeg: float = 0.5  # of the 8-bit ones
    jpeg_quality: tuple[int, int] = (60, 95)
    gamma: tuple[float, float] = (0.75, 1.35)
    p_blur: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    noise: tuple[float, float] = (0.0, 0.04)  # extra Gaussian noise, normalised units


def augment(raw: np.ndarray, metas: list[dict], rng: np.random.Generator, aug: Augment = Augment()) -> np.ndarray:
    """A training batch ``(B, 1, h, w) float32`` from raw crops ``(B, h, w)``: per sample
    gamma, optional blur, optional 8-bit window (+ JPEG), runtime normalisation, noise."""
    out = np.empty(raw.shape, np.float32)
    for b in range(len(raw)):  # per-sample OpenCV calls on small crops; not a runtime path
        m = metas[b]
        full = float(m["full_scale"])
        x = raw[b].astype(np.float32)
        g = rng.uniform(*aug.gamma)
        x = full * np.power(np.clip(x / full, 0, 1), g)
        if rng.random() < aug.p_blur:
            x = cv2.GaussianBlur(x, (0, 0), rng.uniform(*aug.blur_sigma))
        offset = m["offset"]
        open_beam = full * np.power(min((m["open_beam"] + offset) / full, 1.0), g) - offset
        if rng.random() < aug.p_8bit:
            q = int(rng.integers(aug.jpeg_quality[0], aug.jpeg_quality[1] + 1)) if rng.random() < aug.p_jpeg else 0
            x = window_8bit(np.clip(x, 0, 65535).astype(np.uint16), offset, max(open_beam, 1.0),
                            m["white"] * rng.uniform(0.9, 1.1), q).astype(np.float32)
        out[b] = x
    out = normalise(out)
    out += rng.normal(0, 1, out.shape).astype(np.float32) * rng.uniform(*aug.noise, (len(raw), 1, 1)).astype(np.float32)
    return out[:, None]


def targets(points: list[tuple[np.ndarray, np.ndarray]], codec: HeatmapCodec) -> np.ndarray:
    """``(B, K, Hh, Wh) float32`` targets for a batch of crops' ``(anodes, cathodes)``."""
    return np.stack([codec.encode(list(p)) for p in points])


__all__ = ["CropRecipe", "Augment", "sample_crop", "build_crops", "augment", "targets"]
