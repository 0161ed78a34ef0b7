"""Training pieces: split, seeded patches, losses, train_step, EMA, validation, NaN guard, early stop."""
import csv
import math
import pickle
from pathlib import Path

import pytest
import torch

from vmat_diffusion.case import load_case
from vmat_diffusion.phantom import write_phantoms
from vmat_diffusion.schedule import NoiseSchedule
from vmat_diffusion.training import loop
from vmat_diffusion.training import losses as losses_module
from vmat_diffusion.training.checkpoint import load_checkpoint, non_finite_tensors
from vmat_diffusion.training.config import TrainConfig
from vmat_diffusion.training.data import (CaseReader, EpochSampler, PatchDataset, micro_batches, scan_cases,
                                          split_cases, split_counts)
from vmat_diffusion.training.ema import EMA
from vmat_diffusion.training.losses import Objective, diffusion_loss, noise_loss, regression_loss
from vmat_diffusion.training.loop import (NonFiniteLossError, Trainer, ValidationResult, cosine_lr,
                                          make_optimizer, new_model, train_step, validate)

N_STRUCT, K = 8, 13


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    write_phantoms(folder, 5, shape=(32, 32, 32), spacing_mm=(8.0, 8.0, 8.0), seed=3)
    return folder


def tiny_config(data_dir, tmp_path, **overrides):
    values = dict(data_dir=str(data_dir), log_dir=str(tmp_path), exp_name="run", epochs=2, patch_size=16,
                  base_channels=4, levels=2, num_workers=0, val_split=0.2, test_split=0.2, lr=1e-3,
                  precision="32", gamma_subsample=2, val_overlap=0, progress=False)
    values.update(overrides)
    return TrainConfig(**values)


def random_batch(batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"ct": torch.rand(batch, 1, size, size, size, generator=g),
            "masks_sdf": torch.rand(batch, N_STRUCT, size, size, size, generator=g) * 2 - 1,
            "dose": torch.rand(batch, 1, size, size, size, generator=g) * 70,
            "constraints": torch.rand(batch, K, generator=g)}


# --------------------------------------------------------------------------- schedule and split


def test_cosine_lr_warmup_and_decay():
    assert cosine_lr(0, 1e-3, 1e-5, 10, 100) == pytest.approx(1e-4)
    assert cosine_lr(9, 1e-3, 1e-5, 10, 100) == pytest.approx(1e-3)
    assert cosine_lr(55, 1e-3, 1e-5, 10, 100) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert cosine_lr(100, 1e-3, 1e-5, 10, 100) == pytest.approx(1e-5)
    lrs = [cosine_lr(s, 1e-3, 0.0, 0, 50) for s in range(50)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_split_is_deterministic_disjoint_and_recorded(phantom_dir):
    catalog = scan_cases(phantom_dir)
    assert catalog.structures and catalog.constraint_dim == K
    a = split_cases(catalog.cases, 0.2, 0.2, seed=42)
    b = split_cases(list(reversed(catalog.cases)), 0.2, 0.2, seed=42)
    assert a.ids() == b.ids()
    ids = a.ids()
    assert (len(ids["train"]), len(ids["val"]), len(ids["test"])) == (3, 1, 1)
    assert len(set(ids["train"]) | set(ids["val"]) | set(ids["test"])) == 5
    others = {tuple(split_cases(catalog.cases, 0.2, 0.2, seed=s).ids()["val"]) for s in range(10)}
    assert len(others) > 1  # the seed matters


def test_split_counts_need_a_training_case():
    assert split_counts(100, 0.1, 0.1) == (80, 10, 10)
    assert split_counts(10, 0.1, 0.0) == (9, 1, 0)
    with pytest.raises(ValueError, match="too few"):
        split_counts(2, 0.1, 0.1)


def test_epoch_sampler_shards_evenly():
    keys = [list(EpochSampler(5, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 3
    assert {k[2] for k in keys[0] + keys[1]} == set(range(5))
    sampler = EpochSampler(5, seed=1)
    sampler.set_epoch(1)
    first = [k[2] for k in sampler]
    sampler.set_epoch(2)
    second = [k[2] for k in sampler]
    sampler.set_epoch(1)
    assert [k[2] for k in sampler] == first and sorted(first) == sorted(second) == list(range(5))


def test_patch_items_depend_only_on_the_key(phantom_dir):
    catalog = scan_cases(phantom_dir)
    reader = CaseReader([c.path for c in catalog.cases])
    dataset = PatchDataset(reader, catalog.structures, patch_size=16, patches_per_volume=3, seed=7)
    a, b = dataset[(1, 0, 2)], dataset[(1, 0, 2)]
    assert a["ct"].shape == (3, 1, 16, 16, 16) and a["masks_sdf"].shape == (3, N_STRUCT, 16, 16, 16)
    assert a["constraints"].shape == (3, K)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = dataset[(2, 0, 2)]
    assert not torch.equal(a["dose"], c["dose"])


def test_micro_batches_cut_the_patch_stream():
    items = [{k: v[:3] for k, v in random_batch(3, 4, seed=i).items()} for i in range(3)]
    batches = list(micro_batches(items, 2))
    assert [b["ct"].shape[0] for b in batches] == [2, 2, 2, 2, 1]
    assert torch.equal(torch.cat([b["dose"] for b in batches]), torch.cat([i["dose"] for i in items]))


# --------------------------------------------------------------------------- losses


def test_regression_loss_and_negative_penalty():
    target = torch.rand(2, 1, 4, 4, 4)
    assert float(regression_loss(target, target).total) == 0.0
    negative = -torch.ones(2, 1, 4, 4, 4)
    parts = regression_loss(negative, torch.zeros_like(negative), penalty_weight=0.1)
    assert float(parts.penalty) == pytest.approx(1.0)
    assert float(parts.total) == pytest.approx(1.1)


def test_diffusion_penalty_is_well_conditioned_at_high_noise():
    """The penalty on x0_hat is weighted by alpha-bar, so at t = T-1 its gradient stays ~ the MSE's."""
    schedule = NoiseSchedule(1000, "cosine")
    x0 = -torch.ones(1, 1, 4, 4, 4)  # 0 Gy everywhere: any downward eps error makes x0_hat negative
    noise = torch.randn(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999])
    x_t = schedule.add_noise(x0, noise, t)
    eps_hat = (noise + 0.5).requires_grad_(True)
    parts = noise_loss(eps_hat, noise, x_t, t, schedule, penalty_weight=0.1)
    parts.total.backward()
    amplification = float(1 / schedule.alpha_bar(999).sqrt())
    assert amplification > 1e4  # the unweighted penalty would be this badly conditioned
    assert float(parts.penalty.detach()) <= float(parts.mse.detach())
    assert float(eps_hat.grad.abs().max()) < 1.0


def test_diffusion_loss_uses_the_generator():
    torch.manual_seed(0)
    model = new_model("ddpm", N_STRUCT, K, 4, 2)
    schedule = NoiseSchedule(100)
    batch = random_batch()
    with torch.no_grad():
        losses = [float(diffusion_loss(model, batch, schedule, 70.0, generator=torch.Generator().manual_seed(s)).total)
                  for s in (1, 1, 2)]
    assert losses[0] == losses[1] != losses[2]


# --------------------------------------------------------------------------- step, EMA


def test_train_step_lowers_the_loss():
    torch.manual_seed(0)
    model = new_model("baseline", N_STRUCT, K, 4, 2)
    optimizer = make_optimizer(model, lr=3e-3)
    objective = Objective("baseline", 70.0)
    batch = random_batch()
    first = train_step(model, [batch], optimizer, objective)
    for _ in range(15):
        last = train_step(model, [batch], optimizer, objective)
    assert first.finite and last.finite and last.loss < 0.7 * first.loss


def test_accumulation_equals_one_big_batch():
    objective = Objective("baseline", 70.0, penalty_weight=0.0)
    batch = random_batch(4)
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    grads = []
    for batches in ([batch], halves):
        torch.manual_seed(0)
        model = new_model("baseline", N_STRUCT, K, 4, 2)
        with torch.no_grad():  # the output layer starts at 0; make every layer receive gradient
            for p in model.parameters():
                p.add_(0.01)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        train_step(model, batches, optimizer, objective, clip=None)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_non_finite_step_changes_nothing():
    torch.manual_seed(0)
    model = new_model("baseline", N_STRUCT, K, 4, 2)
    optimizer = make_optimizer(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = random_batch()
    batch["dose"][0, 0, 0, 0, 0] = float("nan")
    result = train_step(model, [batch], optimizer, Objective("baseline", 70.0))
    assert not result.finite and math.isnan(result.loss) and result.non_finite == "loss"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_non_finite_gradient_with_a_finite_loss_changes_nothing():
    # as bf16 conv3d backward on the CPU sometimes gives: a NaN weight gradient, a finite loss
    torch.manual_seed(0)
    model = new_model("baseline", N_STRUCT, K, 4, 2)
    optimizer = make_optimizer(model)
    ema = EMA(model, 0.9)
    first_weight = next(p for p in model.parameters() if p.dim() >= 2)
    first_weight.register_hook(lambda grad: grad * float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_step(model, [random_batch()], optimizer, Objective("baseline", 70.0), ema=ema)
    assert not result.finite and math.isfinite(result.loss) and math.isnan(result.grad_norm)
    assert result.non_finite == "gradient"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not optimizer.state and ema.num_updates == 0


def test_a_non_finite_loss_on_another_process_is_reported_as_a_loss(monkeypatch):
    # under DDP all processes agree; here this process's loss is finite, another's was NaN
    monkeypatch.setattr(loop.dist_utils, "all_true", lambda flag, device: False)
    model = new_model("baseline", N_STRUCT, K, 4, 2)
    result = train_step(model, [random_batch()], make_optimizer(model), Objective("baseline", 70.0))
    assert not result.finite and math.isfinite(result.loss) and result.non_finite == "loss"
    message = str(NonFiniteLossError(1, 1, result.loss, result.grad_norm, result.non_finite))
    assert message.startswith("non-finite loss on another process at epoch 1 step 1")
    assert str(NonFiniteLossError(1, 1, 0.5, float("nan"))).startswith("non-finite gradient at epoch 1 step 1")
    copy = pickle.loads(pickle.dumps(NonFiniteLossError(1, 1, result.loss, result.grad_norm, result.non_finite)))
    assert str(copy) == message and copy.what == "loss"


def _model_every_layer_learns(seed=0):
    torch.manual_seed(seed)
    model = new_model("baseline", N_STRUCT, K, 4, 2)
    with torch.no_grad():  # the output layer starts at 0; make every layer receive gradient
        for p in model.parameters():
            p.add_(0.01)
    return model


def test_a_grad_scaler_step_equals_the_unscaled_step_with_clipping_active():
    # SGD, not Adam (whose update hides a wrongly scaled gradient): clipping the scaled gradient
    # before unscale_ would shrink this step 65536-fold
    objective = Objective("baseline", 70.0)
    batch = random_batch()
    weights, norms = [], []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)):
        model = _model_every_layer_learns()
        result = train_step(model, [batch], torch.optim.SGD(model.parameters(), lr=0.1), objective,
                            scaler=scaler, clip=1e-3)
        assert result.finite and not result.scaler_skipped
        norms.append(result.grad_norm)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert norms[0] > 10 * 1e-3  # clipping is active
    assert norms[1] == pytest.approx(norms[0], rel=1e-6)
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-6, atol=1e-9)


def test_a_grad_scaler_skips_an_overflowing_step_and_the_ema_waits():
    model = _model_every_layer_learns()
    optimizer = make_optimizer(model)
    ema = EMA(model, 0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    weight = next(p for p in model.parameters() if p.dim() >= 2)
    hook = weight.register_hook(lambda grad: grad * float("inf"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_step(model, [random_batch()], optimizer, Objective("baseline", 70.0), scaler=scaler, ema=ema)
    assert result.finite and result.scaler_skipped and not math.isfinite(result.grad_norm)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not optimizer.state and ema.num_updates == 0 and scaler.get_scale() == 512.0
    hook.remove()
    result = train_step(model, [random_batch()], optimizer, Objective("baseline", 70.0), scaler=scaler, ema=ema)
    assert result.finite and not result.scaler_skipped and ema.num_updates == 1
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ema_follows_with_warmup():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(1.0)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.update(model)  # first decay = min(0.9, 1/10) = 0.1: new = 0.1 old + 0.9 weights
    for name, value in ema.module.state_dict().items():
        assert torch.allclose(value, 0.1 * before[name] + 0.9 * torch.ones_like(value), atol=1e-6)
    start = EMA(torch.nn.Linear(2, 1), 0.9)
    assert ema.num_updates == 1
    for _ in range(200):
        ema.update(model)
    assert torch.allclose(ema.module.weight, torch.ones(1, 2), atol=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters()) and start.current_decay() == pytest.approx(0.1)


# --------------------------------------------------------------------------- validation


def test_validate_whole_volume(phantom_dir):
    case = load_case(sorted(phantom_dir.glob("*.npz"))[0])
    torch.manual_seed(0)
    model = new_model("baseline", N_STRUCT, K, 4, 2)
    result = validate(model, [case], Objective("baseline", 70.0), patch_size=16, overlap=4, gamma_subsample=2)
    assert result.loss_count == result.mae_count == 1
    mask = case.extras["possible_dose_mask"] > 0
    # the untrained model outputs 0 everywhere: its MAE is the mean dose inside the mask
    assert result.mae_gy == pytest.approx(float(case.dose[mask].mean()), rel=1e-4)
    assert result.gamma is not None and 0.0 <= result.gamma <= 100.0
    ct, ref, pred = result.example
    assert ct.shape == ref.shape == pred.shape == case.shape


def test_validate_ddpm_samples_only_the_first_case(phantom_dir):
    cases = [load_case(p) for p in sorted(phantom_dir.glob("*.npz"))[:2]]
    torch.manual_seed(0)
    model = new_model("ddpm", N_STRUCT, K, 4, 2)
    objective = Objective("ddpm", 70.0, schedule=NoiseSchedule(20))
    kwargs = dict(patch_size=16, overlap=4, ddim_steps=2, gamma_subsample=None, sample_cases=1)
    result = validate(model, cases, objective, **kwargs)
    again = validate(model, cases, objective, **kwargs)
    assert result.loss_count == 2 and result.mae_count == 1 and result.gamma is None
    assert result.loss == again.loss and result.mae_gy == again.mae_gy  # fixed noise per case


# --------------------------------------------------------------------------- the Trainer


def test_trainer_ddpm_with_ema(phantom_dir, tmp_path):
    cfg = tiny_config(phantom_dir, tmp_path, model="ddpm", epochs=1, timesteps=20, ddim_steps=2,
                      accumulate_grad_batches=2)
    trainer = Trainer(cfg)
    summary = trainer.fit()
    assert summary["epochs_completed"] == 1 and summary["final_val_mae_gy"] is not None
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert checkpoint["model_kind"] == "ddpm" and checkpoint["ema"] is not None
    assert checkpoint["schedule"] == {"timesteps": 20, "schedule": "cosine"}
    # 3 cases x 4 patches / batch 2 = 6 micro-batches -> 3 optimizer steps of 2
    assert checkpoint["global_step"] == 3 and checkpoint["ema"]["num_updates"] == 3


def test_nan_loss_stops_the_run_without_a_checkpoint(phantom_dir, tmp_path, monkeypatch):
    real_loss = losses_module.baseline_loss
    calls = {"n": 0}

    def loss_that_breaks(*args, **kwargs):
        calls["n"] += 1
        parts = real_loss(*args, **kwargs)
        if calls["n"] == 8:  # epoch 2 (6 steps per epoch), its 2nd step
            parts.total = parts.total * float("nan")
        return parts

    monkeypatch.setattr(losses_module, "baseline_loss", loss_that_breaks)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at epoch 2 step 8"):
        Trainer(tiny_config(phantom_dir, tmp_path)).fit()
    folder = tmp_path / "run" / "checkpoints"
    last = load_checkpoint(folder / "last.ckpt")
    assert last["epoch"] == 1 and not non_finite_tensors(last["model"])
    assert all("epoch=002" not in p.name for p in folder.iterdir())
    summary = (tmp_path / "run" / "training_summary.json").read_text()
    assert "non-finite loss at epoch 2 step 8" in summary


def test_nan_loss_skipped_by_flag(phantom_dir, tmp_path, monkeypatch):
    real_loss = losses_module.baseline_loss
    calls = {"n": 0}

    def loss_that_breaks(*args, **kwargs):
        calls["n"] += 1
        parts = real_loss(*args, **kwargs)
        if calls["n"] == 2:
            parts.total = parts.total + float("inf")
        return parts

    monkeypatch.setattr(losses_module, "baseline_loss", loss_that_breaks)
    summary = Trainer(tiny_config(phantom_dir, tmp_path, epochs=1, skip_nonfinite=True)).fit()
    assert summary["global_steps"] == 5  # 6 micro-batches, one skipped
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert not non_finite_tensors(last["model"])


class _StopAfterEpochOne(Exception):
    pass


def run_stopped_after_epoch_one(config, monkeypatch):
    """``Trainer(config).fit()`` stopped right after epoch 1's last.ckpt, as by a crash; returns its path."""
    real_save = loop.save_checkpoint

    def save_then_stop(path, payload):
        real_save(path, payload)
        if payload["epoch"] == 1 and path.name == "last.ckpt":
            raise _StopAfterEpochOne

    with monkeypatch.context() as patch:
        patch.setattr(loop, "save_checkpoint", save_then_stop)
        with pytest.raises(_StopAfterEpochOne):
            Trainer(config).fit()
    return Path(config.log_dir) / config.exp_name / "checkpoints" / "last.ckpt"


def _fp16_on_the_cpu(monkeypatch):
    """The Trainer's fp16 + GradScaler path (CUDA-only from the flags) on the CPU."""
    monkeypatch.setattr(loop, "resolve_precision", lambda precision, device: (torch.float16, True))


def test_fp16_loss_scaling_checkpoints_its_scaler_and_resumes_exactly(phantom_dir, tmp_path, monkeypatch):
    _fp16_on_the_cpu(monkeypatch)
    straight = Trainer(tiny_config(phantom_dir, tmp_path / "straight", epochs=2))
    straight.fit()
    assert straight.scaler.is_enabled() and straight.autocast_dtype == torch.float16
    expected = load_checkpoint(tmp_path / "straight" / "run" / "checkpoints" / "last.ckpt")
    assert expected["scaler"]["scale"] > 0 and not non_finite_tensors(expected["model"])
    from test_train_cli import event_tags
    assert {"misc/loss_scale", "misc/scaler_skipped_steps"} <= event_tags(tmp_path / "straight" / "run")

    last = run_stopped_after_epoch_one(tiny_config(phantom_dir, tmp_path / "resumed", epochs=2), monkeypatch)
    resumed = Trainer(tiny_config(phantom_dir, tmp_path / "resumed", epochs=2, resume=str(last)))
    resumed.fit()
    final = load_checkpoint(last)
    assert final["scaler"] == expected["scaler"] and final["global_step"] == expected["global_step"]
    assert all(torch.equal(final["model"][k], v) for k, v in expected["model"].items())


def test_fp16_steps_skipped_by_the_scaler_count_until_too_many_in_a_row(phantom_dir, tmp_path, monkeypatch):
    _fp16_on_the_cpu(monkeypatch)
    skipped = loop.StepResult(loss=0.5, finite=True, grad_norm=float("inf"), scaler_skipped=True)
    monkeypatch.setattr(loop, "train_step", lambda *args, **kwargs: skipped)
    with pytest.raises(NonFiniteLossError, match=rf"non-finite gradient in {loop.SCALER_SKIPS_IN_A_ROW_LIMIT} "
                                                 r"steps in a row \(fp16 loss scaling\) at epoch 4 step 20"):
        Trainer(tiny_config(phantom_dir, tmp_path, epochs=5, val_every=5)).fit()


def test_fp16_skips_with_skip_nonfinite_restart_the_scale_after_too_many_in_a_row(phantom_dir, tmp_path, monkeypatch):
    _fp16_on_the_cpu(monkeypatch)
    real_new_model = loop.new_model

    def model_with_an_infinite_gradient(*args, **kwargs):
        model = real_new_model(*args, **kwargs)
        next(p for p in model.parameters() if p.dim() >= 2).register_hook(lambda grad: grad * float("inf"))
        return model

    monkeypatch.setattr(loop, "new_model", model_with_an_infinite_gradient)
    trainer = Trainer(tiny_config(phantom_dir, tmp_path, epochs=4, val_every=4, skip_nonfinite=True))
    trainer.fit()  # 24 steps, every one skipped by the scaler
    # halved 19 times, restarted at step 20, then halved on steps 21-24
    assert trainer.scaler.get_scale() == loop.SCALER_INIT_SCALE / 2 ** 4
    assert trainer.scaler_skipped_steps == 6 and trainer.global_step == 23


def test_a_scaler_whose_scale_no_longer_falls_still_reports_its_skips():
    model = _model_every_layer_learns()
    next(p for p in model.parameters() if p.dim() >= 2).register_hook(lambda grad: grad * float("inf"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** -148)  # halved twice, it is 0 or the smallest float
    scales, results = [], []
    for _ in range(4):
        results.append(train_step(model, [random_batch()], make_optimizer(model), Objective("baseline", 70.0),
                                  scaler=scaler))
        scales.append(scaler.get_scale())
    assert scales[-1] == scales[-2]  # the scale stopped falling, the skips go on
    assert all(r.scaler_skipped and r.finite for r in results)


def test_early_stopping_and_best_three(phantom_dir, tmp_path, monkeypatch):
    maes = iter([3.0, 2.0, 2.5, 1.0, 1.5, 1.6, 1.7, 9.0])

    def fake_validate(*args, **kwargs):
        return ValidationResult(loss_sum=1.0, loss_count=1, mae_sum=next(maes), mae_count=1)

    monkeypatch.setattr(loop, "validate", fake_validate)
    summary = Trainer(tiny_config(phantom_dir, tmp_path, epochs=8, patience=3)).fit()
    assert summary["early_stopped"] and summary["epochs_completed"] == 7
    assert summary["best_val_mae_gy"] == 1.0 and summary["best_epoch"] == 4
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["best-epoch=004-val_mae_gy=1.00.ckpt", "best-epoch=005-val_mae_gy=1.50.ckpt",
                     "best-epoch=006-val_mae_gy=1.60.ckpt", "last.ckpt"]


def test_patience_counts_validations_not_epochs(phantom_dir, tmp_path, monkeypatch):
    maes = iter([3.0, 2.0, 2.5, 2.6, 9.0])

    def fake_validate(*args, **kwargs):
        return ValidationResult(loss_sum=1.0, loss_count=1, mae_sum=next(maes), mae_count=1)

    monkeypatch.setattr(loop, "validate", fake_validate)
    # validations at epochs 3, 6, 9, 12: best at 6, then two without improvement -> stop at 12
    summary = Trainer(tiny_config(phantom_dir, tmp_path, epochs=15, val_every=3, patience=2)).fit()
    assert summary["early_stopped"] and summary["epochs_completed"] == 12 and summary["best_epoch"] == 6


def test_patience_shorter_than_the_validation_interval_waits_for_validations(phantom_dir, tmp_path):
    summary = Trainer(tiny_config(phantom_dir, tmp_path, epochs=5, val_every=3, patience=2)).fit()
    assert not summary["early_stopped"] and summary["epochs_completed"] == 5


def test_a_fresh_run_into_a_folder_that_holds_a_run_is_refused(phantom_dir, tmp_path):
    Trainer(tiny_config(phantom_dir, tmp_path, epochs=1)).fit()
    with pytest.raises(ValueError, match=r"already holds a run .*continue it with resume= .*last\.ckpt, or choose "
                                         r"another exp_name or log_dir"):
        Trainer(tiny_config(phantom_dir, tmp_path, epochs=1, lr=5e-4)).fit()
    summary = Trainer(tiny_config(phantom_dir, tmp_path, epochs=1, exp_name="other")).fit()
    assert summary["epochs_completed"] == 1


def test_resume_with_another_batch_size_continues_the_learning_rate_curve(phantom_dir, tmp_path):
    first = Trainer(tiny_config(phantom_dir, tmp_path, epochs=2, batch_size=1))
    first.fit()
    resumed = Trainer(tiny_config(phantom_dir, tmp_path, epochs=4, batch_size=2,
                                  resume=str(tmp_path / "run" / "checkpoints" / "last.ckpt")))
    resumed.fit()
    steps = resumed.steps_per_epoch
    assert steps < first.steps_per_epoch
    with open(tmp_path / "run" / "epoch_metrics.csv", newline="") as f:
        lrs = [float(row["learning_rate"]) for row in csv.DictReader(f)]
    # epoch 3 ends at position 3 - 1/steps of 4 epochs: halfway down the cosine, not at min_lr
    expected = cosine_lr(3 * steps - 1, 1e-3, resumed.config.min_lr, 0, 4 * steps)
    assert lrs[2] == pytest.approx(expected) and lrs[2] > 100 * resumed.config.min_lr


def test_a_run_saved_on_a_gpu_resumes_on_the_cpu(phantom_dir, tmp_path):
    # a CUDA generator's state is 16 bytes and does not fit the CPU generator (5056 bytes)
    Trainer(tiny_config(phantom_dir, tmp_path, epochs=1)).fit()
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint(last)
    checkpoint["rng"]["train_generator"] = torch.zeros(16, dtype=torch.uint8)
    checkpoint["rng"]["torch_cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    loop.save_checkpoint(last, checkpoint)
    summary = Trainer(tiny_config(phantom_dir, tmp_path, epochs=2, resume=str(last))).fit()
    assert summary["epochs_completed"] == 2


def test_resume_uses_the_given_weight_decay_and_ema_decay(phantom_dir, tmp_path):
    Trainer(tiny_config(phantom_dir, tmp_path, epochs=1, ema=True, ema_decay=0.99, weight_decay=0.01)).fit()
    resumed = Trainer(tiny_config(phantom_dir, tmp_path, epochs=2, ema=True, ema_decay=0.5, weight_decay=0.2,
                                  resume=str(tmp_path / "run" / "checkpoints" / "last.ckpt")))
    resumed.fit()
    assert [g["weight_decay"] for g in resumed.optimizer.param_groups] == [0.2, 0.0]
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert resumed.ema.decay == 0.5 and saved["ema"]["decay"] == 0.5
    assert saved["optimizer"]["param_groups"][0]["weight_decay"] == 0.2


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="patch_size"):
        TrainConfig(data_dir="x", patch_size=20, levels=4).validate()
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(data_dir="x", lr=-1.0).validate()
    with pytest.raises(ValueError, match="val_split"):
        TrainConfig(data_dir="x", val_split=0.6, test_split=0.5).validate()
    with pytest.raises(ValueError, match="model"):
        TrainConfig(data_dir="x", model="gan").validate()
