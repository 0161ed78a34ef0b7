"""CUDA paths end to end (skipped without a GPU; ``benchmarks/gpu_suite.sh`` runs them first).

The CPU suite covers the same code through the CPU: these check what only a GPU exercises:
training in bf16 and in fp16 with a CUDA GradScaler, checkpoints saved on the GPU and resumed on
the CPU, deterministic training steps and a deterministic run resumed bit for bit, and inference
against the CPU result.
"""
import pytest
import torch

from vmat_diffusion.sliding_window import sliding_window_inference
from vmat_diffusion.training import loop
from vmat_diffusion.training.checkpoint import load_checkpoint, non_finite_tensors
from vmat_diffusion.training.loop import Trainer, make_optimizer, new_model, train_step
from vmat_diffusion.training.losses import Objective

from test_training import phantom_dir, random_batch, run_stopped_after_epoch_one, tiny_config  # noqa: F401

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("precision, scaler", [("bf16", False), ("16", True)])
def test_training_on_the_gpu_then_resuming_on_the_cpu(phantom_dir, tmp_path, precision, scaler):
    trainer = Trainer(tiny_config(phantom_dir, tmp_path, epochs=1, device="cuda", precision=precision))
    summary = trainer.fit()
    assert summary["epochs_completed"] == 1 and trainer.scaler.is_enabled() == scaler
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint(last)
    assert not non_finite_tensors(checkpoint["model"]) and bool(checkpoint["scaler"]) == scaler
    resumed = Trainer(tiny_config(phantom_dir, tmp_path, epochs=2, device="cpu", precision="32", resume=str(last)))
    assert resumed.fit()["epochs_completed"] == 2


def test_a_deterministic_run_on_the_gpu_resumes_exactly(phantom_dir, tmp_path, monkeypatch):
    settings = dict(epochs=2, device="cuda", precision="32", deterministic=True)
    Trainer(tiny_config(phantom_dir, tmp_path / "straight", **settings)).fit()
    expected = load_checkpoint(tmp_path / "straight" / "run" / "checkpoints" / "last.ckpt")
    last = run_stopped_after_epoch_one(tiny_config(phantom_dir, tmp_path / "resumed", **settings), monkeypatch)
    Trainer(tiny_config(phantom_dir, tmp_path / "resumed", resume=str(last), **settings)).fit()
    final = load_checkpoint(last)
    assert all(torch.equal(final["model"][k], v) for k, v in expected["model"].items())


def test_a_deterministic_training_step_on_the_gpu_repeats_exactly():
    batch = random_batch()
    settings = loop.determinism_state()
    loop.enable_determinism()
    try:
        weights = []
        for _ in range(2):
            torch.manual_seed(0)
            model = new_model("baseline", 8, 13, 4, 2).cuda()
            optimizer = make_optimizer(model, lr=1e-3)
            for _ in range(3):
                train_step(model, [batch], optimizer, Objective("baseline", 70.0))
            weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    finally:
        loop.restore_determinism(settings)
    assert torch.equal(weights[0], weights[1])


def test_gpu_inference_gives_the_cpu_result():
    torch.manual_seed(0)
    model = new_model("baseline", 8, 13, 4, 2).eval()
    with torch.no_grad():  # the output layer starts at 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    volume = torch.randn(1, 9, 40, 36, 20)
    constraints = torch.rand(1, 13)

    def predict(model, volume, constraints):
        return sliding_window_inference(volume, lambda w, c: model(w, c), patch_size=16, overlap=4,
                                        volume_args=(constraints,))

    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            expected = predict(model, volume, constraints)
            result = predict(model.cuda(), volume.cuda(), constraints.cuda())
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert result.is_cuda
    torch.testing.assert_close(result.cpu(), expected, rtol=1e-4, atol=1e-5)
