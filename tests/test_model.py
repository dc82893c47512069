"""Stage 2 at run time: the shipped ONNX model, its pinned hash, and tip accuracy through
the daemon's own path (ROI -> tiles -> ONNX Runtime -> decode -> merge).  ONNX Runtime
only: these run without the 'train' extra."""

import hashlib

import numpy as np
import pytest

from daemon.config import ConfigError, load_config
from daemon.evaluate import match_points
from daemon.keypoints import crops_for_roi, detect_tips
from daemon.model import KeypointModel, ModelError
from daemon.phantom import make_phantom
from daemon.roi import detect_roi

CFG = load_config(None).model


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
    _, x = crops_for_roi(ph.image, roi, model.codec)
    assert len(x) >= 2
    together = model(x)
    alone = np.concatenate([model(x[i:i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(together, alone, atol=1e-4)
    with pytest.raises(ValueError, match="model input"):
        model(x[:, :, :64])


# error bounds: about 1.5x the 16-bit validation figures (docs/accuracy.md), as 4 frames are few
@pytest.mark.parametrize("preset,bits,mean_px,p95_px", [("normal", 16, 0.35, 0.85), ("normal", 8, 0.35, 0.85),
                                                        ("hard", 16, 0.45, 1.1)])
def test_tips_through_the_runtime_path(model, preset, bits, mean_px, p95_px):
    """Seeded frames: nearly every tip found, sub-pixel on average, few false tips."""
    errs, fp, fn, n_gt, counts_ok = [], 0, 0, 0, 0
    frames = 4
    for i in range(frames):
        ph = make_phantom(np.random.SeedSequence([6060, i]), preset, bits=bits)
        roi = detect_roi(ph.image)
        assert roi.ok
        tips = detect_tips(ph.image, roi, model, CFG.threshold, CFG.tile_overlap_px, CFG.max_batch, CFG.min_distance_px,
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
