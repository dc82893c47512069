"""Model side (export/): HRNet, training smoke run with resume, ONNX export and parity.

These need the ``train`` extra (torch, onnx, tqdm); without it they skip with that reason.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the 'train' extra (torch): pip install -e '.[train]'")
pytest.importorskip("onnx", reason="needs the 'train' extra (onnx): pip install -e '.[train]'")
pytest.importorskip("tqdm", reason="needs the 'train' extra (tqdm): pip install -e '.[train]'")

from export.data import CropRecipe, augment, build_crops  # noqa: E402
from export.hrnet import HRModule, HRNet, HRNetConfig  # noqa: E402
from export.onnx_export import export, parity, to_onnx_bytes  # noqa: E402
from export.train import TrainConfig, train  # noqa: E402

TINY = HRNetConfig(widths=(8, 16, 32), blocks=1, modules=(1, 1), stem=8, stage1_blocks=1, head=8)


def test_hrnet_is_multi_branch_with_fusion():
    m = HRNet(HRNetConfig())
    mods = [x for x in m.modules() if isinstance(x, HRModule)]
    assert len(mods) == 3 and len(mods[-1].branches) == 3
    # every output branch receives every input branch
    assert all(len(row) == len(mod.branches) for mod in mods for row in mod.fuse)
    y = m.eval()(torch.zeros(2, 1, 128, 96))
    assert tuple(y.shape) == (2, 2, 64, 48)


def _randomise_bn(model):
    g = torch.Generator().manual_seed(0)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return model.eval()


def test_onnx_parity_dynamic_batch_and_size():
    """Batch, height and width are dynamic: a crop of another size (any multiple of the
    size multiple, here 16 x 16 * k) runs and matches torch."""
    torch.manual_seed(0)
    model = _randomise_bn(HRNet(HRNetConfig()))
    assert HRNetConfig().size_multiple == 16
    data = to_onnx_bytes(model, (128, 128), {"polecheck.codec": "{}"})
    raw, _, _ = build_crops(3, 3, CropRecipe(size=(128, 128)), jobs=1)
    other, _, _ = build_crops(4, 1, CropRecipe(size=(96, 208)), jobs=1)
    from daemon.codec import normalise

    x = normalise(raw)[:, None]
    assert parity(model, data, x) <= 1e-4
    assert parity(model, data, x[:1]) <= 1e-4
    assert parity(model, data, normalise(other)[:, None]) <= 1e-4


def test_train_smoke_resume_and_export(tmp_path):
    recipe = CropRecipe(size=(64, 64))
    cfg = TrainConfig(steps=4, batch=4, cache_size=8, val_size=4, val_every=2, ckpt_every=2, warmup=1,
                      jobs=1, threads=1, model=TINY, crops=recipe)
    logs = []
    m = train(cfg, tmp_path, log=logs.append)
    assert set(m) >= {"precision", "recall", "mean_err_px"}
    assert (tmp_path / "last.pt").exists() and (tmp_path / "best.pt").exists()
    ck = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ck["step"] == 4
    # resume: continues from step 4 to 6 instead of starting over
    cfg2 = TrainConfig(**{**cfg.__dict__, "steps": 6})
    logs2 = []
    train(cfg2, tmp_path, log=logs2.append)
    assert any("resumed" in line and "step 4" in line for line in logs2)
    assert torch.load(tmp_path / "last.pt", weights_only=False)["step"] == 6
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "precision" in r] == [2, 4, 6]
    assert all(np.isfinite(r["loss"]) for r in rows)

    # fine-tune: a new run starts from those weights with its own optimizer and schedule
    cfg3 = TrainConfig(**{**cfg.__dict__, "steps": 2, "init": str(tmp_path / "last.pt")})
    logs3 = []
    train(cfg3, tmp_path / "ft", log=logs3.append)
    assert any("weights from" in line for line in logs3)
    assert torch.load(tmp_path / "ft" / "last.pt", weights_only=False)["step"] == 2

    res = export(tmp_path / "last.pt", tmp_path / "m.onnx", (64, 64))
    assert res["parity_max_abs"] <= 1e-4
    from daemon.model import KeypointModel

    km = KeypointModel(tmp_path / "m.onnx", res["sha256"], providers=("CPUExecutionProvider",))
    assert km.codec.input_size == (64, 64) and km.codec.stride == 2
    x = augment(*build_crops(5, 2, recipe, jobs=1)[::2], np.random.default_rng(0))
    assert km(x).shape == (2, 2, 32, 32)
