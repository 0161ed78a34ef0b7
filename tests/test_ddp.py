"""DDP on CPU: two gloo processes started through torchrun by ``vmat-train --devices 2 --strategy ddp``."""
import csv
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from vmat_diffusion.phantom import write_phantoms
from vmat_diffusion.training.distributed import torchrun_command_line
from vmat_diffusion.training.loop import TEST_EXIT_ENV

ARGS = ["--patch_size", "16", "--base_channels", "4", "--levels", "2", "--num_workers", "0", "--lr", "1e-3",
        "--device", "cpu", "--devices", "2", "--strategy", "ddp", "--deterministic", "--gamma_subsample", "2",
        "--val_overlap", "0", "--epochs", "2", "--patience", "0", "--patches_per_volume", "2"]


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    write_phantoms(folder, 4, shape=(32, 32, 32), spacing_mm=(8.0, 8.0, 8.0), seed=5)
    return folder


def train(phantom_dir, log_dir, name, *extra, env_extra=None):
    env = {key: value for key, value in os.environ.items() if key != TEST_EXIT_ENV}
    env.update({"OMP_NUM_THREADS": "1", **(env_extra or {})})
    command = [sys.executable, "-m", "vmat_diffusion.cli.train", "--data_dir", str(phantom_dir),
               "--log_dir", str(log_dir), "--exp_name", name] + ARGS + list(extra)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def rank0_errors(result):
    """The failing process's own messages (torchrun's and the other rank's follow-up errors left out)."""
    lines = [line for line in result.stderr.splitlines() if not line.startswith("[rank1]")]
    return "\n".join(lines[-60:])


def test_torchrun_command_line_is_the_one_a_user_types():
    line = torchrun_command_line(["--data_dir", "d"], 2)
    assert line == "torchrun --standalone --nproc_per_node 2 -m vmat_diffusion.cli.train --data_dir d"


def test_two_gloo_processes_train_and_resume_exactly(phantom_dir, tmp_path):
    straight = train(phantom_dir, tmp_path, "straight")
    assert straight.returncode == 0, rank0_errors(straight)
    assert "torchrun --standalone --nproc_per_node 2" in straight.stdout
    assert "2 process(es)" in straight.stdout

    run = tmp_path / "straight"
    config = json.loads((run / "training_config.json").read_text())
    assert config["world_size"] == 2
    assert len(glob.glob(str(run / "events.out.tfevents.*"))) == 1  # rank 0 alone writes logs
    with open(run / "epoch_metrics.csv", newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(key.startswith("module.") for key in last["model"])
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["checkpoints", "epoch_metrics.csv", "training_config.json", "training_summary.json",
         os.path.basename(glob.glob(str(run / "events.out.tfevents.*"))[0])])

    killed = train(phantom_dir, tmp_path, "resumed", env_extra={TEST_EXIT_ENV: "1"})
    assert killed.returncode != 0
    checkpoint = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1
    resumed = train(phantom_dir, tmp_path, "resumed", "--resume", str(checkpoint))
    assert resumed.returncode == 0, rank0_errors(resumed)
    assert "resumed from" in resumed.stdout

    again = torch.load(checkpoint, weights_only=True)
    assert again["epoch"] == 2 and again["global_step"] == last["global_step"]
    for key, value in last["model"].items():
        assert torch.equal(value, again["model"][key]), key
    with open(tmp_path / "resumed" / "epoch_metrics.csv", newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]
