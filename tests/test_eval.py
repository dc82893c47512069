"""``polecheck eval``: scoring on known geometry, the sources, and one small end-to-end run."""

import json

import cv2
import numpy as np
import pytest

from daemon.evaluate_dataset import list_tasks, load_task, run_eval, score_frame, summarise
from daemon.pipeline import JudgeSettings


def test_score_frame_counts_pcs_and_errors():
    gt_a = np.array([[10.0, 10.0], [10.0, 50.0]])
    gt_c = np.array([[0.0, 30.0]])
    s = score_frame(gt_a + [0.3, 0.4], gt_c + [1.5, 0.0], gt_a, gt_c)
    assert s["count_ok"] and s["pcs"] and s["n_gt"] == 3
    np.testing.assert_allclose(s["err_a"], [0.5, 0.5])
    s = score_frame(gt_a + [0.0, 2.5], gt_c, gt_a, gt_c)  # within the 3 px match, beyond PCS's 2 px
    assert s["count_ok"] and not s["pcs"]
    s = score_frame(gt_a[:1], gt_c, gt_a, gt_c)
    assert not s["count_ok"] and not s["pcs"] and len(s["err_a"]) == 1


def _row(truth, verdict, err_a, err_c, n_gt, count_ok, pcs, ov=(), pitch=20.0):
    return {"truth": truth, "pitch_px": pitch, "variants": {"v": {
        "err_a": list(err_a), "err_c": list(err_c), "n_gt": n_gt, "count_ok": count_ok, "pcs": pcs,
        "verdict": verdict, "ov_err": list(ov), "refine_s": 0.001}}}


def test_summarise_metrics_and_verdict_confusion():
    rows = [_row("OK", "OK", [0.2, 0.4], [0.6], 3, True, True, [5.0, 15.0]),
            _row("NG", "OK", [1.5], [], 2, False, False),  # an escape; one tip missed
            _row("OK", "NG", [0.1], [0.1], 2, True, True, [], pitch=10.0)]  # overkill
    m = summarise(rows, "v")
    assert m["frames"] == 3 and m["tips"] == 7
    assert m["pck@0.5px"] == pytest.approx(4 / 7) and m["pck@2px"] == pytest.approx(6 / 7)
    assert m["pcs"] == pytest.approx(2 / 3) and m["count_accuracy"] == pytest.approx(2 / 3)
    assert m["anode_mae_px"] == pytest.approx(np.mean([0.2, 0.4, 1.5, 0.1]))
    assert m["nme_pct"] == pytest.approx(100 * np.mean([0.4 / 20, 1.5 / 20, 0.1 / 10]))
    assert m["overhang_mae_um"] == pytest.approx(10.0)
    assert (m["escapes"], m["overkill"], m["truth_ng"], m["truth_ok"]) == (1, 1, 1, 2)
    assert m["overkill_rate"] == pytest.approx(0.5)


def test_pbd_layout_is_read_with_neg_as_anode(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (64, 80), dtype=np.uint8)
    (tmp_path / "neg_location").mkdir()
    (tmp_path / "pos_location").mkdir()
    cv2.imwrite(str(tmp_path / "a1.png"), img)
    np.save(tmp_path / "neg_location" / "a1.npy", np.array([[10.0, 5.0], [11.0, 25.0]]))
    np.save(tmp_path / "pos_location" / "a1.npy", np.array([[2.0, 15.0]]))
    tasks, desc = list_tasks(str(tmp_path))
    assert tasks == [("pbd", str(tmp_path), "a1")] and "PBD" in desc
    name, image, labels = load_task(tasks[0], pixel_pitch_um=12.5)
    assert name == "a1" and image.shape == (64, 80)
    assert labels["anode"] == [[10.0, 5.0], [11.0, 25.0]] and labels["cathode"] == [[2.0, 15.0]]
    assert labels["pixel_pitch_um"] == 12.5 and "verdict" not in labels


def test_bad_datasets_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        list_tasks(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="PRESET"):
        list_tasks("phantoms:nonsense:3")
    with pytest.raises(ValueError, match="no labelled frames"):
        list_tasks(str(tmp_path))


def test_end_to_end_on_two_phantoms(tmp_path):
    from daemon.config import load_config

    cfg = load_config(None)
    summary = run_eval("phantoms:defects:2:4242", JudgeSettings.from_config(cfg), str(cfg.model.resolved_path()),
                       cfg.model.sha256, tmp_path, fusions=("off", "on"), corners=(64, 512), jobs=1,
                       make_plots=False)
    assert summary["frames"] == 2
    assert set(summary["variants"]) == {f"fusion={f},N={n}" for f in ("off", "on") for n in (64, 512)}
    for m in summary["variants"].values():
        assert 0.0 <= m["pck@1px"] <= 1.0 and m["tips"] > 10
        assert m["truth_ok"] + m["truth_ng"] == 2
    assert set(summary["stage_times"]) >= {"roi_corners", "keypoint_model", "verdict_rules"}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["variants"].keys() == summary["variants"].keys()
    assert (tmp_path / "report.md").read_text().count("| fusion=") == 4


def test_plots_and_worst_case_overlays(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need the 'eval' extra: pip install -e '.[eval]'")
    from daemon.config import load_config

    cfg = load_config(None)
    summary = run_eval("phantoms:normal:2:4243", JudgeSettings.from_config(cfg), str(cfg.model.resolved_path()),
                       cfg.model.sha256, tmp_path, fusions=("off",), corners=(512,), jobs=1, worst=1)
    assert summary["files"][0] == "pck_and_errors.png" and len(summary["files"]) == 2
    for f in summary["files"]:
        assert cv2.imread(str(tmp_path / f)) is not None
