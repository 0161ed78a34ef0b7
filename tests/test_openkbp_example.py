"""examples/openkbp_baseline.py end to end on synthetic OpenKBP patients (no real data needed)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

from test_openkbp import write_fake_patient

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "openkbp_baseline.py"


def load_example(path=EXAMPLE):
    """An examples/ script as a module (its main() and helpers), without running it."""
    spec = importlib.util.spec_from_file_location(path.stem + "_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fake_openkbp(tmp_path_factory):
    src = tmp_path_factory.mktemp("fake_openkbp_example")
    for split, name, seed in (("train-pats", "pt_1", 1), ("train-pats", "pt_7", 7), ("validation-pats", "pt_9", 9)):
        write_fake_patient(src / split / name, seed=seed)
    return src


def test_results_file_names_model_and_resolution(tmp_path):
    # a --resolution full run must not overwrite the half-resolution results
    example = load_example()
    names = {resolution: example.parse_args(["--work_dir", str(tmp_path), "--resolution", resolution]).results_file
             for resolution in ("half", "full")}
    assert names == {"half": "results_baseline_half.json", "full": "results_baseline_full.json"}
    assert example.parse_args(["--work_dir", str(tmp_path), "--exp_name", "run7"]).results_file == "results_run7.json"


@pytest.mark.parametrize("model", ["baseline", "ddpm"])
def test_example_trains_on_the_openkbp_split_and_scores(fake_openkbp, tmp_path, monkeypatch, capsys, model):
    monkeypatch.setenv("VMAT_OPENKBP_DIR", str(fake_openkbp))
    example = load_example()
    work = tmp_path / "work"
    results = example.main(["--model", model, "--work_dir", str(work), "--epochs", "1", "--patch_size", "16",
                            "--patches_per_volume", "1", "--batch_size", "1", "--base_channels", "4",
                            "--levels", "2", "--gamma_subsample", "4", "--threads", "1", "--ddim_steps", "2",
                            "--val_ddim_steps", "2", "--score_train", "1"])
    assert results["train_ids"] == ["pt_1", "pt_7"] and results["val_ids"] == ["pt_9"]
    record = json.loads((work / "runs" / f"openkbp_{model}_half" / "training_config.json").read_text())
    assert record["data"]["val_case_ids"] == ["pt_9"] and record["data"]["train_case_ids"] == ["pt_1", "pt_7"]
    assert record["hyperparameters"]["loss"] == ("l1" if model == "baseline" else "mse")
    assert record["hyperparameters"]["loss_mask"] == "possible_dose_mask"
    saved = json.loads((work / f"results_{model}_half.json").read_text())
    assert saved["summary"] == results["summary"]
    for scores in results["summary"].values():
        assert math.isfinite(scores["dose_score_gy"]) and math.isfinite(scores["dvh_score_gy_pooled"])
    assert len(results["per_patient"]["model"]) == 1
    assert results["per_patient"]["model_on_training_patients"][0]["case_id"] == "pt_1"
    assert math.isfinite(results["on_training_patients"]["dose_score_gy"])
    if model == "baseline":  # the same command again would mix a second run into the first one's folder
        with pytest.raises(SystemExit) as stop:
            example.main(["--model", model, "--work_dir", str(work), "--epochs", "1"])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert "already holds a run (last.ckpt); continue it with --resume" in err and "--work_dir" in err
