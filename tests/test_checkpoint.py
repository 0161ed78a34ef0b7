"""Checkpoint format: safe loading (weights_only), atomic writes, RNG states, model rebuilding."""
import argparse
import os
import random
import zipfile

import numpy as np
import pytest
import torch

from vmat_diffusion.training import checkpoint as ckpt
from vmat_diffusion.training.checkpoint import (CheckpointError, best_checkpoint_name, capture_rng_state,
                                                load_checkpoint, load_model_from_checkpoint, restore_rng_state,
                                                save_checkpoint, strip_module_prefix)
from vmat_diffusion.training.ema import EMA
from vmat_diffusion.unet import BaselineUNet3D


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return BaselineUNet3D(in_channels=3, base_channels=4, levels=2, constraint_dim=2, groups=4)


def minimal_checkpoint(model, ema=None):
    return {"format_version": ckpt.FORMAT_VERSION, "model_kind": "baseline", "model_class": "BaselineUNet3D",
            "model_config": dict(model.config), "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "rx_dose_gy": 70.0,
            "structures": ["A", "B"], "rng": capture_rng_state(), "config": {"patch_size": 16}}


class ArbitraryCode:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_roundtrip_with_weights_only(tmp_path):
    model = tiny_model()
    path = save_checkpoint(tmp_path / "a.ckpt", minimal_checkpoint(model))
    raw = torch.load(path, weights_only=True)  # plain torch can read it without unpickling objects
    assert raw["model_class"] == "BaselineUNet3D"
    loaded = load_checkpoint(path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["model"][key], value)


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"format_version": 1, "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(CheckpointError, match="non-tensor") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="non-tensor"):
        load_model_from_checkpoint(path)


def test_malicious_pickle_does_not_run(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"format_version": 1, "payload": ArbitraryCode(str(marker))}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    (b"not a checkpoint at all", "not a PyTorch checkpoint"),
])
def test_missing_or_garbage_file(tmp_path, content, message):
    path = tmp_path / "x.ckpt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_a_case_file_given_as_checkpoint_is_named_as_such(tmp_path):
    path = tmp_path / "case.npz"
    np.savez(path, ct=np.zeros((2, 2, 2), np.float32), dose=np.zeros((2, 2, 2), np.float32))
    with pytest.raises(CheckpointError, match=r"case.npz: a numpy .npz archive \(a case file\?\), not a checkpoint"):
        load_checkpoint(path)


def test_plain_state_dict_is_not_a_training_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(tiny_model().state_dict(), path)
    with pytest.raises(CheckpointError, match="format_version"):
        load_checkpoint(path)


def test_truncated_file(tmp_path):
    path = save_checkpoint(tmp_path / "a.ckpt", minimal_checkpoint(tiny_model()))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_non_finite_weights_are_never_written(tmp_path):
    path = tmp_path / "last.ckpt"
    good = tiny_model()
    save_checkpoint(path, minimal_checkpoint(good))
    before = path.read_bytes()
    bad = tiny_model()
    with torch.no_grad():
        next(bad.parameters())[0].fill_(float("nan"))
    with pytest.raises(CheckpointError, match="non-finite"):
        save_checkpoint(path, minimal_checkpoint(bad))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_crash_during_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_checkpoint(path, minimal_checkpoint(tiny_model(0)))
    before = path.read_bytes()

    def dying_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # e.g. the process is interrupted mid-write

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, minimal_checkpoint(tiny_model(1)))
    assert path.read_bytes() == before
    assert zipfile.is_zipfile(path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_rng_state_roundtrip_through_file(tmp_path):
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    path = save_checkpoint(tmp_path / "r.ckpt", {**minimal_checkpoint(tiny_model()),
                                                   "rng": capture_rng_state(generator)})
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)],
                torch.rand(3, generator=generator))
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    generator.manual_seed(99)
    restore_rng_state(load_checkpoint(path)["rng"], generator)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]
    assert torch.equal(torch.rand(3, generator=generator), expected[3])


def test_load_model_prefers_ema_and_strips_module_prefix(tmp_path):
    model = tiny_model(0)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.add_(1.0)
    state = minimal_checkpoint(model, ema)
    state["model"] = {f"module.{k}": v for k, v in state["model"].items()}  # as a DDP model would name them
    path = save_checkpoint(tmp_path / "m.ckpt", state)

    averaged, info = load_model_from_checkpoint(path)
    assert info["used_ema"] and info["model_kind"] == "baseline" and info["rx_dose_gy"] == 70.0
    assert not averaged.training
    assert torch.equal(next(averaged.parameters()), next(ema.module.parameters()))

    raw, info = load_model_from_checkpoint(path, use_ema=False)
    assert not info["used_ema"]
    assert torch.equal(next(raw.parameters()), next(model.parameters()))


def test_strip_module_prefix_and_names():
    assert strip_module_prefix({"module.a.b": 1, "c": 2}) == {"a.b": 1, "c": 2}
    assert best_checkpoint_name(7, 1.234) == "best-epoch=007-val_mae_gy=1.23.ckpt"


def test_no_weights_only_false_in_package():
    import vmat_diffusion
    root = os.path.dirname(vmat_diffusion.__file__)
    offenders = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name)) as source:
                    text = source.read()
                if "weights_only=False" in text.replace(" ", ""):
                    offenders.append(name)
    assert offenders == []
