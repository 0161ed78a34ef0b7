"""Tests of whole-case inference (vmat_diffusion.inference) and the vmat-infer CLI."""
import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vmat_diffusion.case import Case, load_case, save_case
from vmat_diffusion.cli.infer import main
from vmat_diffusion.inference import (InferenceInputError, Prediction, case_metrics, flat_metrics,
                                      load_prediction, predict_case, save_prediction, summarize_metrics,
                                      window_settings)
from vmat_diffusion.phantom import make_phantom, write_phantoms
from vmat_diffusion.structures import PROSTATE_STRUCTURES
from vmat_diffusion.training import TrainConfig, Trainer
from vmat_diffusion.training.checkpoint import FORMAT_VERSION, load_model_from_checkpoint, save_checkpoint
from vmat_diffusion.unet import BaselineUNet3D, SimpleUNet3D

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPE = (32, 32, 32)
SPACING = (8.0, 8.0, 8.0)
PATCH = 16


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The volumes here are tiny: more threads only add contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_model(kind: str, seed: int):
    torch.manual_seed(seed)
    common = dict(base_channels=4, levels=2, constraint_dim=13, groups=2, embed_dim=16)
    if kind == "baseline":
        return BaselineUNet3D(in_channels=1 + len(PROSTATE_STRUCTURES), **common)
    return SimpleUNet3D(in_channels=2 + len(PROSTATE_STRUCTURES), time_dim=16, **common)


def _write_checkpoint(path, kind: str, seed: int = 0, **overrides):
    """A hand-made checkpoint in the training package's format, for contents the trainer never
    writes (an unknown model kind, a kind that contradicts the model class)."""
    model = _tiny_model(kind, seed)
    generator = torch.Generator().manual_seed(seed)
    weights = {name: (value + 0.05 * torch.randn(value.shape, generator=generator)
                      if value.is_floating_point() else value)
               for name, value in model.state_dict().items()}
    checkpoint = {
        "format_version": FORMAT_VERSION, "model_kind": kind, "model_class": type(model).__name__,
        "model_config": model.config, "model": weights, "ema": None,
        "structures": list(PROSTATE_STRUCTURES), "constraint_dim": 13, "rx_dose_gy": 70.0,
        "schedule": {"timesteps": 50, "schedule": "cosine"} if kind == "ddpm" else None,
        "config": {"patch_size": PATCH, "model": kind},
    }
    checkpoint.update(overrides)
    return save_checkpoint(path, checkpoint)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    write_phantoms(folder, 3, shape=SHAPE, spacing_mm=SPACING)
    return folder


@pytest.fixture(scope="module")
def checkpoints(data_dir, tmp_path_factory):
    """One epoch of the real trainer per model kind on the 3 phantoms (tiny U-Nets, 16^3 patches)."""
    runs = tmp_path_factory.mktemp("runs")
    paths = {}
    for kind in ("baseline", "ddpm"):
        config = TrainConfig(data_dir=str(data_dir), model=kind, epochs=1, patch_size=PATCH, base_channels=4,
                             levels=2, batch_size=2, patches_per_volume=1, num_workers=0, val_split=0.34,
                             test_split=0.0, lr=1e-2, timesteps=50, ddim_steps=2, gamma_subsample=2,
                             precision="32", log_dir=str(runs), exp_name=kind, device="cpu", progress=False)
        paths[kind] = Path(Trainer(config).fit()["last_checkpoint"])
    return paths


def _case_files(folder):
    return sorted(p for p in folder.glob("*.npz"))


def _error_message(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- CLI end to end

def test_cli_single_case_writes_every_output(data_dir, checkpoints, tmp_path, capsys):
    case_path = _case_files(data_dir)[0]
    output = tmp_path / "out" / "prediction.npz"
    code = main(["--checkpoint", str(checkpoints["baseline"]), "--input", str(case_path), "--output", str(output),
                 "--compute_metrics", "--device", "cpu", "--quiet"])
    assert code == 0, capsys.readouterr().err
    case = load_case(case_path)
    with np.load(output, allow_pickle=False) as npz:
        assert set(npz.files) == {"dose_pred_gy", "metadata"}
        dose = npz["dose_pred_gy"]
        metadata = json.loads(str(npz["metadata"]))
    assert dose.shape == SHAPE and dose.dtype == np.float32
    assert dose.min() >= 0.0 and dose.max() > 0.0
    assert np.all(dose[case.extras["possible_dose_mask"] == 0] == 0.0)
    for key in ("case_id", "checkpoint", "model_kind", "ddim_steps", "samples", "patch_size", "overlap",
                "spacing_mm", "structures", "timestamp"):
        assert key in metadata
    assert metadata["case_id"] == case.case_id and metadata["model_kind"] == "baseline"
    assert metadata["patch_size"] == PATCH and metadata["overlap"] == PATCH // 4  # from the checkpoint

    report = json.loads((output.parent / "metrics.json").read_text())
    assert set(report) == {"settings", "cases", "skipped", "summary"}
    (entry,) = report["cases"]
    for key in ("case_id", "mae_gy", "mae_region", "dose_score", "dvh_score", "dvh_metrics", "goals",
                "gamma_pass_rate", "gamma_pass_rate_targets", "gamma", "prediction_file"):
        assert key in entry
    assert entry["mae_region"] == "possible_dose_mask"
    assert entry["mae_gy"] == pytest.approx(
        np.abs(dose - case.dose)[case.extras["possible_dose_mask"] != 0].mean(), rel=1e-5)
    assert set(entry["dvh_metrics"]) == set(case.present_structures())
    assert 0.0 <= entry["gamma_pass_rate"] <= 100.0
    assert entry["gamma"]["subsample"] == 2 and entry["gamma"]["spacing_mm"] == [16.0, 16.0, 16.0]
    assert report["summary"]["n_cases"] == 1
    rows = list(csv.DictReader((output.parent / "metrics.csv").read_text().splitlines()))
    assert [row["case_id"] for row in rows] == [case.case_id, "mean", "sd"]
    assert float(rows[0]["mae_gy"]) == pytest.approx(entry["mae_gy"])
    # The DVH plot is optional: written exactly when matplotlib is installed.
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (output.parent / f"{case.case_id}_dvh.png").is_file() == has_matplotlib


def test_cli_input_dir_writes_predictions_and_summary(data_dir, checkpoints, tmp_path, capsys):
    out = tmp_path / "pred"
    code = main(["--checkpoint", str(checkpoints["baseline"]), "--input_dir", str(data_dir), "--output_dir",
                 str(out), "--compute_metrics", "--gamma_subsample", "1", "--batch_size", "4", "--no_plots"])
    assert code == 0, capsys.readouterr().err
    case_ids = [load_case(p).case_id for p in _case_files(data_dir)]
    for case_id in case_ids:
        assert load_prediction(out / f"{case_id}_pred.npz").std_gy is None
    report = json.loads((out / "metrics.json").read_text())
    assert [c["case_id"] for c in report["cases"]] == case_ids
    maes = [c["mae_gy"] for c in report["cases"]]
    assert report["summary"]["mean"]["mae_gy"] == pytest.approx(np.mean(maes))
    assert report["summary"]["sd"]["mae_gy"] == pytest.approx(np.std(maes, ddof=1))
    assert report["cases"][0]["gamma"]["spacing_mm"] == list(SPACING)
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    assert [row["case_id"] for row in rows] == case_ids + ["mean", "sd"]
    assert not list(out.glob("*.png"))
    # Prediction files in the input folder are not taken for cases on a second run.
    code = main(["--checkpoint", str(checkpoints["baseline"]), "--input_dir", str(out), "--output_dir", str(out)])
    assert code == 2
    assert "no case files" in _error_message(capsys)


def test_cli_ddpm_samples_write_mean_and_std(data_dir, checkpoints, tmp_path, capsys):
    case_path = _case_files(data_dir)[1]
    args = ["--checkpoint", str(checkpoints["ddpm"]), "--input", str(case_path), "--output_dir", str(tmp_path),
            "--samples", "2", "--ddim_steps", "2", "--compute_metrics", "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    case = load_case(case_path)
    prediction = load_prediction(tmp_path / f"{case.case_id}_pred.npz")
    assert prediction.std_gy is not None and prediction.std_gy.shape == SHAPE
    body = case.extras["possible_dose_mask"] != 0
    assert prediction.std_gy[body].max() > 0.0 and np.all(prediction.std_gy[~body] == 0.0)
    assert prediction.metadata["samples"] == 2 and prediction.metadata["ddim_steps"] == 2
    assert prediction.metadata["model_kind"] == "ddpm" and prediction.metadata["used_ema"] is True
    # Diffusion doses come from x0 in [-1, 1]: at most 1.2 x the model's dose scale.
    assert 0.0 <= prediction.dose_gy.min() and prediction.dose_gy.max() <= 1.2 * 70.0 + 1e-3
    entry = json.loads((tmp_path / "metrics.json").read_text())["cases"][0]
    assert entry["mean_std_gy"] == pytest.approx(prediction.std_gy[body].mean(), rel=1e-5)
    # Same seed, same samples.
    again = tmp_path / "again"
    assert main(args[:4] + ["--output_dir", str(again)] + args[6:]) == 0
    np.testing.assert_array_equal(load_prediction(again / f"{case.case_id}_pred.npz").dose_gy, prediction.dose_gy)


def test_cli_case_without_reference_dose_is_predicted(data_dir, checkpoints, tmp_path, capsys):
    case = load_case(_case_files(data_dir)[0])
    case.dose = None
    path = save_case(tmp_path / "nodose.npz", case)
    code = main(["--checkpoint", str(checkpoints["baseline"]), "--input", str(path), "--output_dir",
                 str(tmp_path / "out"), "--compute_metrics"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / f"{case.case_id}_pred.npz").is_file()
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["cases"] == [] and report["skipped"][0]["case_id"] == case.case_id
    assert "metrics skipped" in capsys.readouterr().out


def test_cli_use_ema_on_a_checkpoint_without_ema_notes_it(data_dir, checkpoints, tmp_path, capsys):
    case_path = _case_files(data_dir)[0]
    code = main(["--checkpoint", str(checkpoints["baseline"]), "--input", str(case_path), "--output_dir",
                 str(tmp_path), "--use_ema", "--quiet", "--no_plots"])
    assert code == 0
    assert "no EMA weights" in capsys.readouterr().err
    (path,) = tmp_path.glob("*_pred.npz")
    assert load_prediction(path).metadata["used_ema"] is False


# ----------------------------------------------------------------------------- CLI errors

def _case_with_other_structures(source, folder):
    """The phantom without its Bowel channel, and 'Femur_R' renamed: another structure set."""
    case = load_case(source)
    keep = [i for i, name in enumerate(case.structures) if name != "Bowel"]
    names = ["FemoralHead_R" if case.structures[i] == "Femur_R" else case.structures[i] for i in keep]
    case.masks_sdf = np.ascontiguousarray(case.masks_sdf[keep])
    case.metadata["structures"] = names
    return save_case(folder / "other_structures.npz", case)


def test_cli_refuses_to_overwrite_the_input_case(data_dir, checkpoints, tmp_path, capsys):
    case_path = tmp_path / "case.npz"
    case_path.write_bytes(_case_files(data_dir)[0].read_bytes())
    code = main(["--checkpoint", str(checkpoints["baseline"]), "--input", str(case_path), "--output", str(case_path)])
    assert code == 2 and "is an input case file" in _error_message(capsys)
    assert load_case(case_path).dose is not None


def test_bin_wrapper_exits_2_without_traceback(data_dir, tmp_path):
    script = REPO_ROOT / "bin" / "inference_dose_ddpm.py"
    result = subprocess.run([sys.executable, str(script), "--checkpoint", str(tmp_path / "absent.ckpt"),
                             "--input", str(_case_files(data_dir)[0])], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --checkpoint:") and "Traceback" not in result.stderr


@pytest.mark.parametrize("problem", ["missing_checkpoint", "text_file", "case_as_checkpoint", "other_structures",
                                     "baseline_samples", "unknown_kind", "kind_class_mismatch", "output_dir_is_a_file"])
def test_cli_bad_input_exits_2_with_one_message(problem, data_dir, checkpoints, tmp_path, capsys):
    case_path = _case_files(data_dir)[0]
    checkpoint = checkpoints["baseline"]
    extra = []
    expected = {"missing_checkpoint": "not found", "text_file": "not a PyTorch checkpoint",
                "case_as_checkpoint": "a numpy .npz archive (a case file?), not a checkpoint",
                "other_structures": "Bowel", "baseline_samples": "--samples", "unknown_kind": "unknown model kind",
                "kind_class_mismatch": "SimpleUNet3D", "output_dir_is_a_file": "exists and is not a folder"}[problem]
    if problem == "missing_checkpoint":
        checkpoint = tmp_path / "absent.ckpt"
    elif problem == "text_file":
        checkpoint = tmp_path / "notes.ckpt"
        checkpoint.write_text("not a checkpoint\n")
    elif problem == "case_as_checkpoint":
        checkpoint = case_path
    elif problem == "other_structures":
        case_path = _case_with_other_structures(case_path, tmp_path)
    elif problem == "baseline_samples":
        extra = ["--samples", "2"]
    elif problem == "unknown_kind":
        checkpoint = _write_checkpoint(tmp_path / "gan.ckpt", "baseline", model_kind="gan")
    elif problem == "kind_class_mismatch":
        checkpoint = _write_checkpoint(tmp_path / "mixed.ckpt", "baseline", model_kind="ddpm")
    out = tmp_path / "out"
    if problem == "output_dir_is_a_file":
        out.write_text("a file where the output folder should go\n")
    code = main(["--checkpoint", str(checkpoint), "--input", str(case_path), "--output_dir", str(out)] + extra)
    assert code == 2
    message = _error_message(capsys)
    assert expected in message
    if problem == "output_dir_is_a_file":
        assert message.startswith("error: --output_dir:") and out.read_text().startswith("a file")
        return
    if problem == "other_structures":
        assert "FemoralHead_R" in message and str(case_path) in message
    assert not out.exists() or not list(out.glob("*_pred.npz"))  # nothing predicted before the error


@pytest.mark.parametrize("kind, overrides, expected", [
    ("ddpm", dict(schedule={"timesteps": "fifty", "schedule": "cosine"}), "'schedule' must be {timesteps: int"),
    ("ddpm", dict(schedule={"timesteps": 50, "schedule": "sigmoid"}), "'sigmoid'"),
    ("baseline", dict(config={"patch_size": [16, 16, 16]}), "'config.patch_size': expected a positive integer"),
    ("baseline", dict(config={"patch_size": "16"}), "'config.patch_size': expected a positive integer"),
])
def test_cli_malformed_checkpoint_entry_exits_2_with_one_message(kind, overrides, expected, data_dir, tmp_path,
                                                                 capsys):
    checkpoint = _write_checkpoint(tmp_path / "bad.ckpt", kind, **overrides)
    code = main(["--checkpoint", str(checkpoint), "--input", str(_case_files(data_dir)[0]), "--output_dir",
                 str(tmp_path / "out"), "--ddim_steps", "2", "--quiet", "--no_plots"])
    assert code == 2
    message = _error_message(capsys)
    assert message.startswith("error: checkpoint: ") and expected in message


# ----------------------------------------------------------------------------- library

def test_predict_case_baseline_is_the_scaled_network_output(data_dir, checkpoints):
    model, info = load_model_from_checkpoint(checkpoints["baseline"])
    case = load_case(_case_files(data_dir)[0])
    # One window covering the whole volume: the blending weights cancel exactly.
    prediction = predict_case(model, info, case, patch_size=32, overlap=0)
    with torch.no_grad():
        x = torch.cat([torch.from_numpy(case.ct)[None], torch.from_numpy(case.masks_sdf)])[None]
        raw = model(x, torch.from_numpy(case.constraints)[None])[0, 0].numpy() * 70.0
    expected = np.clip(raw, 0.0, None) * (case.extras["possible_dose_mask"] != 0)
    np.testing.assert_allclose(prediction.dose_gy, expected, rtol=1e-5, atol=1e-4)
    unmasked = predict_case(model, info, case, patch_size=32, overlap=0, mask_outside=False)
    np.testing.assert_allclose(unmasked.dose_gy, np.clip(raw, 0.0, None), rtol=1e-5, atol=1e-4)
    assert prediction.std_gy is None and prediction.metadata["samples"] == 1


def test_predict_case_ddpm_reproducible_with_generator(data_dir, checkpoints):
    model, info = load_model_from_checkpoint(checkpoints["ddpm"])
    case = load_case(_case_files(data_dir)[2])
    run = lambda seed: predict_case(model, info, case, patch_size=PATCH, overlap=4, ddim_steps=2,
                                    generator=torch.Generator().manual_seed(seed))
    first, second, other = run(1), run(1), run(2)
    np.testing.assert_array_equal(first.dose_gy, second.dose_gy)
    assert not np.array_equal(first.dose_gy, other.dose_gy)


def test_predict_case_rejects_bad_settings(data_dir, checkpoints):
    model, info = load_model_from_checkpoint(checkpoints["baseline"])
    case = load_case(_case_files(data_dir)[0])
    with pytest.raises(InferenceInputError, match="patch_size: must be a multiple of 2"):
        predict_case(model, info, case, patch_size=15, overlap=3)
    with pytest.raises(InferenceInputError, match="samples"):
        predict_case(model, info, case, patch_size=PATCH, overlap=4, samples=3)
    case.metadata["structures"] = list(reversed(case.structures))
    with pytest.raises(InferenceInputError, match="another channel order"):
        predict_case(model, info, case, patch_size=PATCH, overlap=4)


def test_predict_case_default_window_is_the_clis(data_dir, tmp_path, capsys):
    # The checkpoint trained on PATCH^3 patches: both routes use PATCH and PATCH // 4 unless told otherwise.
    checkpoint = _write_checkpoint(tmp_path / "baseline.ckpt", "baseline")
    case_path = _case_files(data_dir)[0]
    assert main(["--checkpoint", str(checkpoint), "--input", str(case_path), "--output_dir", str(tmp_path),
                 "--device", "cpu", "--quiet", "--no_plots"]) == 0, capsys.readouterr().err
    case = load_case(case_path)
    from_cli = load_prediction(tmp_path / f"{case.case_id}_pred.npz")
    model, info = load_model_from_checkpoint(checkpoint)
    prediction = predict_case(model, info, case)
    assert (prediction.metadata["patch_size"], prediction.metadata["overlap"]) == (PATCH, PATCH // 4)
    assert (from_cli.metadata["patch_size"], from_cli.metadata["overlap"]) == (PATCH, PATCH // 4)
    np.testing.assert_array_equal(prediction.dose_gy, from_cli.dose_gy)
    explicit = predict_case(model, info, case, patch_size=8, overlap=2)  # explicit values still win
    assert (explicit.metadata["patch_size"], explicit.metadata["overlap"]) == (8, 2)


def test_window_settings_fall_back_to_128_and_a_quarter_overlap():
    assert window_settings({"config": {}}) == (128, 32)
    assert window_settings({}) == (128, 32)
    assert window_settings({"config": {"patch_size": 48}}) == (48, 12)
    assert window_settings({"config": {"patch_size": 48}}, overlap=0) == (48, 0)
    assert window_settings({"config": {"patch_size": 48}}, patch_size=16) == (16, 4)


def test_predict_case_rejects_eta_outside_0_1(data_dir, tmp_path):
    model, info = load_model_from_checkpoint(_write_checkpoint(tmp_path / "ddpm.ckpt", "ddpm"))
    case = load_case(_case_files(data_dir)[0])
    with pytest.raises(InferenceInputError, match=r"eta must be a number in \[0, 1\]"):
        predict_case(model, info, case, ddim_steps=2, eta=1.5)


def test_prediction_file_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    prediction = Prediction(rng.random((4, 5, 6), dtype=np.float32), rng.random((4, 5, 6), dtype=np.float32),
                            {"case_id": "a", "spacing_mm": [1.0, 2.0, 3.0]})
    loaded = load_prediction(save_prediction(tmp_path / "a_pred.npz", prediction))
    np.testing.assert_array_equal(loaded.dose_gy, prediction.dose_gy)
    np.testing.assert_array_equal(loaded.std_gy, prediction.std_gy)
    assert loaded.metadata == prediction.metadata


def test_case_metrics_of_a_perfect_prediction():
    case = make_phantom("perfect", shape=SHAPE, spacing_mm=SPACING, seed=3)
    metrics = case_metrics(case.dose.copy(), case, gamma_subsample=2)
    assert metrics["mae_gy"] == 0.0 and metrics["dose_score"] == 0.0 and metrics["dvh_score"] == 0.0
    assert metrics["gamma_pass_rate"] == 100.0 and metrics["gamma_pass_rate_targets"] == 100.0
    assert metrics["gamma"]["evaluated_voxels"] > 0 and metrics["gamma"]["target_voxels"] > 0
    assert metrics["gamma"]["targets"] == ["PTV70", "PTV56"]
    assert metrics["goals_total"] > 0 and metrics["goals_agree"] == metrics["goals_total"]
    for values in metrics["dvh_metrics"].values():
        assert values["reference"] == values["predicted"]
    json.dumps(metrics)  # JSON-able as written to metrics.json


def test_case_metrics_gamma_and_mae_react_to_an_error():
    case = make_phantom("shifted", shape=SHAPE, spacing_mm=SPACING, seed=4)
    del case.extras["possible_dose_mask"]
    pred = case.dose * 1.2  # a 20 % overdose fails 3 %/3 mm (global) wherever dose > 15 % of the maximum
    metrics = case_metrics(pred, case, gamma_subsample=1)
    assert metrics["mae_region"] == "all_voxels" and metrics["dose_score"] is None
    assert metrics["mae_gy"] == pytest.approx(0.2 * case.dose.mean(), rel=1e-5)
    assert metrics["gamma_pass_rate_targets"] < 50.0
    assert metrics["gamma_pass_rate"] < 100.0
    with pytest.raises(ValueError, match="no reference dose"):
        case_metrics(pred, Case(case.ct, None, case.masks_sdf, case.constraints, case.metadata))


def test_summarize_metrics_mean_sd_and_missing_values():
    rows = [flat_metrics({"case_id": "a", "mae_gy": 1.0, "dvh_score": None}),
            flat_metrics({"case_id": "b", "mae_gy": 3.0, "dvh_score": 2.0})]
    summary = summarize_metrics(rows)
    assert summary["n_cases"] == 2
    assert summary["mean"]["mae_gy"] == 2.0 and summary["sd"]["mae_gy"] == pytest.approx(np.sqrt(2.0))
    assert summary["mean"]["dvh_score"] == 2.0 and summary["sd"]["dvh_score"] is None
    assert summary["n"]["dvh_score"] == 1


def _rename_structures(case, case_id):
    """``case`` with every structure renamed (no site's table knows them) and no metadata 'site'."""
    case.metadata.update(case_id=case_id, structures=[f"Organ{i}" for i in range(len(case.structures))])
    case.metadata.pop("site", None)
    return case


def test_case_metrics_without_a_fitting_site_records_no_goals():
    case = make_phantom("custom", shape=SHAPE, spacing_mm=SPACING, seed=3)
    assert case_metrics(case.dose, case, compute_gamma=False)["goals_site"] == "prostate"  # metadata 'site'
    metrics = case_metrics(case.dose * 1.1, _rename_structures(case, "custom"), compute_gamma=False)
    assert (metrics["goals_site"], metrics["goals"], metrics["goals_agree"], metrics["goals_total"]) == (None,) * 4
    assert "fit no site" in metrics["goals_not_checked"]
    assert metrics["dvh_score"] > 0.0 and len(metrics["dvh_metrics"]) == len(case.structures)
    json.dumps(metrics)


def test_cli_metrics_of_cases_without_a_fitting_site_note_it_once(data_dir, tmp_path, capsys):
    names = [f"Organ{i}" for i in range(len(PROSTATE_STRUCTURES))]
    checkpoint = _write_checkpoint(tmp_path / "custom.ckpt", "baseline", structures=names)
    cases = tmp_path / "cases"
    for i, path in enumerate(_case_files(data_dir)[:2]):
        save_case(cases / f"c{i}.npz", _rename_structures(load_case(path), f"c{i}"))
    out = tmp_path / "out"
    code = main(["--checkpoint", str(checkpoint), "--input_dir", str(cases), "--output_dir", str(out),
                 "--compute_metrics", "--gamma_subsample", "4", "--no_plots", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("clinical goals not checked") == 1 and "set metadata 'site'" in err
    report = json.loads((out / "metrics.json").read_text())
    assert [(c["goals_site"], c["goals"], c["goals_total"]) for c in report["cases"]] == [(None, None, None)] * 2
    assert "goals_total" not in report["summary"]["mean"]
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    assert [row["goals_total"] for row in rows] == ["", "", "", ""]      # c0, c1, mean, sd
