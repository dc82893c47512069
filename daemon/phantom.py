"""Physically motivated synthetic radiographs of one battery-cell corner, with exact labels.

The scene is built in a *canonical frame* ``(u, v)``: electrode layers run along ``u``,
their tips point to ``+u``, and they are stacked along ``+v``.  One affine maps the canonical
frame onto the image (tip direction right/down/left/up plus a small rotation).  Every
supersample of the image is mapped back through the exact inverse affine and the scene is
evaluated there as signed distance fields (SDF), so that edges sit where the geometry says
to a small fraction of a pixel (no 1/ss quantisation).  Ground-truth tips are therefore
the analytic tip points pushed through the forward affine.

Physics: transmission follows Beer-Lambert, ``T = exp(-sum_m tau_m * coverage_m)`` with
per-material optical depths (anode, cathode (usually stronger), separator, casing, tray,
fixtures).  The detector integrates photons over each pixel (mean of the supersamples),
sees a heel-effect illumination gradient and optionally an image-intensifier circular field
of view, blurs with a PSF (core Gaussian + wide scatter halo), and adds Poisson photon noise
and Gaussian read noise before 14/16-bit quantisation.  The 8-bit variant is a low-
brightness window like the public X-ray PBD images, optionally JPEG-compressed.

Note:
    W, H: frame width and height in pixels; sizes are ``(w, h)``.
    L: number of electrode layers in one stack (anodes + cathodes).
    Points are ``(N, 2) float64 (x, y)``: x right, y down, ``(0, 0)`` = centre of the
    top-left pixel; pixel ``[i, j]`` covers ``x in [j - 0.5, j + 0.5]``,
    ``y in [i - 0.5, i + 0.5]``.
    A tip is the extreme point of a layer along its own axis (the ``+u`` direction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from .codec import _rot, apply_affine, invert_affine
from .rules import ANODE, CATHODE, OverhangLimits, judge_geometry, overhangs_um

DIRECTIONS = ("right", "down", "left", "up")  # tip direction for orientation index 0..3


# --------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class PhantomSpec:
    """Ranges that one preset draws its scenes from; ``(lo, hi)`` pairs are uniform ranges."""

    name: str
    layers: tuple[int, int] = (9, 59)  # total layers L (odd: anodes = cathodes + 1)
    pitch_px: tuple[float, float] = (8.0, 28.0)  # centre-to-centre distance of adjacent layers
    stack_height_frac: tuple[float, float] = (0.21, 0.59)  # of the canonical frame height
    band_frac: tuple[float, float] = (0.06, 0.18)  # nominal overhang in px / frame width
    overhang_um: tuple[float, float] = (1150.0, 1750.0)  # nominal cell overhang
    overhang_sd_um: float = 55.0  # per-anode jitter
    limits_um: tuple[float, float] = (750.0, 2250.0)  # OK range used for the labels
    rotation_deg: float = 8.0
    p_needle: float = 0.5  # share of cells with needle-like tapered anode tips
    p_bend: float = 0.6  # share of anodes whose end bends slightly
    dose: tuple[float, float] = (3000.0, 25000.0)  # photons per pixel in the open beam
    psf_sigma: tuple[float, float] = (0.5, 1.1)
    scatter: tuple[float, float] = (0.01, 0.05)  # weight of the wide scatter halo
    read_noise_adu: tuple[float, float] = (2.0, 8.0)
    heel: tuple[float, float] = (0.04, 0.22)  # relative illumination gradient across the frame
    p_fov: float = 0.3  # circular image-intensifier field of view (black corners)
    p_casing: float = 0.5
    p_tray: float = 0.13
    p_streaks: float = 0.14  # separator shadows and wispy strands past the tips
    p_fork: float = 0.15  # split tips
    p_occluder: float = 0.01  # grey block lowering the background to ~170/255
    fixtures: tuple[int, int] = (0, 3)  # screws, clamps, blocks elsewhere in the frame
    p_jpeg: float = 0.0  # 8-bit output only
    jpeg_quality: tuple[int, int] = (80, 95)
    p_14bit: float = 0.3
    p_defect: float = 0.0  # share of frames with an injected NG defect
    p_borderline_ok: float = 0.0  # share of frames with one overhang just inside a limit


PRESETS: dict[str, PhantomSpec] = {
    "normal": PhantomSpec("normal"),
    "hard": PhantomSpec(
        "hard",
        dose=(500.0, 2500.0),
        psf_sigma=(1.2, 2.4),
        scatter=(0.03, 0.10),
        read_noise_adu=(4.0, 16.0),
        heel=(0.10, 0.35),
        p_fov=0.5,
        p_casing=0.7,
        p_tray=0.35,
        p_streaks=0.45,
        p_fork=0.4,
        p_occluder=0.1,
        fixtures=(1, 5),
        p_jpeg=0.7,
        jpeg_quality=(60, 90),
    ),
    "defects": PhantomSpec("defects", p_defect=0.5, p_borderline_ok=0.25),
}


# --------------------------------------------------------------------------- scene
@dataclass
class Scene:
    """Everything needed to render one frame and to label it exactly.

    Layer arrays are ``(L,)`` in stacking order (ascending ``v``); ``prims`` are extra
    shapes (distractors, forks, folds) as dicts of canonical-frame parameters.
    """

    size: tuple[int, int]  # (w, h)
    affine: np.ndarray  # (2, 3) canonical (u, v, 1) -> image (x, y)
    orientation: int  # index into DIRECTIONS
    rotation_deg: float
    pixel_pitch_um: float
    kind: np.ndarray  # (L,) int8, ANODE or CATHODE
    v: np.ndarray  # (L,) centre line
    u_end: np.ndarray  # (L,) tip position along u
    h: np.ndarray  # (L,) half thickness of the layer body
    r_tip: np.ndarray  # (L,) radius of the rounded end
    taper: np.ndarray  # (L,) length of the taper from h to r_tip
    bend_amp: np.ndarray  # (L,) lateral deflection of the end (px, signed)
    bend_len: np.ndarray  # (L,) length over which the end bends
    tau: np.ndarray  # (L,) optical depth of the layer material
    fill: np.ndarray  # (L,) thickness of the separator/electrolyte shell around cathodes (0: none)
    fill_tau: np.ndarray  # (L,) optical depth of that shell
    fill_ext: np.ndarray  # (L,) how far the shell runs past the cathode's end
    prims: list[dict] = field(default_factory=list)
    imaging: dict = field(default_factory=dict)
    limits_um: tuple[float, float] = (750.0, 2250.0)
    defects: list[dict] = field(default_factory=list)

    def layer_params(self) -> np.ndarray:
        """``(8, L) float32`` rows: u_end, h, r_tip, taper, v, bend_amp, bend_len, tau."""
        return np.stack([self.u_end, self.h, self.r_tip, self.taper, self.v, self.bend_amp,
                         self.bend_len, self.tau]).astype(np.float32)

    def reach(self) -> float:
        """Distance behind a layer's end within which its bend or tapered cap can matter."""
        return float(np.max(np.maximum(self.r_tip + self.taper, self.bend_len))) + 1.0

    # -- labels --------------------------------------------------------------
    def tips_canonical(self) -> np.ndarray:
        """Tip points in the canonical frame, ``(L, 2) (u, v)``, stacking order."""
        return np.stack([self.u_end, self.v + self.bend_amp], axis=1)

    def tips_image(self) -> np.ndarray:
        """Tip points in image coordinates, ``(L, 2) (x, y)``, stacking order."""
        return apply_affine(self.affine, self.tips_canonical())

    def overhangs_um(self) -> np.ndarray:
        """``(C, 2)`` overhang of each cathode against its previous/next neighbour in the
        stack (``[left, right]`` = lower/higher stacking index), in micrometres along the
        layer axis; NaN where that neighbour is not an anode (a missing layer)."""
        return overhangs_um(self.kind, self.u_end, self.pixel_pitch_um)

    def labels(self) -> dict:
        """The dataset JSON record (see docs/dataset.md)."""
        tips = self.tips_image()
        an, ca = tips[self.kind == ANODE], tips[self.kind == CATHODE]
        ov = self.overhangs_um()
        verdict, reasons = judge_geometry(
            ov, int(len(an)), int(len(ca)), OverhangLimits(*self.limits_um)
        )
        return {
            "anode": np.round(an, 4).tolist(),
            "cathode": np.round(ca, 4).tolist(),
            "pixel_pitch_um": round(float(self.pixel_pitch_um), 4),
            "overhang_um": [[_num(a), _num(b)] for a, b in ov],
            "verdict": verdict,
            "reasons": reasons,
            "tip_direction": DIRECTIONS[self.orientation],
            "rotation_deg": round(float(self.rotation_deg), 4),
            "limits_um": list(self.limits_um),
            "size": list(self.size),
            "defects": self.defects,
        }


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 3)


# --------------------------------------------------------------------------- sampling
def _u(rng: np.random.Generator, r: tuple[float, float]) -> float:
    return float(rng.uniform(r[0], r[1]))


@dataclass(frozen=True)
class CellParams:
    """What the four corners of one cell share: layer count, pitch, materials, tip style."""

    n_layers: int
    pitch_px: float
    pixel_pitch_um: float
    overhang_um: float
    h_frac: tuple[float, float]  # anode, cathode half thickness / pitch
    tau: tuple[float, float]  # anode, cathode optical depth
    fill_tau: float  # separator/electrolyte between the layers of the body
    needle: bool


def sample_cell(rng: np.random.Generator, spec: PhantomSpec, size: tuple[int, int]) -> CellParams:
    """Draw the per-cell parameters so that the stack fits any orientation of ``size``."""
    short = min(size)
    for _ in range(100):
        L = int(rng.integers(spec.layers[0] // 2, spec.layers[1] // 2 + 1)) * 2 + 1
        lo = max(spec.pitch_px[0], spec.stack_height_frac[0] * short / L)
        hi = min(spec.pitch_px[1], spec.stack_height_frac[1] * short / L)
        if lo <= hi:
            break
    else:  # tiny frames: fall back to the smallest stack that fits
        L, lo, hi = spec.layers[0] | 1, spec.pitch_px[0], spec.pitch_px[0]
    pitch = float(rng.uniform(lo, hi))
    ov_um = _u(rng, spec.overhang_um)
    band_px = _u(rng, spec.band_frac) * short
    tau_a = float(rng.uniform(1.6, 2.6))
    ratio = float(rng.uniform(1.2, 1.7)) if rng.random() > 0.1 else float(rng.uniform(0.85, 1.0))
    return CellParams(
        n_layers=L,
        pitch_px=pitch,
        pixel_pitch_um=ov_um / band_px,
        overhang_um=ov_um,
        h_frac=(float(rng.uniform(0.36, 0.45)), float(rng.uniform(0.32, 0.42))),
        tau=(tau_a, tau_a * ratio),
        fill_tau=float(rng.uniform(0.5, 1.6)),
        needle=bool(rng.random() < spec.p_needle),
    )


def sample_scene(
    rng: np.random.Generator,
    spec: PhantomSpec,
    size: tuple[int, int] = (1024, 1024),
    orientation: int | None = None,
    cell: CellParams | None = None,
    rotation_deg: float | None = None,
) -> Scene:
    """Draw one corner scene.  ``orientation`` 0..3 = tips right/down/left/up and
    ``rotation_deg`` about the tip band (random within the preset's range if None)."""
    W, H = size
    cell = cell or sample_cell(rng, spec, size)
    orient = int(rng.integers(4)) if orientation is None else int(orientation)
    Wc, Hc = (W, H) if orient % 2 == 0 else (H, W)
    L, p, pp = cell.n_layers, cell.pitch_px, cell.pixel_pitch_um
    kind = np.where(np.arange(L) % 2 == 0, ANODE, CATHODE).astype(np.int8)
    is_a = kind == ANODE
    k = np.arange(L)

    # Stack across v: nearly regular pitch with small jitter.
    v = np.cumsum(np.r_[0.0, p * (1 + rng.normal(0, 0.025, L - 1))])
    h = np.where(is_a, cell.h_frac[0], cell.h_frac[1]) * p * (1 + rng.normal(0, 0.03, L))

    # Cathode ends: smooth staircase/bow across the stack plus jitter; anodes overhang them.
    ov_px = cell.overhang_um / pp
    slope = rng.uniform(-1.0, 1.0) * min(1.5, 0.25 * ov_px / max(L, 1))
    bow = rng.uniform(-0.25, 0.25) * ov_px
    t = (k - (L - 1) / 2) / max((L - 1) / 2, 1)
    u_c = slope * k + bow * t**2 + rng.normal(0, 0.6, L)
    nb_mean = np.empty(L)
    nb_mean[1:-1] = 0.5 * (u_c[:-2] + u_c[2:])
    nb_mean[0], nb_mean[-1] = u_c[1], u_c[-2]
    ov_each = rng.normal(cell.overhang_um, spec.overhang_sd_um, L) / pp
    u_end = np.where(is_a, nb_mean + ov_each, u_c)

    defects: list[dict] = []
    prims: list[dict] = []
    r = rng.random()
    if r < spec.p_defect:
        kind, v, h, u_end, defects, prims = _inject_defect(
            rng, spec, kind, v, h, u_end, pp, prims
        )
    elif r < spec.p_defect + spec.p_borderline_ok:
        u_end, defects = _borderline(rng, spec, kind, u_end, pp, ng=False)
    is_a = kind == ANODE
    L = len(kind)

    # Tip shapes: anodes rounded or needle-like, cathodes blunt.
    if cell.needle:
        r_tip = np.where(is_a, h * rng.uniform(0.08, 0.25, L), h * rng.uniform(0.7, 1.0, L))
        taper = np.where(is_a, h * rng.uniform(1.5, 4.0, L), 0.0)
    else:
        r_tip = h * np.where(is_a, rng.uniform(0.75, 1.0, L), rng.uniform(0.7, 1.0, L))
        taper = np.zeros(L)
    r_tip = np.maximum(r_tip, 0.3)
    taper = np.maximum(taper, 1.25 * (h - r_tip) + 0.05)

    # Small bends at anode ends, within the free space left past the cathode ends.
    free = np.full(L, np.inf)
    for off in (-1, 1):
        nb = np.clip(np.arange(L) + off, 0, L - 1)
        free = np.minimum(free, np.where(nb != np.arange(L), u_end - u_end[nb], np.inf))
    bends = is_a & (rng.random(L) < spec.p_bend) & (free > 6)
    bend_len = np.where(bends, np.minimum(rng.uniform(8, 40, L), 0.6 * free), 1.0)
    toward = np.sign((L - 1) / 2 - np.arange(L)) * np.where(rng.random(L) < 0.75, 1, -1)
    bend_amp = np.where(bends, toward * rng.uniform(0.03, 0.25, L) * p, 0.0)
    tau = np.where(is_a, cell.tau[0], cell.tau[1]) * (1 + rng.normal(0, 0.03, L))
    # The body is dark: separators soaked in electrolyte fill the gaps around each cathode
    # and end a little past it; beyond the cathode ends only the anodes remain.
    gap = np.diff(v) - h[1:] - h[:-1]
    nb_gap = np.minimum(np.r_[gap, np.inf], np.r_[np.inf, gap])
    fill = np.where(kind == CATHODE, np.clip(nb_gap, 0.0, None) + rng.uniform(0.0, 0.5), 0.0)
    fill_tau = np.where(kind == CATHODE, cell.fill_tau, 0.0)

    # Place the tip band in the canonical frame and the rotation about its centre.
    theta = float(rng.uniform(-spec.rotation_deg, spec.rotation_deg)) if rotation_deg is None else float(rotation_deg)
    R = _rot(90.0 * orient)
    c_can = np.array([(Wc - 1) / 2, (Hc - 1) / 2])
    c_img = np.array([(W - 1) / 2, (H - 1) / 2])
    margin = 20.0 + 0.1 * p
    for _ in range(200):
        u0 = rng.uniform(0.18, 0.8) * Wc
        v0 = rng.uniform(0, max(Hc - (v[-1] - v[0]) - 2 * margin, 1.0)) + margin
        uu, vv = u_end + u0, v + v0 - v[0]
        centre = np.array([0.5 * (uu.min() + uu.max()), 0.5 * (vv[0] + vv[-1])])
        Rt = _rot(theta)
        lin = R @ Rt
        # canonical -> (theta about the band centre) -> orientation about the frame centre
        off = R @ (Rt @ (-centre) + centre - c_can) + c_img
        affine = np.hstack([lin, off[:, None]])
        tips = apply_affine(affine, np.stack([uu, vv], 1))
        outer = apply_affine(
            affine,
            np.array([[uu.max() + 12, vv[0] - 12], [uu.max() + 12, vv[-1] + 12]]),
        )
        allp = np.vstack([tips, outer])
        if (
            allp[:, 0].min() >= margin
            and allp[:, 1].min() >= margin
            and allp[:, 0].max() <= W - 1 - margin
            and allp[:, 1].max() <= H - 1 - margin
            and uu.max() + 40 < Wc
        ):
            break
    else:
        raise RuntimeError(f"cannot place a {L}-layer stack in a {W}x{H} frame")

    scene = Scene(
        size=(W, H),
        affine=affine,
        orientation=orient,
        rotation_deg=theta,
        pixel_pitch_um=pp,
        kind=kind,
        v=vv,
        u_end=uu,
        h=h,
        r_tip=r_tip,
        taper=taper,
        bend_amp=bend_amp,
        bend_len=bend_len,
        tau=tau,
        fill=fill,
        fill_tau=fill_tau,
        fill_ext=rng.uniform(-1.0, 3.0, L),
        limits_um=spec.limits_um,
        defects=defects,
    )
    for prim in prims:  # defect shapes were built relative to the unplaced stack
        _shift_prim(prim, u0, v0 - v[0])
    scene.prims = prims
    _add_interferences(rng, spec, scene, (Wc, Hc))
    scene.imaging = _sample_imaging(rng, spec, scene)
    return scene


def _shift_prim(prim: dict, du: float, dv: float) -> None:
    for key in ("a", "b", "c"):  # defect shapes are capsules/discs/boxes
        if key in prim:
            prim[key] = (prim[key][0] + du, prim[key][1] + dv)


def _borderline(rng, spec, kind, u_end, pp, ng: bool):
    """Move one interior anode so that one of its overhangs is within 100 um of a limit."""
    an = np.flatnonzero(kind == ANODE)[1:-1]
    if len(an) == 0:
        return u_end, []
    a = int(rng.choice(an))
    lo, hi = spec.limits_um
    d = float(rng.uniform(10, 100))
    low_side = rng.random() < 0.6
    if low_side:
        target = lo - d if ng else lo + d
        ref = max(u_end[a - 1], u_end[a + 1])  # the tighter side sets the minimum
    else:
        target = hi + d if ng else hi - d
        ref = min(u_end[a - 1], u_end[a + 1])  # the looser side sets the maximum
    u_end = u_end.copy()
    u_end[a] = ref + target / pp
    if not ng:  # keep the other side inside the limits too
        other = min(u_end[a - 1], u_end[a + 1]) if low_side else max(u_end[a - 1], u_end[a + 1])
        ov_other = (u_end[a] - other) * pp
        if not lo < ov_other < hi:
            return u_end, [{"kind": "borderline", "layer": a, "target_um": target, "ok": False}]
    return u_end, [{"kind": "borderline", "layer": a, "target_um": round(target, 2), "ok": not ng}]


def _inject_defect(rng, spec, kind, v, h, u_end, pp, prims):
    """One NG defect: missing layer, short/negative/long overhang, folded tip, or borderline."""
    L = len(kind)
    lo, hi = spec.limits_um
    what = str(rng.choice(["missing", "short", "negative", "long", "folded", "borderline"]))
    an = np.flatnonzero(kind == ANODE)[1:-1]
    if what == "missing" or len(an) == 0:
        i = int(rng.integers(1, L - 1))
        keep = np.arange(L) != i
        d = [{"kind": "missing_layer", "layer": i, "was": "anode" if kind[i] == ANODE else "cathode"}]
        return kind[keep], v[keep], h[keep], u_end[keep], d, prims
    if what == "borderline":
        u_end, d = _borderline(rng, spec, kind, u_end, pp, ng=True)
        return kind, v, h, u_end, d, prims
    a = int(rng.choice(an))
    ref = max(u_end[a - 1], u_end[a + 1])
    u_end = u_end.copy()
    if what == "short":
        ov = rng.uniform(150, lo - 120)
    elif what == "negative":
        ov = rng.uniform(-400, -40)
    elif what == "long":
        ov = rng.uniform(hi + 120, hi + 600)
        ref = min(u_end[a - 1], u_end[a + 1])
    else:  # folded: the end is folded back on itself, the extreme point moves inward
        ov = rng.uniform(100, lo - 150)
    u_end[a] = ref + ov / pp
    d = [{"kind": what + ("_tip" if what == "folded" else "_overhang"), "layer": a,
          "overhang_um": round(float(ov), 2)}]
    if what == "folded":
        hf = 0.55 * h[a]
        side = 1.0 if rng.random() < 0.5 else -1.0
        fv = v[a] + side * (h[a] + 0.8 * hf)
        length = min(rng.uniform(0.3, 0.8) * (lo / pp), max(u_end[a] - ref - 2, 3.0) + rng.uniform(5, 20))
        prims.append({"shape": "capsule", "a": (u_end[a] - hf, fv), "b": (u_end[a] - length, fv),
                      "r": hf, "tau": "anode"})
    return kind, v, h, u_end, d, prims


def _add_interferences(rng, spec: PhantomSpec, sc: Scene, can_size: tuple[int, int]) -> None:
    """Distractors with their own edges and corners, placed so they never hide a tip."""
    Wc, Hc = can_size
    is_a = sc.kind == ANODE
    tau_a = float(np.median(sc.tau[is_a]))
    u_max, v0, v1 = sc.u_end.max(), sc.v[0] - sc.h[0], sc.v[-1] + sc.h[-1]
    p = float(np.median(np.diff(sc.v)))
    prims = sc.prims
    for prim in prims:  # resolve material names of defect shapes
        if prim.get("tau") == "anode":
            prim["tau"] = tau_a
    if rng.random() < spec.p_casing:  # can wall facing the tips, plus the wall along the stack
        gap, thick = rng.uniform(25, 120), rng.uniform(15, 60)
        t = rng.uniform(1.5, 3.0)
        ua = u_max + gap
        side = 1 if rng.random() < 0.5 else -1
        v_wall = (v1 + rng.uniform(15, 60)) if side > 0 else (v0 - rng.uniform(15, 60))
        w2 = rng.uniform(15, 50)
        lo, hi = (None, v_wall + w2) if side > 0 else (v_wall - w2, None)
        prims.append({"shape": "band", "axis": "u", "at": ua + thick / 2, "half": thick / 2,
                      "lo": lo, "hi": hi, "tau": t})
        prims.append({"shape": "band", "axis": "v", "at": v_wall + side * w2 / 2, "half": w2 / 2,
                      "lo": None, "hi": ua, "tau": t * 0.8})
    if rng.random() < spec.p_tray:  # dark bar touching the outermost layer
        side = 1 if rng.random() < 0.5 else -1
        edge = (v1 if side > 0 else v0) + side * rng.uniform(0.0, 2.0)
        th = rng.uniform(20, 80)
        prims.append({"shape": "band", "axis": "v", "at": edge + side * th / 2, "half": th / 2,
                      "lo": None, "hi": u_max + rng.uniform(-40, 60), "tau": rng.uniform(2.0, 4.0)})
    if rng.random() < spec.p_streaks:  # separator shadows and wispy strands past the tips
        ext = rng.uniform(5, 40)
        tau_s = rng.uniform(0.06, 0.22)
        a_idx = np.flatnonzero(is_a)
        for i in range(len(sc.kind) - 1):
            vm = 0.5 * (sc.v[i] + sc.v[i + 1])
            ue = max(sc.u_end[i], sc.u_end[i + 1]) + ext * rng.uniform(0.6, 1.0)
            prims.append({"shape": "capsule", "a": (ue - 4 * ext - 40, vm), "b": (ue, vm),
                          "r": rng.uniform(0.25, 0.6), "tau": tau_s})
        for i in rng.choice(a_idx, size=min(len(a_idx), int(rng.integers(1, 4))), replace=False):
            tip = (sc.u_end[i] + 1.5, sc.v[i] + sc.bend_amp[i])
            ang = rng.normal(0, 0.25)
            ln = rng.uniform(6, 25)
            prims.append({"shape": "capsule", "a": tip, "b": (tip[0] + ln * math.cos(ang), tip[1] + ln * math.sin(ang)),
                          "r": 0.3, "tau": rng.uniform(0.1, 0.3)})
    if rng.random() < spec.p_fork:  # split tips: a thin prong that ends short of the tip
        a_idx = np.flatnonzero(is_a)
        for i in rng.choice(a_idx, size=min(len(a_idx), int(rng.integers(1, 5))), replace=False):
            rp = max(0.25 * sc.h[i], 0.5)
            ln = rng.uniform(6, 20)
            short = rp + rng.uniform(1.5, 5.0)
            s = 1 if rng.random() < 0.5 else -1
            vt = sc.v[i] + sc.bend_amp[i]
            spread = s * min(rng.uniform(0.6, 1.2) * (sc.h[i] + rp), 0.45 * p + sc.h[i])
            prims.append({"shape": "capsule", "a": (sc.u_end[i] - short - ln, vt),
                          "b": (sc.u_end[i] - short, vt + spread), "r": rp, "tau": float(sc.tau[i])})
    if rng.random() < spec.p_occluder:  # grey block; semi-transparent, may overlap the tips
        prims.append({"shape": "box", "c": (u_max + rng.uniform(-200, 50), 0.5 * (v0 + v1) + rng.uniform(-200, 200)),
                      "half": (rng.uniform(80, 300), rng.uniform(80, 300)), "tau": rng.uniform(0.25, 0.4)})
    # fixtures, clamps and screws elsewhere in the frame, away from the tip band
    n_fix = int(rng.integers(spec.fixtures[0], spec.fixtures[1] + 1))
    band = np.array([sc.u_end.min() - 60, v0 - 40, u_max + 60, v1 + 40])
    for _ in range(n_fix):
        screw = rng.random() < 0.5
        rad = rng.uniform(15, 70)
        hw, hh = rng.uniform(0.6, 1.6) * rad, rng.uniform(0.4, 1.2) * rad
        reach = rad if screw else math.hypot(hw, hh)
        for _try in range(30):
            c = np.array([rng.uniform(0, Wc), rng.uniform(0, Hc)])
            # not over the stack (body or tip band): fixtures sit elsewhere in the frame
            if not (c[0] < band[2] + reach and band[1] - reach < c[1] < band[3] + reach):
                break
        else:
            continue
        if screw:  # head disc, darker rim, slot
            t = rng.uniform(1.5, 3.5)
            prims.append({"shape": "disc", "c": tuple(c), "r": rad, "tau": t})
            prims.append({"shape": "ring", "c": tuple(c), "r": rad * 0.8, "w": rad * 0.06, "tau": 0.4})
            prims.append({"shape": "box", "c": tuple(c), "half": (rad * 0.7, rad * 0.12),
                          "angle": rng.uniform(0, math.pi), "tau": -0.5 * t})
        else:  # fixture block or clamp with a hole
            t = rng.uniform(0.6, 3.0)
            prims.append({"shape": "box", "c": tuple(c), "half": (hw, hh), "angle": rng.uniform(0, math.pi),
                          "round": rng.uniform(0, 4), "tau": t})
            if rng.random() < 0.5:
                prims.append({"shape": "disc", "c": tuple(c), "r": 0.3 * min(hw, hh), "tau": -0.8 * t})


def _sample_imaging(rng, spec: PhantomSpec, sc: Scene) -> dict:
    W, H = sc.size
    im = {
        "dose": _u(rng, spec.dose),
        "psf_sigma": _u(rng, spec.psf_sigma),
        "scatter": _u(rng, spec.scatter),
        "scatter_sigma": rng.uniform(0.02, 0.05) * min(W, H),
        "read_noise": _u(rng, spec.read_noise_adu),
        "heel": _u(rng, spec.heel),
        "heel_dir": float(rng.uniform(0, 2 * math.pi)),
        "full_scale": 16383 if rng.random() < spec.p_14bit else 65535,
        "bg_frac": rng.uniform(0.45, 0.8),
        "offset_adu": rng.uniform(50, 1500),
        "window8": rng.uniform(215, 290),
        "jpeg": int(rng.integers(spec.jpeg_quality[0], spec.jpeg_quality[1] + 1))
        if rng.random() < spec.p_jpeg else 0,
        "fov": None,
    }
    if rng.random() < spec.p_fov:
        cx = (W - 1) / 2 + rng.uniform(-0.03, 0.03) * W
        cy = (H - 1) / 2 + rng.uniform(-0.03, 0.03) * H
        rad = rng.uniform(0.535, 0.565) * min(W, H)
        tips = sc.tips_image()
        if np.hypot(tips[:, 0] - cx, tips[:, 1] - cy).max() < rad - 25:
            im["fov"] = (cx, cy, rad)
    return im


# --------------------------------------------------------------------------- rendering
def _coverage(d: np.ndarray, spacing: float) -> np.ndarray:
    """Signed distance (negative inside) -> area coverage of one sample of width ``spacing``."""
    return np.clip(0.5 - d * (1.0 / spacing), 0.0, 1.0)


def _layer_sdf(U, V, sc: Scene, k: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """SDF of layer ``k`` (per sample) at ``(U, V)``: a half-infinite strip whose end is an
    uneven capsule (radius ``h`` tapering to ``r_tip``), sheared sideways by the end bend.

    Bend and cap are evaluated only on samples within reach of a layer end; elsewhere the
    straight strip gives the same coverage.  Returns ``(sdf, U - u_end)``.
    """
    prm = sc.layer_params()  # (8, L) float32
    uend, vc, h = prm[0][k], prm[4][k], prm[1][k]
    past_end = U - uend
    d = np.abs(V - vc)
    d -= h
    np.maximum(d, past_end + sc.reach(), out=d)  # far from the end: a plain strip
    near = np.nonzero(past_end > -sc.reach() - spacing)
    if near[0].size:
        kn = k[near]
        hn, rn, ltn, vn, amp, bl = (prm[i][kn] for i in (1, 2, 3, 4, 5, 6))
        pe = past_end[near]
        bend = amp * np.square(np.clip((pe + bl) / bl, 0.0, 1.0))
        dvn = np.abs(V[near] - vn - bend)
        pyn = pe + rn + ltn  # along the axis, from circle A (radius h) towards the tip
        # Uneven capsule (I. Quilez): circles of radius h at py=0 and r at py=lt.
        b = (hn - rn) / ltn
        a = np.sqrt(1.0 - b * b)
        kk = -b * dvn + a * pyn
        d_a = np.sqrt(dvn * dvn + pyn * pyn) - hn
        d_b = np.sqrt(dvn * dvn + np.square(pyn - ltn)) - rn
        d_mid = a * dvn + b * pyn - hn
        cap = np.where(kk < 0, d_a, np.where(kk > a * ltn, d_b, d_mid))
        d[near] = np.minimum(np.maximum(dvn - hn, pyn), cap)
    return d, past_end


def _prim_sdf(U, V, prim: dict) -> np.ndarray:
    shape = prim["shape"]
    if shape == "capsule":
        ax, ay = prim["a"]
        bx, by = prim["b"]
        px, py = U - ax, V - ay
        dx, dy = bx - ax, by - ay
        t = np.clip((px * dx + py * dy) / max(dx * dx + dy * dy, 1e-12), 0.0, 1.0)
        return np.hypot(px - t * dx, py - t * dy) - prim["r"]
    if shape == "band":  # slab |u - c| <= half (or v), limited to [lo, hi] along the other axis
        x, y = (U, V) if prim["axis"] == "u" else (V, U)
        d = np.abs(x - prim["at"]) - prim["half"]
        if prim.get("lo") is not None:
            np.maximum(d, prim["lo"] - y, out=d)
        if prim.get("hi") is not None:
            np.maximum(d, y - prim["hi"], out=d)
        return d
    cx, cy = prim["c"]
    if shape == "disc":
        return np.hypot(U - cx, V - cy) - prim["r"]
    if shape == "ring":
        return np.abs(np.hypot(U - cx, V - cy) - prim["r"]) - prim["w"]
    if shape == "box":
        ang = prim.get("angle", 0.0)
        c, s = math.cos(ang), math.sin(ang)
        px, py = U - cx, V - cy
        qx = np.abs(c * px + s * py) - (prim["half"][0] - prim.get("round", 0.0))
        qy = np.abs(-s * px + c * py) - (prim["half"][1] - prim.get("round", 0.0))
        out = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
        return out + np.minimum(np.maximum(qx, qy), 0) - prim.get("round", 0.0)
    raise ValueError(f"unknown primitive {shape!r}")


def _prim_extent(prim: dict) -> np.ndarray:
    """Canonical-frame points whose convex hull contains the primitive, ``(4, 2)``."""
    if prim["shape"] == "capsule":
        ends = np.array([prim["a"], prim["b"]])
        e = prim["r"] + 2
        return np.vstack([ends.min(0) - e, ends.max(0) + e, [ends[:, 0].min() - e, ends[:, 1].max() + e],
                          [ends[:, 0].max() + e, ends[:, 1].min() - e]])
    if prim["shape"] == "band":
        big = 1e5
        lo = prim["lo"] if prim.get("lo") is not None else -big
        hi = prim["hi"] if prim.get("hi") is not None else big
        a0, a1 = prim["at"] - prim["half"] - 2, prim["at"] + prim["half"] + 2
        pts = np.array([[a0, lo - 2], [a1, lo - 2], [a0, hi + 2], [a1, hi + 2]])
        return pts if prim["axis"] == "u" else pts[:, ::-1]
    R = (np.hypot(*prim["half"]) if prim["shape"] == "box" else prim["r"] + prim.get("w", 0)) + 2
    return np.array(prim["c"]) + np.array([[-R, -R], [R, R], [R, -R], [-R, R]])


def _prim_rects(scene: Scene, ss: int) -> list[tuple[dict, int, int, int, int]]:
    """Each primitive with the supersample-grid rectangle ``(y0, y1, x0, x1)`` it can touch."""
    W, H = scene.size
    out = []
    for prim in scene.prims:
        xy = apply_affine(scene.affine, _prim_extent(prim))
        x0, y0 = np.floor((xy.min(0) + 0.5) * ss).astype(int)
        x1, y1 = np.ceil((xy.max(0) + 0.5) * ss).astype(int)
        x0, x1, y0, y1 = max(x0, 0), min(x1, W * ss), max(y0, 0), min(y1, H * ss)
        if x0 < x1 and y0 < y1:
            out.append((prim, y0, y1, x0, x1))
    return out


def _layers_absorbed(U, V, scene: Scene, spacing: float, out: np.ndarray) -> None:
    """Add the fraction of the beam absorbed by the electrode layers at samples ``(U, V)``
    to ``out`` (same shape).

    Every sample lies between two consecutive layer centre lines (bends stay within the
    gap), so only those two layers can cover it; a layer, its shell and its neighbour are
    disjoint, so their absorbed fractions ``coverage * (1 - exp(-tau))`` add up.
    """
    L = len(scene.kind)
    idx = np.searchsorted(scene.v.astype(np.float32), V).astype(np.int32)
    k1 = np.minimum(idx, L - 1)
    k0 = np.maximum(idx - 1, 0)
    absorb = (1.0 - np.exp(-scene.tau)).astype(np.float32)
    shell_absorb = (1.0 - np.exp(-scene.fill_tau)).astype(np.float32)
    fill = scene.fill.astype(np.float32)
    fill_ext = scene.fill_ext.astype(np.float32)
    for k in (k0, k1):
        d, past_end = _layer_sdf(U, V, scene, k, spacing)
        cov = _coverage(d, spacing)
        # separator + electrolyte wrapped around cathodes: a dilated, much weaker shell that
        # ends ``fill_ext`` past the cathode's end
        shell = _coverage(np.maximum(d - fill[k], past_end - fill_ext[k]), spacing)
        shell -= cov
        np.maximum(shell, 0.0, out=shell)
        contrib = absorb[k] * cov
        contrib += shell_absorb[k] * shell
        if k is k1:
            contrib[k0 == k1] = 0.0
        out += contrib


def transmission(scene: Scene, ss: int = 2, clean: bool = False, block: int = 32) -> np.ndarray:
    """Ideal detector-plane transmission per pixel, ``(H, W) float32`` in ``[0, 1]``.

    Each pixel is the mean of ``ss x ss`` supersamples.  A supersample's transmission is
    linear in the covered fraction ``c`` of each material, ``1 - c * (1 - exp(-tau))``
    (Beer-Lambert on the covered part, open beam on the rest), and overlapping materials
    multiply; so the rendered area of a shape does not depend on ``ss``.
    Supersample ``(a, b)`` of pixel ``[i, j]`` sits at ``x = j + (b + 0.5)/ss - 0.5``.
    Rendered in blocks of ``block`` pixel rows so the temporaries stay cache-sized.
    ``clean`` renders only the electrode layers (no distractors).
    """
    W, H = scene.size
    f32 = np.float32
    m = invert_affine(scene.affine)
    spacing = 1.0 / ss
    xs = (np.arange(W * ss, dtype=np.float64) + 0.5) / ss - 0.5
    ux, vx = (m[0, 0] * xs).astype(f32), (m[1, 0] * xs).astype(f32)
    rects = [] if clean else _prim_rects(scene, ss)
    pad = float(scene.h.max() + scene.fill.max() + np.abs(scene.bend_amp).max() + 2)
    v_lo, v_hi, u_hi = scene.v[0] - pad, scene.v[-1] + pad, scene.u_end.max() + 2
    out = np.empty((H, W), f32)
    for r0 in range(0, H, block):
        r1 = min(H, r0 + block)
        ys = (np.arange(r0 * ss, r1 * ss, dtype=np.float64) + 0.5) / ss - 0.5
        U = ux[None, :] + (m[0, 1] * ys + m[0, 2]).astype(f32)[:, None]
        V = vx[None, :] + (m[1, 1] * ys + m[1, 2]).astype(f32)[:, None]
        absorbed = np.zeros(U.shape, f32)
        corners_u = U[[0, 0, -1, -1], [0, -1, 0, -1]]
        corners_v = V[[0, 0, -1, -1], [0, -1, 0, -1]]
        if corners_v.max() >= v_lo and corners_v.min() <= v_hi and corners_u.min() <= u_hi:
            _layers_absorbed(U, V, scene, spacing, absorbed)
        t = np.subtract(1.0, absorbed, out=absorbed)
        for prim, y0, y1, x0, x1 in rects:
            y0, y1 = max(y0, r0 * ss) - r0 * ss, min(y1, r1 * ss) - r0 * ss
            if y0 >= y1:
                continue
            sl = (slice(y0, y1), slice(x0, x1))
            cov = _coverage(_prim_sdf(U[sl], V[sl], prim), spacing)
            t[sl] *= 1.0 - cov * f32(1.0 - math.exp(-prim["tau"]))
        np.maximum(t, 0.0, out=t)
        out[r0:r1] = t.reshape(r1 - r0, ss, W, ss).mean(axis=(1, 3), dtype=f32)
    return out


def _illumination(scene: Scene) -> np.ndarray:
    """Open-beam flux shape ``(H, W) float32``: heel-effect gradient, intensifier vignetting and
    circular field of view."""
    W, H = scene.size
    im = scene.imaging
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    if "view" in im:  # a crop of the frame: evaluate the frame's illumination there
        m = invert_affine(im["view"])
        x, y = (m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2])
        W, H = im["frame_size"]
    d = ((x - W / 2) * math.cos(im["heel_dir"]) + (y - H / 2) * math.sin(im["heel_dir"])) / (0.5 * max(W, H))
    flux = 1.0 + im["heel"] * 0.5 * d
    if im["fov"] is not None:
        cx, cy, rad = im["fov"]
        rr = np.hypot(x - cx, y - cy) / rad
        flux *= (1.0 - 0.25 * rr**2) * np.clip((1.0 - rr) * rad / 2.0 + 0.5, 0.0, 1.0)
    return flux.astype(np.float32)


def render(scene: Scene, rng: np.random.Generator, bits: int = 16, ss: int = 2) -> np.ndarray:
    """Render the detector image, ``(H, W)`` uint16 (``bits=16``) or uint8 (``bits=8``)."""
    if bits not in (8, 16):
        raise ValueError("bits must be 8 or 16")
    im = scene.imaging
    flux = transmission(scene, ss) * _illumination(scene)
    # Detector PSF: sharp core plus a wide low-amplitude scatter halo (computed at 1/4 scale).
    core = cv2.GaussianBlur(flux, (0, 0), im["psf_sigma"])
    small = cv2.resize(flux, None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA)
    halo = cv2.GaussianBlur(small, (0, 0), im["scatter_sigma"] / 4)
    halo = cv2.resize(halo, scene.size, interpolation=cv2.INTER_LINEAR)
    flux = (1 - im["scatter"]) * core + im["scatter"] * halo
    photons = rng.poisson(np.maximum(flux, 0) * im["dose"]).astype(np.float32)
    full = im["full_scale"]
    gain = (full * im["bg_frac"] - im["offset_adu"]) / im["dose"]
    adu = im["offset_adu"] + gain * photons + rng.normal(0, im["read_noise"], photons.shape).astype(np.float32)
    raw = np.clip(np.rint(adu), 0, full).astype(np.uint16)
    if bits == 16:
        return raw
    return window_8bit(raw, im["offset_adu"], gain * im["dose"], im["window8"], im["jpeg"])


def window_8bit(raw: np.ndarray, offset: float, open_beam: float, white: float, jpeg: int = 0) -> np.ndarray:
    """Low-brightness 8-bit window like the public X-ray PBD images: the open beam maps to
    ``white`` grey levels (>255 clips the background), then optional JPEG at quality ``jpeg``."""
    img = np.clip((raw.astype(np.float32) - offset) * (white / open_beam), 0, 255)
    img = np.rint(img).astype(np.uint8)
    if jpeg:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg)])
        img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    return img


def crop_scene(scene: Scene, view: np.ndarray, size: tuple[int, int]) -> Scene:
    """The same scene seen through ``view``, a ``(2, 3)`` frame -> crop affine, rendered at
    ``size`` ``(w, h)``: geometry, illumination and PSF are the frame's, sampled on the crop's
    grid (noise is per crop pixel).  Its ``tips_image()`` are crop coordinates."""
    view = np.asarray(view, np.float64)
    s = math.sqrt(abs(np.linalg.det(view[:, :2])))
    im = dict(scene.imaging)
    if "view" in im:
        raise ValueError("scene is already a crop")
    im.update(view=view, frame_size=scene.size, psf_sigma=im["psf_sigma"] * s,
              scatter_sigma=im["scatter_sigma"] * s)
    lin = view[:, :2] @ scene.affine[:, :2]
    off = view[:, :2] @ scene.affine[:, 2] + view[:, 2]
    return replace(scene, affine=np.hstack([lin, off[:, None]]), size=tuple(size), imaging=im)


# --------------------------------------------------------------------------- public API
@dataclass
class Phantom:
    """One rendered frame: ``image`` ``(H, W)`` uint8/uint16, its ``labels`` and ``scene``."""

    image: np.ndarray
    labels: dict
    scene: Scene


def get_spec(preset: str | PhantomSpec) -> PhantomSpec:
    if isinstance(preset, PhantomSpec):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}") from None


def make_phantom(
    seed: int | np.random.SeedSequence,
    preset: str | PhantomSpec = "normal",
    size: tuple[int, int] = (1024, 1024),
    bits: int = 16,
    orientation: int | None = None,
    ss: int = 2,
) -> Phantom:
    """Deterministic from ``seed``: the same seed, preset, size and bits give the same bytes."""
    spec = get_spec(preset)
    ss_seq = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(int(seed))
    geo_seq, noise_seq = ss_seq.spawn(2)
    scene = sample_scene(np.random.default_rng(geo_seq), spec, size, orientation)
    image = render(scene, np.random.default_rng(noise_seq), bits, ss)
    return Phantom(image, scene.labels(), scene)


def make_cell(
    seed: int | np.random.SeedSequence,
    preset: str | PhantomSpec = "normal",
    size: tuple[int, int] = (1024, 1024),
    bits: int = 16,
    ss: int = 2,
) -> list[Phantom]:
    """The four corners of one cell (tips right, down, left, up), sharing layer count, pitch,
    pixel pitch, materials and tip style."""
    spec = get_spec(preset)
    ss_seq = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(int(seed))
    cell_seq, *corner_seqs = ss_seq.spawn(5)
    cell = sample_cell(np.random.default_rng(cell_seq), spec, size)
    out = []
    for corner, cs in enumerate(corner_seqs):
        geo_seq, noise_seq = cs.spawn(2)
        scene = sample_scene(np.random.default_rng(geo_seq), spec, size, corner, cell)
        out.append(Phantom(render(scene, np.random.default_rng(noise_seq), bits, ss), scene.labels(), scene))
    return out


def draw_labels(image: np.ndarray, labels: dict) -> np.ndarray:
    """BGR uint8 preview with anode tips (red) and cathode tips (green) drawn on top."""
    img = image
    if img.dtype != np.uint8:
        lo, hi = np.percentile(img, (0.5, 99.5))
        img = np.clip((img.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1)), 0, 255).astype(np.uint8)
    out = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    sh = 4
    for key, colour in (("anode", (40, 40, 255)), ("cathode", (40, 220, 40))):
        for x, y in labels[key]:
            c = (int(round(x * (1 << sh))), int(round(y * (1 << sh))))
            cv2.circle(out, c, 3 << sh, colour, 1, cv2.LINE_AA, shift=sh)
    cv2.putText(out, f"{labels['verdict']} {labels['tip_direction']}", (10, 30),
                cv2.FONT_HERSHEY_SIMPLEX, 0.9, (0, 200, 255) if labels["verdict"] == "NG" else (0, 200, 0), 2)
    return out


__all__ = [
    "ANODE", "CATHODE", "DIRECTIONS", "PRESETS", "PhantomSpec", "Scene", "Phantom", "CellParams",
    "sample_cell", "sample_scene", "crop_scene", "render", "transmission", "make_phantom",
    "make_cell", "draw_labels", "apply_affine", "invert_affine", "window_8bit", "get_spec",
]
