"""Stage 2 at run time: the shipped ONNX model, its pinned hash, and tip accuracy through
the daemon's own path (ROI -> tiles -> ONNX Runtime -> decode -> merge).  ONNX Runtime
only: these run without the 'train' extra."""

import hashlib

import numpy as np
import pytest

from daemon.config import ConfigError, load_config
from daemon.evaluate import match_points
from daemon.codec import MAX_CROP
from daemon.keypoints import CropPlan, crops_for_roi, detect_tips
from daemon.model import KeypointModel, ModelError
from daemon.phantom import make_phantom
from daemon.roi import detect_roi

CFG = load_config(None).model
PLAN = CropPlan.from_config(CFG)
FIXED = CropPlan(CFG.tile_overlap_px, None)


@pytest.fixture(scope="module")
def model():
    return KeypointModel(CFG.resolved_path(), CFG.sha256, providers=("CPUExecutionProvider",), threads=2)


def test_shipped_model_is_pinned_and_small():
    path = CFG.resolved_path()
    data = path.read_bytes()
    assert len(data) <= 20 * 1024 * 1024
    assert hashlib.sha256(data).hexdigest() == CFG.sha256


def test_hash_mismatch_and_missing_file_are_errors(tmp_path):
    with pytest.raises(ModelError, match="does not match the pinned"):
        KeypointModel(CFG.resolved_path(), "0" * 64)
    with pytest.raises(ModelError, match="not found"):
        KeypointModel(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError):
        KeypointModel(bad, providers=("CPUExecutionProvider",))


def test_unknown_provider_is_a_config_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  providers: [GpuMagicProvider]\n  sha256: xyz\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    paths = {k for k, _ in e.value.problems}
    assert any(k.startswith("model.providers") for k in paths) and "model.sha256" in paths


def test_metadata_codec_and_batch_invariance(model):
    assert model.codec.stride == 2 and model.codec.classes == ("anode", "cathode")
    ph = make_phantom(np.random.SeedSequence([606, 0]), "normal")
    roi = detect_roi(ph.image)
    _, x = crops_for_roi(ph.image, roi, model.codec, FIXED)
    assert len(x) >= 2
    together = model(x)
    alone = np.concatenate([model(x[i:i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(together, alone, atol=1e-4)
    with pytest.raises(ValueError, match="model input"):
        model(x[:, :, :60])  # not a multiple of the model's size multiple (16)
    with pytest.raises(ValueError, match="model input"):
        model(np.zeros((1, 1, 2048, 256), np.float32))  # taller than max_size


def test_provider_options_from_config():
    """The options each ONNX Runtime provider gets (none of the GPU ones runs here): CUDA
    its cuDNN algorithm search, TensorRT FP16, its engine cache and the dynamic-shape
    profile up to max_crop_px and max_batch."""
    from daemon.model import _provider_entry, _trt_profile

    assert _provider_entry("CUDAExecutionProvider", True, None, None, CFG.cudnn_conv_algo_search) == (
        "CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE"})
    assert _provider_entry("CPUExecutionProvider", True, None) == ("CPUExecutionProvider", {})
    name, opts = _provider_entry("TensorrtExecutionProvider", True, None, _trt_profile(MAX_CROP, CFG.max_batch))
    assert name == "TensorrtExecutionProvider" and opts["trt_fp16_enable"] is True
    assert opts["trt_profile_max_shapes"] == f"x:{CFG.max_batch}x1x{MAX_CROP[1]}x{MAX_CROP[0]}"


def test_fixed_shape_runs_one_input_shape(model, record_session_shapes):
    """With ``fixed_shape`` (on for CUDA, where every new input shape re-plans the
    convolutions) every session call is ``(max_batch, 1, 256, 256)``: short batches are
    padded with zero crops and long ones split, and each crop's heatmap is the one it
    gets alone; the crop plan falls back to fixed tiles.  On CPU ``auto`` leaves it off."""
    assert model.fixed_shape is False and PLAN.for_model(model).max_size is not None
    fixed = KeypointModel(CFG.resolved_path(), CFG.sha256, providers=("CPUExecutionProvider",), threads=2,
                          max_batch=4, fixed_shape=True)
    assert fixed.fixed_shape and PLAN.for_model(fixed).max_size is None
    ph = make_phantom(np.random.SeedSequence([606, 2]), "normal")
    _, x = crops_for_roi(ph.image, detect_roi(ph.image), fixed.codec, PLAN.for_model(fixed))
    x = np.concatenate([x, x[::-1]])[:6]  # 6 tiles: one full batch of 4 and a padded one
    assert x.shape[1:] == (1, 256, 256) and len(x) == 6
    shapes = record_session_shapes(fixed)
    out = fixed(x)
    one = fixed(x[2:3])
    assert shapes == [(4, 1, 256, 256)] * 3
    assert out.shape == (6, 2, 128, 128) and one.shape == (1, 2, 128, 128)
    np.testing.assert_allclose(out, model(x), atol=1e-4)
    np.testing.assert_allclose(one[0], out[2], atol=1e-4)
    with pytest.raises(ValueError, match="fixed_shape"):
        fixed(np.zeros((1, 1, 256, 512), np.float32))  # a fitted crop: another shape
    with pytest.raises(ValueError, match="fixed_shape"):
        KeypointModel(CFG.resolved_path(), CFG.sha256, providers=("CPUExecutionProvider",), fixed_shape="maybe")


def test_dynamic_size_model_runs_a_fitted_crop_like_its_tiles(model):
    """The shipped model takes any multiple of 16 up to max_size: a crop fitted to the ROI
    gives the heatmaps the fixed tiles give where they see the same pixels (the network is
    fully convolutional; only the crop edges, where zero padding reaches in, differ)."""
    assert model.dynamic_size and model.size_multiple == 16
    assert CFG.max_crop_px == MAX_CROP == model.max_size  # one default for config, plan and runner
    ph = make_phantom(np.random.SeedSequence([606, 1]), "normal")
    roi = detect_roi(ph.image)
    plan = PLAN.for_model(model)
    tiles, x = crops_for_roi(ph.image, roi, model.codec, plan)
    w, h = tiles.crop_size
    assert len(x) == 1 and (x.shape[3], x.shape[2]) == (w, h) and w % 16 == 0 and h % 16 == 0
    ctx = 2 * CFG.crop_context_px  # the ROI plus its context, rounded up to the next multiple of 16
    assert roi.size[0] + ctx <= w < roi.size[0] + ctx + 16 and roi.size[1] + ctx <= h < roi.size[1] + ctx + 16
    hm = model(x)
    assert hm.shape == (1, 2, h // 2, w // 2)
    # a 256 px tall band of the crop (full width) run alone: its heatmap rows further than
    # 96 px from the band's edges (the network's reach) match the whole crop's
    y0 = (h // 2 - 128) // 16 * 16
    band = model(np.ascontiguousarray(x[:, :, y0:y0 + 256]))
    np.testing.assert_allclose(band[0, :, 48:80], hm[0, :, y0 // 2 + 48:y0 // 2 + 80], atol=2e-3)


# error bounds: about 1.5x the 16-bit validation figures (docs/accuracy.md), as 4 frames are few
@pytest.mark.parametrize("preset,bits,mean_px,p95_px,plan", [
    ("normal", 16, 0.35, 0.85, PLAN), ("normal", 8, 0.35, 0.85, PLAN), ("hard", 16, 0.45, 1.1, PLAN),
    ("normal", 16, 0.35, 0.85, FIXED)], ids=["normal16", "normal8", "hard16", "normal16-fixed-tiles"])
def test_tips_through_the_runtime_path(model, preset, bits, mean_px, p95_px, plan):
    """Seeded frames: nearly every tip found, sub-pixel on average, few false tips, with
    crops fitted to the ROI (the default) and with fixed 256 px tiles."""
    errs, fp, fn, n_gt, counts_ok = [], 0, 0, 0, 0
    frames = 4
    for i in range(frames):
        ph = make_phantom(np.random.SeedSequence([6060, i]), preset, bits=bits)
        roi = detect_roi(ph.image)
        assert roi.ok
        tips = detect_tips(ph.image, roi, model, CFG.threshold, plan, CFG.max_batch, CFG.min_distance_px,
                           CFG.low_threshold)
        ok = True
        for pred, key in ((tips.anodes, "anode"), (tips.cathodes, "cathode")):
            gt = np.asarray(ph.labels[key]).reshape(-1, 2)
            e, a, b = match_points(pred, gt, 3.0)
            errs.append(e)
            fp, fn, n_gt = fp + a, fn + b, n_gt + len(gt)
            ok &= len(pred) == len(gt)
        counts_ok += ok
    e = np.concatenate(errs)
    assert fn <= 0.01 * n_gt + 1, (fn, n_gt)
    assert fp <= 0.01 * n_gt + 1, (fp, n_gt)
    assert e.mean() <= mean_px, e.mean()
    assert np.percentile(e, 95) <= p95_px, np.percentile(e, 95)
    assert counts_ok >= frames - 1
