"""``polecheck eval``: the daemon's judging path (``daemon.pipeline``) on a labelled set,
scored with the paper's metrics, fusion and corner-count ablation in one run.

Sources: a folder in the project's dataset format (``NAME.png`` + ``NAME.json``,
docs/dataset.md), a folder in the X-ray PBD layout (images beside ``neg_location/`` and
``pos_location/`` with ``NAME.npy`` tip arrays: negative electrode = anode, positive =
cathode), or ``phantoms:PRESET:N[:ROOT]`` (fresh phantoms rendered in the workers).

Metrics, per variant (fusion off/on x N corners); tips are matched to the truth of their
class one-to-one, nearest first, within ``MATCH_PX``:

- NME: mean matched tip error over the frame's layer pitch (median distance between
  stacking neighbours of the true tips), averaged over frames, in percent.
- PCK@t: share of true tips with a matched prediction within t px (0.5, 1, 2).
- PCS: share of frames that are *correct*: anode and cathode counts right and every true
  tip matched within 2 px.
- count accuracy; anode / cathode location MAE (matched tips, px); overhang MAE (um) over
  the frames with the right counts, cathode sides finite in both.
- verdicts: escapes (truth NG, judged OK), overkill (truth OK, judged NG).
- stage times (median ms).

Note:
    Points ``(N, 2)`` image ``(x, y)``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from .evaluate import PIPELINE_SEEDS, match_points
from .fusion import FusionParams

MATCH_PX = 3.0
PCK_PX = (0.5, 1.0, 2.0)
PCS_PX = 2.0


# --------------------------------------------------------------------------- sources
def list_tasks(dataset: str, n: int | None = None) -> tuple[list[tuple], str]:
    """``(tasks, description)``: one picklable task per frame of ``dataset``."""
    if dataset.startswith("phantoms:"):
        parts = dataset.split(":")
        if len(parts) < 2 or parts[1] not in PIPELINE_SEEDS:
            raise ValueError(f"{dataset}: use phantoms:PRESET[:N[:ROOT]] with PRESET in {sorted(PIPELINE_SEEDS)}")
        preset = parts[1]
        count = int(parts[2]) if len(parts) > 2 and parts[2] else (n or 100)
        root = int(parts[3]) if len(parts) > 3 else PIPELINE_SEEDS[preset]
        return [("phantom", preset, root, i) for i in range(count)], f"phantoms {preset}, seed root {root}"
    d = Path(dataset)
    if not d.is_dir():
        raise ValueError(f"{dataset}: not a folder and not phantoms:PRESET:N")
    if (d / "neg_location").is_dir() and (d / "pos_location").is_dir():
        names = sorted(p.stem for p in (d / "neg_location").glob("*.npy") if (d / "pos_location" / p.name).exists())
        tasks = [("pbd", str(d), name) for name in names]
        desc = f"X-ray PBD layout {d}"
    else:
        from .dataset import sample_names

        tasks = [("folder", str(d), name) for name in sample_names(d)]
        desc = f"dataset {d}"
    if not tasks:
        raise ValueError(f"{dataset}: no labelled frames")
    return tasks[:n] if n else tasks, desc


def _find_image(d: Path, name: str) -> Path:
    for sub in ("", "images", "image", "imgs"):
        for ext in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
            p = d / sub / f"{name}{ext}"
            if p.exists():
                return p
    raise ValueError(f"{d}: no image for {name}")


def load_task(task: tuple, pixel_pitch_um: float | None) -> tuple[str, np.ndarray, dict]:
    """``(name, image (H, W), labels)``; PBD labels have no verdict (the truth's verdict is
    then the rules applied to the labelled tips) and take ``pixel_pitch_um`` from the run."""
    import cv2

    kind = task[0]
    if kind == "phantom":
        from .phantom import make_phantom

        _, preset, root, i = task
        ph = make_phantom(np.random.SeedSequence([root, i]), preset, (1024, 1024), 16)
        return f"{preset}_{i:05d}", ph.image, ph.labels
    if kind == "folder":
        from .dataset import read_sample

        s = read_sample(task[1], task[2])
        return s.name, s.image, s.labels
    d, name = Path(task[1]), task[2]
    img = cv2.imread(str(_find_image(d, name)), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"{name}: unreadable image")
    if img.ndim == 3:
        img = img[..., 0]
    labels = {"anode": np.load(d / "neg_location" / f"{name}.npy").reshape(-1, 2).tolist(),
              "cathode": np.load(d / "pos_location" / f"{name}.npy").reshape(-1, 2).tolist(),
              "pixel_pitch_um": pixel_pitch_um}
    return name, img, labels


# --------------------------------------------------------------------------- worker
_W: dict = {}


def _init(model_path: str, sha256: str | None, settings, fusions, corners, pixel_pitch_um) -> None:
    import cv2

    from .model import KeypointModel

    cv2.setNumThreads(1)
    _W.update(model=KeypointModel(model_path, sha256, providers=("CPUExecutionProvider",), threads=1),
              settings=settings, fusions=fusions, corners=corners, pitch=pixel_pitch_um)


def _layer_pitch(gt: np.ndarray, roi) -> float:
    if len(gt) < 2:
        return float("nan")
    v = np.sort(roi.to_canonical(gt)[:, 1]) if roi.ok else np.sort(gt[:, 1])
    return float(np.median(np.diff(v)))


def score_frame(pred_a: np.ndarray, pred_c: np.ndarray, gt_a: np.ndarray, gt_c: np.ndarray) -> dict:
    """Matched errors per class and the frame's count / PCS flags."""
    ea, _, _ = match_points(pred_a, gt_a, MATCH_PX)
    ec, _, _ = match_points(pred_c, gt_c, MATCH_PX)
    n_gt = len(gt_a) + len(gt_c)
    count_ok = len(pred_a) == len(gt_a) and len(pred_c) == len(gt_c)
    within = int((ea <= PCS_PX).sum() + (ec <= PCS_PX).sum())
    return {"err_a": ea.tolist(), "err_c": ec.tolist(), "n_gt": n_gt, "count_ok": count_ok,
            "pcs": bool(count_ok and within == n_gt)}


def _one(task: tuple) -> dict:
    from .pipeline import judge_frame, refine_and_judge, with_corners
    from .rules import judge_corner

    s = _W["settings"]
    name, img, labels = load_task(task, _W["pitch"])
    pitch = float(labels.get("pixel_pitch_um") or _W["pitch"] or 1.0)
    limits = replace(s.limits, min_um=float(labels["limits_um"][0]), max_um=float(labels["limits_um"][1])) \
        if "limits_um" in labels else s.limits
    s = replace(s, limits=limits)
    gt_a = np.asarray(labels["anode"], np.float64).reshape(-1, 2)
    gt_c = np.asarray(labels["cathode"], np.float64).reshape(-1, 2)
    base = judge_frame(img, pitch, _W["model"], replace(s, fusion=None))
    if "verdict" in labels:
        truth, gt_ov = labels["verdict"], labels.get("overhang_um")
    else:  # PBD: the rules on the labelled tips, in the detected ROI's frame
        tv = judge_corner(base.roi, gt_a, np.ones(len(gt_a)), gt_c, np.ones(len(gt_c)), pitch, limits)
        truth, gt_ov = (tv.verdict, tv.overhang_um.tolist()) if base.roi.ok else (None, None)
    gt_ov = None if gt_ov is None else np.array([[np.nan if x is None else x for x in r] for r in gt_ov], float)
    out = {"name": name, "truth": truth, "roi_ok": base.roi.ok, "pitch_px": _layer_pitch(np.vstack([gt_a, gt_c]), base.roi),
           "times": base.times, "variants": {}}
    for n_corners in _W["corners"]:
        roi = base.roi if not base.roi.ok or n_corners == s.roi.n_corners else with_corners(base.roi, img, s.roi, n_corners)
        for fusion in _W["fusions"]:
            r = refine_and_judge(roi, base.tips, pitch, replace(s, fusion=fusion), _W["model"].codec.stride, base.times)
            sc = score_frame(r.anodes, r.cathodes, gt_a, gt_c)
            ov_err: list[float] = []
            if gt_ov is not None and sc["count_ok"] and r.verdict.overhang_um.shape == gt_ov.shape:
                both = np.isfinite(gt_ov) & np.isfinite(r.verdict.overhang_um)
                ov_err = np.abs(r.verdict.overhang_um - gt_ov)[both].tolist()
            key = f"fusion={'on' if fusion is not None else 'off'},N={n_corners}"
            out["variants"][key] = {**sc, "verdict": r.verdict.verdict, "codes": sorted({x["code"] for x in r.verdict.reasons}),
                                    "ov_err": ov_err, "refine_s": r.times.get("refine", 0.0),
                                    "pred_a": np.round(r.anodes, 2).tolist(), "pred_c": np.round(r.cathodes, 2).tolist()}
    return out


# --------------------------------------------------------------------------- summary
def summarise(rows: list[dict], key: str) -> dict:
    """The metrics of one variant over all frames."""
    v = [r["variants"][key] for r in rows]
    ea = np.concatenate([np.asarray(x["err_a"]) for x in v] + [np.zeros(0)])
    ec = np.concatenate([np.asarray(x["err_c"]) for x in v] + [np.zeros(0)])
    e = np.r_[ea, ec]
    n_gt = sum(x["n_gt"] for x in v)
    nme = [np.mean(x["err_a"] + x["err_c"]) / r["pitch_px"] for x, r in zip(v, rows)
           if (x["err_a"] or x["err_c"]) and np.isfinite(r["pitch_px"]) and r["pitch_px"] > 0]
    ov = np.concatenate([np.asarray(x["ov_err"]) for x in v] + [np.zeros(0)])
    judged = [(r["truth"], x["verdict"]) for r, x in zip(rows, v) if r["truth"] in ("OK", "NG")]
    n_ng = sum(t == "NG" for t, _ in judged)
    n_ok = sum(t == "OK" for t, _ in judged)
    esc = sum(t == "NG" and p == "OK" for t, p in judged)
    over = sum(t == "OK" and p == "NG" for t, p in judged)
    return {
        "frames": len(rows), "tips": n_gt,
        "nme_pct": float(np.mean(nme) * 100) if nme else float("nan"),
        **{f"pck@{t:g}px": float((e <= t).sum() / max(n_gt, 1)) for t in PCK_PX},
        "pcs": float(np.mean([x["pcs"] for x in v])),
        "count_accuracy": float(np.mean([x["count_ok"] for x in v])),
        "mean_err_px": float(e.mean()) if len(e) else float("nan"),
        "p95_err_px": float(np.percentile(e, 95)) if len(e) else float("nan"),
        "anode_mae_px": float(ea.mean()) if len(ea) else float("nan"),
        "cathode_mae_px": float(ec.mean()) if len(ec) else float("nan"),
        "overhang_mae_um": float(ov.mean()) if len(ov) else float("nan"),
        "overhang_p95_um": float(np.percentile(ov, 95)) if len(ov) else float("nan"),
        "truth_ng": n_ng, "truth_ok": n_ok, "escapes": esc, "overkill": over,
        "overkill_rate": over / n_ok if n_ok else float("nan"),
        "refine_ms_median": float(np.median([x["refine_s"] for x in v]) * 1e3),
    }


def stage_times(rows: list[dict]) -> dict:
    out = {}
    for st in ("roi_corners", "keypoint_model", "verdict_rules"):
        t = [r["times"][st] for r in rows if st in r["times"]]
        if t:
            out[st] = {"median_ms": round(float(np.median(t)) * 1e3, 3), "p99_ms": round(float(np.percentile(t, 99)) * 1e3, 3)}
    return out


def markdown(summary: dict) -> str:
    cols = ["nme_pct", "pck@0.5px", "pck@1px", "pck@2px", "pcs", "count_accuracy", "mean_err_px", "p95_err_px",
            "anode_mae_px", "cathode_mae_px", "overhang_mae_um", "escapes", "overkill"]
    lines = [f"dataset: {summary['dataset']} ({summary['frames']} frames)", "",
             "| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k, m in summary["variants"].items():
        cells = [f"{m[c]:.4g}" if isinstance(m[c], float) else str(m[c]) for c in cols]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "stage times (ms): " + ", ".join(f"{k} {v['median_ms']} (p99 {v['p99_ms']})"
                                                   for k, v in summary["stage_times"].items())]
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], summary: dict, out: Path, worst: int = 8, pixel_pitch_um: float | None = None) -> list[str]:
    """PCK curves and error histograms per variant, overlays of the worst frames of the
    first variant.  Needs the ``eval`` extra (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    ts = np.linspace(0, 3, 61)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for k in summary["variants"]:
        v = [r["variants"][k] for r in rows]
        e = np.concatenate([np.r_[x["err_a"], x["err_c"]] for x in v] + [np.zeros(0)])
        n_gt = max(sum(x["n_gt"] for x in v), 1)
        ax1.plot(ts, [(e <= t).sum() / n_gt for t in ts], label=k)
        ax2.hist(e, bins=60, range=(0, 1.5), histtype="step", label=k)
    ax1.set(xlabel="threshold px", ylabel="PCK", title="PCK curve", ylim=(0, 1.01))
    ax2.set(xlabel="tip error px", ylabel="tips", title="matched tip errors")
    ax1.legend(fontsize=6)
    ax2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "pck_and_errors.png", dpi=110)
    plt.close(fig)
    files.append("pck_and_errors.png")
    return files + overlays(rows, next(iter(summary["variants"])), out, worst, pixel_pitch_um)


def overlays(rows: list[dict], key: str, out: Path, worst: int, pixel_pitch_um: float | None = None) -> list[str]:
    """``worst/NAME.png``: the frames of variant ``key`` with a wrong verdict, then the largest
    tip errors; truth as circles (anode red, cathode green), predictions as crosses."""
    import cv2

    def badness(r):
        x = r["variants"][key]
        wrong = r["truth"] in ("OK", "NG") and x["verdict"] != r["truth"]
        return (wrong, not x["pcs"], max(x["err_a"] + x["err_c"] + [0.0]))

    chosen = sorted(rows, key=badness, reverse=True)[:worst]
    (out / "worst").mkdir(exist_ok=True)
    files = []
    tasks = {r["name"]: r.get("task") for r in rows}
    for r in chosen:
        name, img, labels = load_task(tuple(tasks[r["name"]]), pixel_pitch_um)
        g = cv2.normalize(img.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
        c = cv2.cvtColor(g, cv2.COLOR_GRAY2BGR)
        x = r["variants"][key]
        for pts, col in ((labels["anode"], (0, 0, 255)), (labels["cathode"], (0, 200, 0))):
            for p in np.asarray(pts, float).reshape(-1, 2):
                cv2.circle(c, (int(round(p[0])), int(round(p[1]))), 4, col, 1)
        for pts, col in ((x["pred_a"], (0, 0, 255)), (x["pred_c"], (0, 200, 0))):
            for p in np.asarray(pts, float).reshape(-1, 2):
                cv2.drawMarker(c, (int(round(p[0])), int(round(p[1]))), col, cv2.MARKER_CROSS, 7, 1)
        cv2.putText(c, f"{name} truth {r['truth']} judged {x['verdict']} {','.join(x['codes'])}", (10, 25),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 160, 255), 2)
        cv2.imwrite(str(out / "worst" / f"{name}.png"), c)
        files.append(f"worst/{name}.png")
    return files


def run_eval(dataset: str, settings, model_path: str, sha256: str | None, out: str | os.PathLike,
             fusions=("off", "on"), corners=(512,), n: int | None = None, jobs: int | None = None,
             pixel_pitch_um: float | None = None, worst: int = 8, progress=None, make_plots: bool = True,
             listed: tuple[list[tuple], str] | None = None) -> dict:
    """Evaluate ``dataset`` (see ``list_tasks``) with every fusion x corner-count variant;
    writes ``results.json``, ``report.md``, plots and worst-case overlays into ``out``."""
    tasks, desc = listed or list_tasks(dataset, n)  # ``listed``: list_tasks' result, when the caller has it
    # "on" uses the config's fusion parameters (its defaults when the config leaves it off)
    fz = tuple(None if f == "off" else (settings.fusion or FusionParams()) for f in fusions)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = jobs or os.cpu_count() or 1
    rows = []
    # spawn, not fork: a forked worker can inherit a lock held by one of the parent's
    # OpenCV / ONNX Runtime threads and hang (seen in the test run)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init,
                             initargs=(model_path, sha256, settings, fz, tuple(corners), pixel_pitch_um)) as ex:
        for task, row in zip(tasks, ex.map(_one, tasks, chunksize=2)):
            row["task"] = list(task)
            rows.append(row)
            if progress:
                progress(1)
    keys = list(rows[0]["variants"]) if rows else []
    summary = {"dataset": desc, "frames": len(rows), "match_px": MATCH_PX,
               "nme_normaliser": "the frame's layer pitch: median distance of stacking neighbours among the true tips",
               "pcs_definition": f"counts right and every true tip matched within {PCS_PX:g} px",
               "variants": {k: summarise(rows, k) for k in keys}, "stage_times": stage_times(rows),
               "roi_found": float(np.mean([r["roi_ok"] for r in rows])) if rows else float("nan")}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "frames.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items()}) + "\n" for r in rows))
    (out / "report.md").write_text(markdown(summary))
    if make_plots and rows:
        summary["files"] = plots(rows, summary, out, worst, pixel_pitch_um)
    return summary
