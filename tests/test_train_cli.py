"""vmat-train end to end on phantoms: outputs, exact resume after a hard kill, clear input errors."""
import argparse
import csv
import glob
import json
import os
import subprocess
import sys
import sysconfig

import pytest
import torch

from vmat_diffusion.cli.train import main
from vmat_diffusion.phantom import write_phantoms
from vmat_diffusion.training.loop import TEST_EXIT_CODE, TEST_EXIT_ENV

TINY = ["--patch_size", "16", "--base_channels", "4", "--levels", "2", "--val_split", "0.2", "--test_split", "0.2",
        "--gamma_subsample", "2", "--lr", "1e-3", "--patches_per_volume", "2", "--val_overlap", "0"]
TB_TAGS = {"train/loss", "val/loss", "val/mae_gy", "val/gamma_3mm3pct", "misc/gpu_memory_gb", "misc/eta_hours",
           "lr-AdamW", "val/example_slices", "_hparams_/experiment", "_hparams_/session_start_info"}


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    write_phantoms(folder, 5, shape=(32, 32, 32), spacing_mm=(8.0, 8.0, 8.0), seed=11)
    return folder


def event_tags(run_dir):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    tags = set()
    for path in glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
        for event in EventFileLoader(path).Load():
            tags.update(value.tag for value in event.summary.value)
    return tags


def test_two_epochs_write_every_output(phantom_dir, tmp_path, capsys):
    code = main(["--data_dir", str(phantom_dir), "--epochs", "2", "--log_dir", str(tmp_path), "--exp_name", "cli",
                 "--num_workers", "0"] + TINY)
    assert code == 0
    run = tmp_path / "cli"
    config = json.loads((run / "training_config.json").read_text())
    for key in ("script_version", "start_time", "torch_version", "cuda_version", "python_version", "platform",
                "gpu_name", "gpu_count", "gpu_memory_gb", "model_class", "total_parameters", "trainable_parameters",
                "hyperparameters", "max_epochs", "precision", "accumulate_grad_batches", "gradient_clip_val"):
        assert key in config, key
    data = config["data"]
    assert (data["train_count"], data["val_count"], data["test_count"]) == (3, 1, 1)
    assert len(data["train_case_ids"] + data["val_case_ids"] + data["test_case_ids"]) == 5
    assert config["hyperparameters"]["epochs"] == 2 and config["model_class"] == "BaselineUNet3D"

    summary = json.loads((run / "training_summary.json").read_text())
    for key in ("end_time", "total_hours", "epochs_completed", "average_epoch_time_sec", "best_val_mae_gy",
                "best_epoch", "final_train_loss", "final_val_loss", "final_val_mae_gy", "early_stopped"):
        assert key in summary, key
    assert summary["epochs_completed"] == 2 and summary["early_stopped"] is False

    with open(run / "epoch_metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "epoch_time_sec", "train_loss", "val_loss", "val_mae_gy", "learning_rate",
                             "val_gamma"]
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(float(r["val_mae_gy"]) > 0 and 0 <= float(r["val_gamma"]) <= 100 for r in rows)

    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in names and any(n.startswith("best-epoch=") for n in names)
    assert TB_TAGS <= event_tags(run)
    assert "Traceback" not in capsys.readouterr().err


# --------------------------------------------------------------------------- exact resume


def run_cli(args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "vmat_diffusion.cli.train"] + args, env=env,
                          capture_output=True, text=True, timeout=300)


def resume_args(phantom_dir, log_dir, name, workers):
    return ["--data_dir", str(phantom_dir), "--epochs", "4", "--log_dir", str(log_dir), "--exp_name", name,
            "--num_workers", str(workers), "--deterministic", "--ema", "--patience", "0"] + TINY


def assert_same_state(a, b):
    for part in ("model",):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"
    for key in a["ema"]["module"]:
        assert torch.equal(a["ema"]["module"][key], b["ema"]["module"][key]), f"ema.{key} differs"
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), f"optimizer {index}.{name} differs"
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"] == 4


@pytest.fixture(scope="module")
def straight_run(phantom_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("straight")
    result = run_cli(resume_args(phantom_dir, log_dir, "straight", 0))
    assert result.returncode == 0, result.stderr
    return log_dir / "straight"


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_after_kill_is_bit_identical(phantom_dir, tmp_path, straight_run, workers):
    args = resume_args(phantom_dir, tmp_path, "killed", workers)
    killed = run_cli(args, {TEST_EXIT_ENV: "2"})
    assert killed.returncode == TEST_EXIT_CODE, killed.stderr
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 2
    # workers=0: only the data folder and the checkpoint; every other setting comes from the checkpoint
    minimal = ["--data_dir", str(phantom_dir), "--num_workers", "0"]
    resumed = run_cli((minimal if workers == 0 else args) + ["--resume", str(last)])
    assert resumed.returncode == 0, resumed.stderr
    if workers == 0:
        assert "resuming with the checkpoint's" in resumed.stdout and "epochs=4" in resumed.stdout

    straight = torch.load(straight_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert_same_state(straight, torch.load(last, weights_only=True))

    def metrics(run):
        with open(run / "epoch_metrics.csv", newline="") as f:
            return [{k: v for k, v in row.items() if k != "epoch_time_sec"} for row in csv.DictReader(f)]
    assert metrics(straight_run) == metrics(tmp_path / "killed")


# --------------------------------------------------------------------------- input errors


def error_of(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_missing_data_dir(tmp_path, capsys):
    code, err = error_of(["--data_dir", str(tmp_path / "nowhere"), "--log_dir", str(tmp_path)], capsys)
    assert code == 2 and "not a folder" in err and err.count("\n") == 1


def test_empty_data_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = error_of(["--data_dir", str(tmp_path / "empty"), "--log_dir", str(tmp_path)], capsys)
    assert code == 2 and "no case files" in err


def test_broken_case_is_named(phantom_dir, tmp_path, capsys):
    folder = tmp_path / "cases"
    folder.mkdir()
    for path in sorted(phantom_dir.glob("*.npz"))[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "zz_broken.npz").write_bytes(b"this is no npz")
    code, err = error_of(["--data_dir", str(folder), "--log_dir", str(tmp_path)] + TINY, capsys)
    assert code == 2 and "zz_broken.npz" in err


@pytest.mark.parametrize("flag, value, name", [("--patch_size", "15", "patch_size"), ("--lr", "-1", "lr"),
                                               ("--epochs", "0", "epochs"), ("--val_split", "0", "val_split")])
def test_bad_values(phantom_dir, tmp_path, capsys, flag, value, name):
    code, err = error_of(["--data_dir", str(phantom_dir), "--log_dir", str(tmp_path), flag, value], capsys)
    assert code == 2 and name in err


def test_log_dir_that_is_a_file_is_refused_before_training(phantom_dir, tmp_path, capsys):
    not_a_folder = tmp_path / "runs"
    not_a_folder.write_text("a file\n")
    for log_dir in (not_a_folder, not_a_folder / "deeper"):
        code, err = error_of(["--data_dir", str(phantom_dir), "--log_dir", str(log_dir)] + TINY, capsys)
        assert code == 2 and f"log_dir: {not_a_folder} exists and is not a folder" in err


def test_an_earlier_run_is_refused_before_processes_are_started(phantom_dir, tmp_path, capsys):
    (tmp_path / "runs" / "vmat_dose" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "vmat_dose" / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run")
    code = main(["--data_dir", str(phantom_dir), "--log_dir", str(tmp_path / "runs"), "--device", "cpu",
                 "--devices", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "already holds a run (last.ckpt); continue it with --resume " in err
    assert "choose another --exp_name or --log_dir" in err


def test_bad_choice_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--data_dir", "x", "--model", "gan"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_pickled_resume_checkpoint_is_refused(phantom_dir, tmp_path, capsys):
    evil = tmp_path / "evil.ckpt"
    torch.save({"format_version": 1, "args": argparse.Namespace(lr=1e-4)}, evil)
    code, err = error_of(["--data_dir", str(phantom_dir), "--log_dir", str(tmp_path), "--resume", str(evil)] + TINY,
                         capsys)
    assert code == 2 and "non-tensor" in err and "evil.ckpt" in err


def test_multi_node_prints_the_torchrun_line(phantom_dir, capsys):
    code = main(["--data_dir", str(phantom_dir), "--devices", "4", "--num_nodes", "2", "--strategy", "ddp"])
    out = capsys.readouterr().out
    assert code == 0
    assert "torchrun --nnodes 2" in out and "--nproc_per_node 4" in out and "-m vmat_diffusion.cli.train" in out


def test_quick_demo_learns_something(tmp_path, capsys):
    from vmat_diffusion.cli.demo import run_demo
    # an earlier, larger demo in the same folder: its extra phantom and its run must not be reused
    (tmp_path / "demo" / "phantoms").mkdir(parents=True)
    (tmp_path / "demo" / "phantoms" / "phantom_009.npz").write_bytes(b"from an earlier demo")
    (tmp_path / "demo" / "runs" / "demo" / "checkpoints").mkdir(parents=True)
    (tmp_path / "demo" / "runs" / "demo" / "checkpoints" / "last.ckpt").write_bytes(b"earlier run")
    result = run_demo(tmp_path / "demo", epochs=1, quick=True)
    assert not (tmp_path / "demo" / "phantoms" / "phantom_009.npz").exists()
    assert result["model_mae_gy"] < result["trivial_mae_gy"]
    assert (tmp_path / "demo" / "runs" / "demo" / "training_summary.json").is_file()
    assert "held-out phantom" in capsys.readouterr().out


def test_bin_script_shows_help():
    script = os.path.join(os.path.dirname(__file__), os.pardir, "bin", "train_dose_ddpm.py")
    result = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    as_module = subprocess.run([sys.executable, "-m", "bin.train_dose_ddpm", "--help"], capture_output=True, text=True,
                               timeout=120, cwd=os.path.join(os.path.dirname(__file__), os.pardir))
    assert as_module.returncode == 0 and as_module.stdout == result.stdout, as_module.stderr
    for flag in ("--data_dir", "--epochs", "--batch_size", "--patch_size", "--patches_per_volume", "--lr",
                 "--weight_decay", "--val_split", "--test_split", "--timesteps", "--schedule", "--base_channels",
                 "--use_simple_unet", "--log_dir", "--exp_name", "--seed", "--num_workers", "--resume",
                 "--rx_dose_gy", "--devices", "--strategy", "--gpu_cooling", "--cooling_interval",
                 "--cooling_pause", "--model", "--precision", "--accumulate_grad_batches", "--ema", "--patience",
                 "--device"):
        assert flag in result.stdout, flag


@pytest.mark.parametrize("script, flag", [("train_dose_ddpm.py", "--data_dir"),
                                          ("inference_dose_ddpm.py", "--checkpoint")])
def test_bin_scripts_run_from_a_source_checkout_without_the_installed_package(script, flag, tmp_path):
    # python -S skips the site-packages .pth files (an editable install's hook); PYTHONPATH keeps
    # torch and the other dependencies, so vmat_diffusion can only come from the script's checkout
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    probe = subprocess.run([sys.executable, "-S", "-c", "import vmat_diffusion"], cwd=tmp_path, env=env,
                           capture_output=True)
    if probe.returncode == 0:
        pytest.skip("vmat_diffusion is installed into site-packages itself")
    path = os.path.join(os.path.dirname(__file__), os.pardir, "bin", script)
    result = subprocess.run([sys.executable, "-S", path, "--help"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert flag in result.stdout


def test_resume_adopts_unset_flags_and_every_switch_can_be_turned_back(monkeypatch):
    from vmat_diffusion.cli import train as train_cli
    from vmat_diffusion.training.config import TrainConfig
    saved = TrainConfig(data_dir="elsewhere", epochs=7, augment=False, deterministic=True, skip_nonfinite=True,
                        loss_mask="possible_dose_mask", max_val_cases=1, num_workers=5).to_dict()
    monkeypatch.setattr(train_cli, "load_checkpoint", lambda path, map_location=None, mmap=False: {"config": saved})

    def resumed(*flags):
        argv = ["--data_dir", "cases", "--resume", "last.ckpt", *flags]
        args = train_cli.build_parser().parse_args(argv)
        adopted = train_cli.adopt_checkpoint_settings(args, train_cli.given_settings(argv))
        return train_cli.config_from_args(args), adopted

    config, adopted = resumed()
    assert (config.epochs, config.augment, config.deterministic, config.skip_nonfinite, config.loss_mask,
            config.max_val_cases) == (7, False, True, True, "possible_dose_mask", 1)
    assert config.data_dir == "cases" and config.num_workers == TrainConfig().num_workers  # machine settings
    assert "epochs" in adopted and "num_workers" not in adopted
    config, _ = resumed("--epochs", "9", "--augment", "--no-deterministic", "--no-skip_nonfinite",
                        "--loss_mask", "none", "--max_val_cases", "all")
    assert (config.epochs, config.augment, config.deterministic, config.skip_nonfinite, config.loss_mask,
            config.max_val_cases) == (9, True, False, False, None, None)
