"""``polecheck`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from . import __version__


def _phantom_job(args: tuple) -> tuple[float, str]:
    """Render and write one labelled frame; returns (render seconds, verdict)."""
    out, i, preset, seed, size, bits, preview = args
    from . import phantom
    from .dataset import write_sample
    import cv2

    t = time.perf_counter()
    ph = phantom.make_phantom(np.random.SeedSequence([seed, i]), preset, size, bits)
    dt = time.perf_counter() - t
    name = f"{preset}_{seed}_{i:06d}"
    write_sample(out, name, ph.image, ph.labels)
    if preview:
        cv2.imwrite(str(Path(out) / "previews" / f"{name}.png"), phantom.draw_labels(ph.image, ph.labels))
    return dt, ph.labels["verdict"]


def cmd_phantoms(a: argparse.Namespace) -> int:
    from .phantom import get_spec

    get_spec(a.preset)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.previews:
        (out / "previews").mkdir(exist_ok=True)
    tasks = [(str(out), i, a.preset, a.seed, tuple(a.size), a.bits, i < a.previews) for i in range(a.n)]
    t0 = time.perf_counter()
    if a.jobs == 1:
        done = [_phantom_job(t) for t in tasks]
    else:
        with ProcessPoolExecutor(a.jobs or None) as ex:
            done = list(ex.map(_phantom_job, tasks, chunksize=4))
    times = [dt for dt, _ in done]
    wall = time.perf_counter() - t0
    (out / "dataset.json").write_text(json.dumps({
        "generator": f"polecheck {__version__}", "preset": a.preset, "seed": a.seed, "n": a.n,
        "size": list(a.size), "bits": a.bits, "names": f"{a.preset}_{a.seed}_NNNNNN",
    }, indent=1))
    ng = sum(verdict == "NG" for _, verdict in done)
    print(f"wrote {a.n} labelled frames ({a.size[0]}x{a.size[1]}, {a.bits}-bit, preset {a.preset}, "
          f"{ng} NG) to {out}/")
    print(f"speed: {1 / np.median(times):.2f} images/s per core (median {np.median(times) * 1000:.0f} ms), "
          f"{a.n / wall:.2f} images/s overall with {a.jobs or os.cpu_count()} job(s)")
    if a.previews:
        print(f"previews with the ground truth drawn on top: {out / 'previews'}/")
    return 0


def cmd_feed(a: argparse.Namespace) -> int:
    import zmq

    from .config import load_config
    from .feed import Feed, render_pool

    cfg = load_config(a.config).feed
    over = {k: v for k, v in (("endpoint", a.endpoint), ("rate_hz", a.rate), ("preset", a.preset),
                               ("socket", a.socket), ("pool_cells", a.pool), ("seed", a.seed),
                               ("bits", a.bits), ("size", tuple(a.size) if a.size else None)) if v is not None}
    cfg = cfg.model_validate({**cfg.model_dump(), **over})
    t = time.perf_counter()
    pool = render_pool(cfg.pool_cells, cfg.preset, cfg.size, cfg.bits, cfg.seed)
    logging.info("rendered %d cells (%d frames) in %.1f s", len(pool), 4 * len(pool), time.perf_counter() - t)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ctx = zmq.Context()
    feed = Feed(ctx, cfg.endpoint, pool, socket=cfg.socket, rate_hz=cfg.rate_hz, scanner_id=cfg.scanner_id)
    try:
        logging.info("feeding %s on %s (%s, %.1f frames/s)", cfg.preset, cfg.endpoint, cfg.socket, cfg.rate_hz)
        sent = feed.run(a.frames, stop)
    finally:
        feed.close()
        ctx.term()
    logging.info("sent %d frames", sent)
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from .config import load_config
    from .service import run_service

    cfg = load_config(a.config)
    logging.getLogger().setLevel(cfg.log.level if not a.verbose else "DEBUG")
    return run_service(cfg)


def cmd_demo(a: argparse.Namespace) -> int:
    from .config import load_config
    from .demo import run_demo

    cfg = load_config(a.config)
    logging.getLogger().setLevel("WARNING" if not a.verbose else "DEBUG")
    s = run_demo(cfg, a.frames, a.rate, a.preset, a.state_dir, a.quiet)
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=1))
    return 0 if s["exactly_one_verdict_per_frame"] else 1


def cmd_check_config(a: argparse.Namespace) -> int:
    from .config import ConfigError, dump_config, load_config

    try:
        cfg = load_config(a.file)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    print(dump_config(cfg), end="")
    print(f"# OK: {a.file or 'default configuration'} is valid", file=sys.stderr)
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import STAGES, to_markdown
    from .service import tune_malloc

    names = list(STAGES) if a.stage == "all" else [a.stage]
    # process-wide, like the daemon's pipeline.malloc_tuning (before any stage allocates)
    malloc = "tuned" if a.malloc == "tuned" and tune_malloc() else "default"
    results = {}
    for name in names:
        res = STAGES[name](n=a.n, size=tuple(a.size), bits=a.bits, frames=a.frames, providers=a.providers,
                           malloc=malloc, preset=a.preset)
        res["malloc"] = malloc
        results[name] = res
        print(to_markdown(name, res))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


def _eval_presets(a: argparse.Namespace, run) -> int:
    """Run ``run(preset, progress) -> list of result dicts`` per preset; print JSON lines,
    progress on stderr, and write ``--json``."""
    results = []
    for preset in a.preset:
        def progress(done: int, total: int, preset=preset) -> None:
            if done % 50 == 0 or done == total:
                print(f"  {preset}: {done}/{total}", file=sys.stderr, flush=True)

        for r in run(preset, progress):
            results.append(r)
            print(json.dumps(r))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


def cmd_eval_roi(a: argparse.Namespace) -> int:
    from .evaluate import roi_accuracy

    return _eval_presets(a, lambda preset, progress: [roi_accuracy(
        preset, a.n, tuple(a.size), a.bits, a.margin, a.jobs or None, progress, a.seed_root)])


def cmd_train(a: argparse.Namespace) -> int:
    try:
        from export.train import TrainConfig, train
    except ImportError as e:
        print(f"polecheck train needs the 'train' extra (pip install -e '.[train]'): {e}", file=sys.stderr)
        return 2
    over = {k: getattr(a, k) for k in ("steps", "batch", "lr", "seed", "cache_size", "val_size", "val_every",
                                       "threads", "jobs", "init", "warmup") if getattr(a, k) is not None}
    cfg = dataclasses.replace(TrainConfig(), **over)
    crops = {}
    if a.preset_weights:
        if min(a.preset_weights) < 0 or sum(a.preset_weights) <= 0:
            raise ValueError(f"--preset-weights must be >= 0 with a positive sum, got {a.preset_weights}")
        crops["weights"] = tuple(a.preset_weights)
    if a.p_context is not None:
        if not 0.0 <= a.p_context < 1.0:
            raise ValueError(f"--p-context must be in [0, 1), got {a.p_context}")
        crops["p_context"] = a.p_context
    if crops:
        cfg = dataclasses.replace(cfg, crops=dataclasses.replace(cfg.crops, **crops))
    metrics = train(cfg, a.out, resume=not a.restart)
    print(json.dumps({"out": a.out, **metrics}))
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    try:
        from export.onnx_export import export
    except ImportError as e:
        print(f"polecheck export needs the 'train' extra (pip install -e '.[train]'): {e}", file=sys.stderr)
        return 2
    res = export(a.checkpoint, a.out, tuple(a.input_size))
    print(json.dumps(res))
    if res["parity_max_abs"] > a.tolerance:
        print(f"polecheck export: torch/ONNX Runtime parity {res['parity_max_abs']:.2e} > {a.tolerance:g}",
              file=sys.stderr)
        return 1
    return 0


def cmd_eval_model(a: argparse.Namespace) -> int:
    from .config import load_config
    from .evaluate import model_accuracy
    from .keypoints import CropPlan

    cfg = load_config(a.config).model
    path = a.model or str(cfg.resolved_path())
    sha = None if a.model else cfg.sha256
    return _eval_presets(a, lambda preset, progress: model_accuracy(
        path, preset, a.n, tuple(a.size), a.bits, sha, jobs=a.jobs or None, progress=progress,
        seed_root=a.seed_root, thresholds=a.threshold or (cfg.threshold,), low_threshold=cfg.low_threshold,
        plan=CropPlan.from_config(cfg),
        min_distance=cfg.min_distance_px if a.min_distance is None else a.min_distance))


def cmd_eval(a: argparse.Namespace) -> int:
    from .config import load_config
    from .evaluate_dataset import list_tasks, run_eval
    from .pipeline import JudgeSettings

    cfg = load_config(a.config)
    settings = JudgeSettings.from_config(cfg)
    listed = list_tasks(a.dataset, a.n)  # fails early on a bad dataset
    tasks, desc = listed
    try:
        from tqdm import tqdm
    except ImportError:
        print("polecheck eval needs the 'eval' extra (pip install -e '.[eval]') for plots and progress",
              file=sys.stderr)
        return 2
    with tqdm(total=len(tasks), desc=f"eval {desc}", unit="frame") as bar:
        summary = run_eval(a.dataset, settings, str(cfg.model.resolved_path()), cfg.model.sha256, a.out,
                           tuple(a.fusion), tuple(a.corners), a.n, a.jobs or None, a.pixel_pitch_um, a.worst,
                           progress=bar.update, listed=listed)
    from .evaluate_dataset import markdown

    print(markdown(summary))
    print(f"results: {a.out}/results.json, report.md, pck_and_errors.png, worst/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polecheck", description="In-line X-ray electrode overhang inspection")
    p.add_argument("--version", action="version", version=f"polecheck {__version__}")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("phantoms", help="render a labelled phantom dataset (NAME.png + NAME.json)")
    s.add_argument("out")
    s.add_argument("--n", type=int, default=16)
    s.add_argument("--preset", default="normal", choices=["normal", "hard", "defects"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, nargs=2, default=(1024, 1024), metavar=("W", "H"))
    s.add_argument("--bits", type=int, choices=[8, 16], default=16)
    s.add_argument("--jobs", type=int, default=0, help="worker processes (0 = all cores)")
    s.add_argument("--previews", type=int, default=0, metavar="K", help="also draw the labels on the first K")
    s.set_defaults(fn=cmd_phantoms)

    s = sub.add_parser("feed", help="publish phantom cells like a scanner (see config 'feed')")
    s.add_argument("--config", default=None)
    s.add_argument("--endpoint", help="bind:tcp://... or connect:tcp://...")
    s.add_argument("--socket", choices=["push", "pub"])
    s.add_argument("--rate", type=float, help="frames per second (0 = unpaced)")
    s.add_argument("--preset", choices=["normal", "hard", "defects"])
    s.add_argument("--pool", type=int, help="cells to pre-render")
    s.add_argument("--seed", type=int)
    s.add_argument("--bits", type=int, choices=[8, 16])
    s.add_argument("--size", type=int, nargs=2, metavar=("W", "H"))
    s.add_argument("--frames", type=int, default=None, help="stop after this many frames")
    s.set_defaults(fn=cmd_feed)

    s = sub.add_parser("run", help="the daemon: judge frames from the camera feed (systemd service)")
    s.add_argument("--config", default=None, help="YAML config (default: $POLECHECK_CONFIG or config/default.yaml)")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("demo", help="synthetic scanner + daemon + verdict subscriber, verdicts live")
    s.add_argument("--config", default=None)
    s.add_argument("--frames", type=int, default=120, help="frames to feed (whole cells of 4)")
    s.add_argument("--rate", type=float, default=10.0, help="feed frames per second (0 = unpaced)")
    s.add_argument("--preset", choices=["normal", "hard", "defects"], default="defects",
                   help="phantom preset of the feed (defects: about half the corners are NG)")
    s.add_argument("--state-dir", default="out/demo", help="journal and NG archive of the demo daemon")
    s.add_argument("--quiet", action="store_true", help="only the summary")
    s.add_argument("--json", default=None, help="also write the summary here")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("bench", help="measure stage speed on this machine (docs/benchmarks.md)")
    s.add_argument("--stage", default="all", help="phantom | roi | model | pipeline | all")
    s.add_argument("--frames", type=int, default=200, help="pipeline: frames fed per variant")
    s.add_argument("--n", type=int, default=20, help="frames per variant")
    s.add_argument("--size", type=int, nargs=2, default=(1024, 1024), metavar=("W", "H"))
    s.add_argument("--bits", type=int, choices=[8, 16], default=16)
    s.add_argument("--preset", choices=["normal", "hard", "defects"], default="normal",
                   help="phantoms the roi, model and pipeline stages run on (the phantom stage renders all three)")
    s.add_argument("--providers", choices=["cpu", "config"], default="cpu",
                   help="model stage: ONNX Runtime on CPU (default), or as the config runs it: providers, "
                        "IO binding, FP16, fixed shape (the GPU path where there is one)")
    s.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                   help="glibc allocator: tuned as the daemon runs it (pipeline.malloc_tuning), or glibc's default")
    s.add_argument("--json", default=None, help="also write the results here")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("eval-roi", help="stage-1 accuracy on fresh phantoms (docs/accuracy.md)")
    s.add_argument("--preset", nargs="+", default=["normal", "hard"], choices=["normal", "hard", "defects"])
    s.add_argument("--n", type=int, default=500)
    s.add_argument("--size", type=int, nargs=2, default=(1024, 1024), metavar=("W", "H"))
    s.add_argument("--bits", type=int, choices=[8, 16], default=16)
    s.add_argument("--margin", type=float, default=8.0, help="px every tip must be inside the ROI")
    s.add_argument("--seed-root", type=int, default=None, help="another seed set (development); default: the evaluation set")
    s.add_argument("--jobs", type=int, default=0)
    s.add_argument("--json", default=None)
    s.set_defaults(fn=cmd_eval_roi)

    s = sub.add_parser("train", help="train the HRNet on phantom crops (needs the 'train' extra)")
    s.add_argument("out", help="run folder: crop cache, checkpoints last.pt/best.pt, log.jsonl")
    s.add_argument("--steps", type=int)
    s.add_argument("--batch", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--cache-size", type=int, help="training crops rendered once and augmented per step")
    s.add_argument("--val-size", type=int)
    s.add_argument("--val-every", type=int)
    s.add_argument("--threads", type=int, help="torch threads (0 = all cores)")
    s.add_argument("--jobs", type=int, help="processes rendering crops (0 = all cores)")
    s.add_argument("--restart", action="store_true", help="ignore OUT/last.pt instead of resuming")
    s.add_argument("--init", help="fine-tune: start from this checkpoint's weights (not its optimizer or step)")
    s.add_argument("--warmup", type=int, help="linear warm-up steps")
    s.add_argument("--preset-weights", type=float, nargs=3, metavar=("NORMAL", "HARD", "DEFECTS"),
                   help="how often each phantom preset is drawn for a training crop")
    s.add_argument("--p-context", type=float, help="share of context (hard-negative) crops")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("export", help="checkpoint -> ONNX with a parity check (needs the 'train' extra)")
    s.add_argument("checkpoint")
    s.add_argument("out")
    s.add_argument("--input-size", type=int, nargs=2, default=(256, 256), metavar=("W", "H"))
    s.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted torch/ORT difference")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("eval-model", help="stages 1-2 tip accuracy on fresh validation phantoms")
    s.add_argument("--config", default=None)
    s.add_argument("--model", default=None, help="ONNX file (default: the config's, hash-checked)")
    s.add_argument("--preset", nargs="+", default=["normal", "hard"], choices=["normal", "hard", "defects"])
    s.add_argument("--n", type=int, default=250)
    s.add_argument("--size", type=int, nargs=2, default=(1024, 1024), metavar=("W", "H"))
    s.add_argument("--bits", type=int, choices=[8, 16], default=16)
    s.add_argument("--seed-root", type=int, default=None, help="another seed set (development)")
    s.add_argument("--threshold", type=float, nargs="+", default=None,
                   help="peak threshold(s) to score (default: the config's)")
    s.add_argument("--min-distance", type=float, default=None, help="NMS radius px (default: the config's)")
    s.add_argument("--jobs", type=int, default=0)
    s.add_argument("--json", default=None)
    s.set_defaults(fn=cmd_eval_model)

    s = sub.add_parser("eval", help="the judging path on a labelled set: NME, PCK, PCS, overhangs, verdicts, ablation")
    s.add_argument("dataset", help="a dataset folder (project format or X-ray PBD layout) or phantoms:PRESET:N[:ROOT]")
    s.add_argument("--out", default="out/eval", help="results.json, report.md, plots, worst-case overlays")
    s.add_argument("--config", default=None)
    s.add_argument("--fusion", nargs="+", choices=["off", "on"], default=["off", "on"])
    s.add_argument("--corners", type=int, nargs="+", default=[512], metavar="N", help="corner-set sizes to ablate")
    s.add_argument("--n", type=int, default=None, help="at most this many frames")
    s.add_argument("--pixel-pitch-um", type=float, default=None, help="for labels without one (X-ray PBD)")
    s.add_argument("--worst", type=int, default=8, help="overlay images of the worst frames")
    s.add_argument("--jobs", type=int, default=0)
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("check-config", help="validate a config file and print the effective config")
    s.add_argument("file", nargs="?", default=None)
    s.set_defaults(fn=cmd_check_config)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return a.fn(a)
    except ValueError as e:  # config and input errors: one clear line, no traceback
        print(f"polecheck {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
