"""``polecheck train``: fit the HRNet on phantom crops, with checkpoints and resume.

Data: ``cache_size`` crops rendered once (``export.data.build_crops``, seeds
``seed * 1_000_000 + i``) and cached under ``OUT/cache-*.npz``; every step draws a batch
from them with a step-seeded generator and augments it freshly, so a resumed run sees the
same stream as an uninterrupted one.  Validation: ``val_size`` crops from seeds
``seed * 1_000_000 + 900_000 + i`` (disjoint from training), scored with the runtime codec
(decode -> match within 3 px): precision, recall, mean and p95 error in crop pixels.

Loss: MSE against unit-peak Gaussian targets, weighted ``1 + fg_weight * target`` because
tips cover ~1 % of a heatmap.  AdamW, linear warm-up, cosine decay.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from daemon.codec import HeatmapCodec
from daemon.evaluate import match_points
from .data import Augment, CropRecipe, augment, build_crops, targets
from .hrnet import HRNet, HRNetConfig, count_parameters


@dataclass
class TrainConfig:
    steps: int = 4000
    batch: int = 24
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 200
    fg_weight: float = 10.0
    seed: int = 1
    cache_size: int = 12000
    val_size: int = 384
    val_every: int = 500
    ckpt_every: int = 250
    threads: int = 0  # torch intra-op threads, 0 = all cores
    jobs: int = 0  # processes rendering the cache, 0 = all cores
    sigma: float = 1.0
    stride: int = 2
    init: str | None = None  # fine-tune: start from this checkpoint's weights (fresh optimizer and schedule)
    model: HRNetConfig = field(default_factory=HRNetConfig)
    crops: CropRecipe = field(default_factory=CropRecipe)
    aug: Augment = field(default_factory=Augment)

    def to_dict(self) -> dict:
        return asdict(self)


def inside(pts: np.ndarray, size: tuple[int, int], border: float) -> np.ndarray:
    w, h = size
    return (pts[:, 0] >= border) & (pts[:, 0] <= w - 1 - border) & (pts[:, 1] >= border) & (pts[:, 1] <= h - 1 - border)


def evaluate_crops(model: torch.nn.Module, x: np.ndarray, points, codec: HeatmapCodec, border: float = 8.0,
                   batch: int = 32) -> dict:
    """Precision/recall/error on crops ``x (N, 1, h, w)`` (normalised) with their points;
    tips within ``border`` px of the crop edge are not scored (tiles overlap there)."""
    model.eval()
    dev = next(model.parameters()).device
    errs, fp, fn, n_gt = [], 0, 0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            hm = model(torch.from_numpy(x[i:i + batch]).to(dev)).float().cpu().numpy()
            for b in range(len(hm)):
                dec = codec.decode(hm[b])
                for c in range(len(dec)):
                    p = dec[c][0]
                    g = points[i + b][c]
                    p = p[inside(p, codec.input_size, border)]
                    g = g[inside(g, codec.input_size, border)]
                    e, up, ug = match_points(p, g, 3.0)
                    errs.append(e)
                    fp += up
                    fn += ug
                    n_gt += len(g)
    model.train()
    e = np.concatenate(errs) if errs else np.zeros(0)
    tp = len(e)
    return {
        "precision": tp / max(tp + fp, 1),
        "recall": tp / max(n_gt, 1),
        "mean_err_px": float(e.mean()) if tp else float("nan"),
        "p95_err_px": float(np.percentile(e, 95)) if tp else float("nan"),
        "tips": int(n_gt),
    }


def _cache(out: Path, name: str, seed_root: int, n: int, recipe: CropRecipe, jobs: int):
    key = hashlib.sha256(json.dumps([seed_root, n, recipe.to_dict()], sort_keys=True).encode()).hexdigest()[:12]
    path = out / f"cache-{name}-{key}.npz"
    if path.exists():
        z = np.load(path, allow_pickle=True)
        return z["raw"], list(z["points"]), list(z["metas"])
    bar = tqdm(total=n, desc=f"render {name} crops", unit="crop")
    raw, points, metas = build_crops(seed_root, n, recipe, jobs, progress=bar.update)
    bar.close()
    pts = np.empty(len(points), object)
    pts[:] = points
    mts = np.empty(len(metas), object)
    mts[:] = metas
    np.savez(path, raw=raw, points=pts, metas=mts)
    return raw, points, metas


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def train(cfg: TrainConfig, out: str | Path, resume: bool = True, log=print) -> dict:
    """Train into ``out`` (checkpoints ``last.pt`` and ``best.pt``, ``log.jsonl``).
    Returns the last validation metrics.  Uses CUDA when available, never requires it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    codec = HeatmapCodec(cfg.crops.size, cfg.stride, cfg.sigma)
    raw, points, metas = _cache(out, "train", cfg.seed * 1_000_000, cfg.cache_size, cfg.crops, cfg.jobs)
    vraw, vpoints, vmetas = _cache(out, "val", cfg.seed * 1_000_000 + 900_000, cfg.val_size, cfg.crops, cfg.jobs)
    # validation inputs: a fixed augmentation draw (8-bit, JPEG, gamma included)
    vx = augment(vraw, vmetas, np.random.default_rng([cfg.seed, 7]), cfg.aug)

    model = HRNet(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, best = 0, -1.0
    last = out / "last.pt"
    if resume and last.exists():
        ck = torch.load(last, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, best = ck["step"], ck.get("best", -1.0)
        log(f"resumed from {last} at step {step}")
    elif cfg.init:
        ck = torch.load(cfg.init, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])  # raises on another architecture
        log(f"weights from {cfg.init} (its step {ck.get('step')}), fresh optimizer and schedule")
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    log(f"HRNet {cfg.model.widths} {count_parameters(model):,} parameters on {device}, "
        f"{len(raw)} cached crops, batch {cfg.batch}, {cfg.steps} steps")

    def save(path: Path, metrics: dict | None = None):
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "best": best,
                    "config": cfg.to_dict(), "metrics": metrics}, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)

    metrics: dict = {}
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step")
    logf = open(out / "log.jsonl", "a")
    model.train()
    t0 = time.perf_counter()
    try:
        while step < cfg.steps:
            rng = np.random.default_rng([cfg.seed, step])
            idx = rng.integers(0, len(raw), cfg.batch)
            x = torch.from_numpy(augment(raw[idx], [metas[i] for i in idx], rng, cfg.aug)).to(device)
            y = torch.from_numpy(targets([points[i] for i in idx], codec)).to(device)
            for g in opt.param_groups:
                g["lr"] = _lr(cfg, step)
            pred = model(x)
            loss = ((pred - y) ** 2 * (1 + cfg.fg_weight * y)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.5f}", lr=f"{_lr(cfg, step):.2e}")
            rec = None
            if step % cfg.val_every == 0 or step == cfg.steps:
                metrics = evaluate_crops(model, vx, vpoints, codec)
                f1 = 2 * metrics["precision"] * metrics["recall"] / max(metrics["precision"] + metrics["recall"], 1e-9)
                rec = {"step": step, "loss": float(loss.item()), "lr": _lr(cfg, step),
                       "elapsed_s": round(time.perf_counter() - t0, 1), **metrics}
                log(json.dumps(rec))
                if f1 > best:
                    best = f1
                    save(out / "best.pt", metrics)
            elif step % 100 == 0:
                rec = {"step": step, "loss": float(loss.item()), "lr": _lr(cfg, step)}
            if rec:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save(last, metrics)
    finally:
        bar.close()
        logf.close()
    return metrics


__all__ = ["TrainConfig", "train", "evaluate_crops"]
