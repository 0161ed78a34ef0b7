"""Training options: explicit validation cases, L1 loss, validation interval, time budget,
CPU precision and denormal flushing."""
import csv
import json
import os

import pytest
import torch

from vmat_diffusion.cli import train as train_cli
from vmat_diffusion.phantom import make_phantom
from vmat_diffusion.case import save_case
from vmat_diffusion.training import loop
from vmat_diffusion.training.checkpoint import load_checkpoint
from vmat_diffusion.training.config import TrainConfig
from vmat_diffusion.training.data import scan_cases, select_cases, split_with_validation
from vmat_diffusion.training.losses import Objective, noise_loss, regression_loss
from vmat_diffusion.schedule import NoiseSchedule

from test_training import phantom_dir, tiny_config  # noqa: F401  (shared fixture and settings)


def epoch_rows(run_dir):
    with open(run_dir / "epoch_metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- explicit validation


def test_val_ids_fix_the_validation_cases(phantom_dir, tmp_path):
    ids = [c.case_id for c in scan_cases(phantom_dir).cases]
    chosen = [ids[3], ids[0]]
    summary = loop.Trainer(tiny_config(phantom_dir, tmp_path, epochs=1, val_ids=chosen, test_split=0.0)).fit()
    assert summary["final_val_mae_gy"] is not None
    record = json.loads((tmp_path / "run" / "training_config.json").read_text())["data"]
    assert record["val_case_ids"] == sorted(chosen) and record["validation"] == "explicit"
    assert record["train_case_ids"] == sorted(set(ids) - set(chosen)) and record["test_case_ids"] == []
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["split"]["val"] == sorted(chosen)


def test_val_ids_keep_test_split_of_the_rest():
    class Info:
        def __init__(self, case_id):
            self.case_id = case_id
    cases = [Info(f"c{i}") for i in range(10)]
    val, rest = select_cases(cases, ["c7", "c2", "c7"], "data")
    assert [c.case_id for c in val] == ["c7", "c2"] and len(rest) == 8
    split = split_with_validation(rest, val, test_split=0.25, seed=1)
    ids = split.ids()
    assert ids["val"] == ["c2", "c7"] and len(ids["test"]) == 2 and len(ids["train"]) == 6
    assert not set(ids["test"]) & set(ids["val"]) and not set(ids["train"]) & set(ids["test"])
    assert split_with_validation(rest, val, test_split=0.25, seed=1).ids() == ids


def test_unknown_val_id_is_named(phantom_dir, tmp_path):
    with pytest.raises(ValueError, match=r"val_ids: case id\(s\) \['nobody'\] not found in data_dir"):
        loop.Trainer(tiny_config(phantom_dir, tmp_path, val_ids=["nobody"])).fit()


def test_val_dir_validates_on_a_second_folder(phantom_dir, tmp_path):
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    for i in range(2):
        save_case(val_dir / f"v{i}.npz", make_phantom(f"val_{i}", shape=(32, 32, 32), spacing_mm=(8.0, 8.0, 8.0),
                                                      seed=40 + i))
    summary = loop.Trainer(tiny_config(phantom_dir, tmp_path, epochs=1, val_dir=str(val_dir),
                                       test_split=0.0)).fit()
    assert summary["final_val_mae_gy"] is not None
    record = json.loads((tmp_path / "run" / "training_config.json").read_text())["data"]
    assert record["val_case_ids"] == ["val_0", "val_1"] and len(record["train_case_ids"]) == 5
    assert record["val_dir"] == str(val_dir)


def test_val_dir_with_a_training_case_id_is_refused(phantom_dir, tmp_path):
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    first = scan_cases(phantom_dir).cases[0]
    save_case(val_dir / "dup.npz", make_phantom(first.case_id, shape=(32, 32, 32), spacing_mm=(8.0, 8.0, 8.0)))
    with pytest.raises(ValueError, match=f"val_dir: case id\\(s\\) \\['{first.case_id}'\\] are also in data_dir"):
        loop.Trainer(tiny_config(phantom_dir, tmp_path, val_dir=str(val_dir))).fit()


def test_config_checks_of_the_new_options():
    with pytest.raises(ValueError, match="val_dir, val_ids: give one"):
        TrainConfig(data_dir="x", val_dir="v", val_ids=["a"]).validate()
    with pytest.raises(ValueError, match="val_ids: expected a list"):
        TrainConfig(data_dir="x", val_ids="pt_1").validate()
    with pytest.raises(ValueError, match="val_ids: expected at least one"):
        TrainConfig(data_dir="x", val_ids=[]).validate()
    with pytest.raises(ValueError, match="loss: expected one of mse, l1"):
        TrainConfig(data_dir="x", loss="huber").validate()
    with pytest.raises(ValueError, match="val_every"):
        TrainConfig(data_dir="x", val_every=0).validate()
    with pytest.raises(ValueError, match="max_minutes"):
        TrainConfig(data_dir="x", max_minutes=0).validate()
    # val_split is unused (and may be 0) when the validation cases are explicit
    assert TrainConfig(data_dir="x", val_ids=["a"], val_split=0.0).validate().explicit_validation


def test_cli_val_ids_accept_spaces_and_commas(phantom_dir):
    args = train_cli.build_parser().parse_args(["--data_dir", str(phantom_dir), "--val_ids", "a,b", "c",
                                                "--loss", "l1", "--val_every", "3", "--max_minutes", "90"])
    config = train_cli.config_from_args(args).validate()
    assert config.val_ids == ["a", "b", "c"] and config.loss == "l1"
    assert config.val_every == 3 and config.max_minutes == 90.0


# --------------------------------------------------------------------------- losses


def test_l1_loss_is_the_mean_absolute_error():
    prediction = torch.tensor([0.5, -0.2, 1.0]).reshape(1, 1, 3, 1, 1)
    target = torch.tensor([0.0, 0.0, 0.4]).reshape(1, 1, 3, 1, 1)
    parts = regression_loss(prediction, target, penalty_weight=0.0, loss="l1")
    assert float(parts.total) == pytest.approx((0.5 + 0.2 + 0.6) / 3)
    assert float(parts.mse) == pytest.approx((0.25 + 0.04 + 0.36) / 3)
    with_penalty = regression_loss(prediction, target, penalty_weight=1.0, loss="l1")
    assert float(with_penalty.total) == pytest.approx((0.5 + 0.2 + 0.6) / 3 + 0.04 / 3)
    schedule = NoiseSchedule(10)
    eps = torch.zeros(1, 1, 2, 2, 2)
    noise = torch.full_like(eps, 0.5)
    t = torch.tensor([3])
    x_t = schedule.add_noise(torch.zeros_like(eps), noise, t)
    assert float(noise_loss(eps, noise, x_t, t, schedule, 0.0, "l1").data) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="loss: expected one of mse, l1"):
        Objective("baseline", 70.0, loss_kind="l2")


def test_training_with_l1_loss_runs_and_learns(phantom_dir, tmp_path):
    loop.Trainer(tiny_config(phantom_dir, tmp_path, epochs=1, loss="l1")).fit()
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["config"]["loss"] == "l1"
    torch.manual_seed(0)
    model = loop.new_model("baseline", 8, 13, base_channels=4, levels=2)
    optimizer = loop.make_optimizer(model, lr=3e-3)
    g = torch.Generator().manual_seed(1)
    batch = {"ct": torch.rand(2, 1, 16, 16, 16, generator=g), "masks_sdf": torch.rand(2, 8, 16, 16, 16, generator=g),
             "dose": torch.rand(2, 1, 16, 16, 16, generator=g) * 70, "constraints": torch.rand(2, 13, generator=g)}
    objective = Objective("baseline", 70.0, loss_kind="l1")
    losses = [loop.train_step(model, [batch], optimizer, objective).loss for _ in range(15)]
    assert losses[-1] < 0.7 * losses[0]


# --------------------------------------------------------------------------- validation interval, time budget


def test_val_every_skips_validation_but_not_the_last_epoch(phantom_dir, tmp_path, monkeypatch):
    calls = []
    real = loop.validate

    def counting_validate(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "validate", counting_validate)
    loop.Trainer(tiny_config(phantom_dir, tmp_path, epochs=3, val_every=2)).fit()
    rows = epoch_rows(tmp_path / "run")
    assert [bool(r["val_mae_gy"]) for r in rows] == [False, True, True] and len(calls) == 2


def test_time_budget_stops_after_a_validated_checkpointed_epoch(phantom_dir, tmp_path):
    summary = loop.Trainer(tiny_config(phantom_dir, tmp_path, epochs=50, val_every=10, max_minutes=1e-4)).fit()
    assert summary["epochs_completed"] == 1 and summary["stop_reason"] == "time budget"
    assert not summary["early_stopped"] and summary["final_val_mae_gy"] is not None
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["epoch"] == 1


# --------------------------------------------------------------------------- CPU precision and denormals


def test_auto_precision_on_cpu_is_bf16_only_with_amx(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(loop, "cpu_has_amx", lambda: False)
    assert loop.resolve_precision("auto", cpu) == (None, False)
    monkeypatch.setattr(loop, "cpu_has_amx", lambda: True)
    assert loop.resolve_precision("auto", cpu) == (torch.bfloat16, False)
    assert loop.resolve_precision("32", cpu) == (None, False)
    assert loop.resolve_precision("bf16", cpu) == (torch.bfloat16, False)


def test_denormal_flushing_and_determinism_hold_during_cpu_training_only(phantom_dir, tmp_path, monkeypatch):
    seen = []
    real = loop.train_step

    def recording_step(*args, **kwargs):
        seen.append((loop.denormals_flushed(), loop.determinism_state()))
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", recording_step)
    torch.set_flush_denormal(False)
    determinism_before = loop.determinism_state()
    assert not determinism_before[0]
    loop.Trainer(tiny_config(phantom_dir, tmp_path, epochs=1, deterministic=True)).fit()
    assert seen and all(flushed and deterministic and not benchmark
                        for flushed, (deterministic, _, benchmark) in seen)
    # the process's settings are restored
    assert not loop.denormals_flushed() and loop.determinism_state() == determinism_before


def test_cli_names_a_bad_validation_setting(phantom_dir, tmp_path, capsys):
    assert train_cli.main(["--data_dir", str(phantom_dir), "--val_ids", "nobody", "--log_dir", str(tmp_path)]) == 2
    assert "val_ids: case id(s) ['nobody'] not found in data_dir" in capsys.readouterr().err
    assert train_cli.main(["--data_dir", str(phantom_dir), "--val_dir", str(tmp_path / "nowhere"),
                           "--log_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "val_dir:" in err and "nowhere is not a folder" in err


# --------------------------------------------------------------------------- loss mask


def test_masked_loss_averages_over_the_voxels_inside_only():
    target = torch.zeros(2, 1, 4, 1, 1)
    prediction = torch.tensor([0.5, 0.1, 9.0, 9.0, 0.3, 0.2, 7.0, -7.0]).reshape(2, 1, 4, 1, 1)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]).reshape(2, 1, 4, 1, 1)
    parts = regression_loss(prediction, target, penalty_weight=0.0, loss="l1", mask=mask)
    assert float(parts.data) == pytest.approx((0.5 + 0.1 + 0.3 + 0.2) / 4)     # the 9s and 7s do not count
    assert float(parts.mse) == pytest.approx((0.25 + 0.01 + 0.09 + 0.04) / 4)
    with_penalty = regression_loss(prediction, target, penalty_weight=1.0, loss="l1", mask=mask)
    assert float(with_penalty.penalty) == pytest.approx(49.0 / 8)              # the penalty sees every voxel
    nothing_inside = regression_loss(prediction, target, penalty_weight=0.0, mask=torch.zeros_like(mask))
    assert float(nothing_inside.total) == 0.0
    batch = {"ct": torch.rand(1, 1, 8, 8, 8), "masks_sdf": torch.rand(1, 8, 8, 8, 8), "constraints": torch.rand(1, 13),
             "dose": torch.full((1, 1, 8, 8, 8), 35.0), "loss_mask": torch.zeros(1, 1, 8, 8, 8)}
    batch["loss_mask"][..., :4] = 1.0
    model = loop.new_model("baseline", 8, 13, base_channels=4, levels=2)
    objective = Objective("baseline", 70.0, penalty_weight=0.0, loss_mask="possible_dose_mask")
    loss = objective.loss(model, batch).data
    loss.backward()
    with torch.no_grad():
        prediction = model(torch.cat([batch["ct"], batch["masks_sdf"]], 1), batch["constraints"])
    assert float(loss.detach()) == pytest.approx(float(((prediction - 0.5)[..., :4] ** 2).mean()), rel=1e-5)


def test_patches_carry_the_loss_mask_through_augmentation(phantom_dir):
    from vmat_diffusion.training.data import CaseReader, PatchDataset, micro_batches
    catalog = scan_cases(phantom_dir)
    assert all("possible_dose_mask" in c.extras for c in catalog.cases)
    reader = CaseReader([c.path for c in catalog.cases])
    dataset = PatchDataset(reader, catalog.structures, patch_size=16, patches_per_volume=3, seed=3,
                           loss_mask="possible_dose_mask")
    item = dataset[(0, 0, 0)]
    assert item["loss_mask"].shape == item["dose"].shape
    assert set(torch.unique(item["loss_mask"]).tolist()) <= {0.0, 1.0}
    # the dose is zero wherever the phantom's possible-dose mask (its body) is off, flips and shifts included
    assert float(item["dose"][item["loss_mask"] == 0].abs().max()) == 0.0
    assert 0 < float(item["loss_mask"].mean()) <= 1
    batches = list(micro_batches([item, dataset[(0, 1, 1)]], batch_size=4))
    assert [b["loss_mask"].shape[0] for b in batches] == [4, 2]


def test_loss_mask_trains_and_a_missing_extra_is_named(phantom_dir, tmp_path):
    summary = loop.Trainer(tiny_config(phantom_dir, tmp_path, epochs=1, loss_mask="possible_dose_mask")).fit()
    assert summary["epochs_completed"] == 1
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["config"]
    assert saved["loss_mask"] == "possible_dose_mask"
    with pytest.raises(ValueError, match=r"loss_mask: case\(s\) .*\.npz.* have no extra 'ptv_ring'"):
        loop.Trainer(tiny_config(phantom_dir, tmp_path / "other", loss_mask="ptv_ring")).fit()
    with pytest.raises(ValueError, match="loss_mask: expected the name of a case extra"):
        tiny_config(phantom_dir, tmp_path, loss_mask=" ").validate()


def test_cli_loss_mask_flag(phantom_dir, tmp_path, capsys):
    args = train_cli.build_parser().parse_args(["--data_dir", str(phantom_dir), "--loss_mask", "possible_dose_mask"])
    assert train_cli.config_from_args(args).validate().loss_mask == "possible_dose_mask"
    code = train_cli.main(["--data_dir", str(phantom_dir), "--log_dir", str(tmp_path), "--loss_mask", "nothing",
                           "--epochs", "1", "--patch_size", "16", "--base_channels", "4", "--levels", "2",
                           "--num_workers", "0"])
    assert code == 2 and "loss_mask: case(s)" in capsys.readouterr().err


# --------------------------------------------------------------------------- memory-mapped store


def test_training_through_the_store_equals_training_from_the_npz_files(phantom_dir, tmp_path):
    """--store reads the same arrays memory-mapped: the run is bit-identical."""
    import shutil
    data = tmp_path / "cases"
    shutil.copytree(phantom_dir, data)
    finals = {}
    for use_store in (False, True):
        loop.Trainer(tiny_config(data, tmp_path / str(use_store), epochs=1, use_store=use_store)).fit()
        finals[use_store] = load_checkpoint(tmp_path / str(use_store) / "run" / "checkpoints" / "last.ckpt")
    assert any((data / name).is_dir() for name in os.listdir(data))  # the store was built next to the cases
    for key, value in finals[False]["model"].items():
        assert torch.equal(value, finals[True]["model"][key]), key
    assert finals[False]["metrics"] == finals[True]["metrics"]


def test_cli_with_store_shows_no_read_only_array_warning(phantom_dir, tmp_path):
    """torch warns once per process about read-only NumPy memory, so a fresh process is needed."""
    import shutil
    import subprocess
    import sys
    data = tmp_path / "cases"
    shutil.copytree(phantom_dir, data)
    args = ["--data_dir", str(data), "--log_dir", str(tmp_path), "--epochs", "1", "--store",
            "--patch_size", "16", "--base_channels", "4", "--levels", "2", "--num_workers", "0",
            "--val_split", "0.2", "--test_split", "0.2", "--gamma_subsample", "2", "--val_overlap", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-W", "always", "-m", "vmat_diffusion.cli.train"] + args, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "not writable" not in result.stderr


def test_max_val_cases_validates_the_first_cases_only_and_says_so(phantom_dir, tmp_path, monkeypatch, capsys):
    seen = []
    real_validate = loop.validate

    def counting_validate(model, cases, *args, **kwargs):
        cases = list(cases)
        seen.append([case.case_id for case in cases])
        return real_validate(model, iter(cases), *args, **kwargs)

    monkeypatch.setattr(loop, "validate", counting_validate)
    config = tiny_config(phantom_dir, tmp_path, epochs=1, val_split=0.4, test_split=0.0, max_val_cases=1)
    trainer = loop.Trainer(config)
    trainer.fit()
    assert len(trainer.split.val) == 2
    assert len(seen) == 1 and seen[0] == [trainer.val_reader[0].case_id]
    assert "validating on the first 1 of 2 (--max_val_cases)" in capsys.readouterr().out
