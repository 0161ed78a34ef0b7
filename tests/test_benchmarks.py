"""Smoke tests of the benchmarks (benchmarks/): tiny settings, results checked, never timings."""
import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def has_monai():
    try:
        importlib.import_module("monai")
        importlib.import_module("einops")
    except ImportError:
        return False
    return True


def test_diffusion_benchmark_counts_windows_and_batch_size_does_not_change_the_sample(tmp_path):
    bench = load("bench_diffusion_predict")
    out = tmp_path / "diffusion.json"
    assert bench.main(["--shape", "24", "24", "16", "--patch", "16", "--overlap", "4", "--steps", "2",
                       "--base", "8", "--levels", "2", "--batch-sizes", "1", "3", "--repeats", "1",
                       "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["windows"] == 2 * 2 * 1
    assert len(result["rows"]) == 4
    for row in result["rows"]:
        assert row["windows_evaluated"] == result["windows"] * 2  # windows x steps, in both modes
        expected_calls = 2 * (-(-result["windows"] // row["batch_size"]))
        if row["mode"] == "synchronous":
            assert row["model_calls"] == expected_calls
        assert row["median_s"] > 0
    assert result["synchronous_batch_size_mean_diff"] < 1e-4
    assert result["machine"]["torch_threads"] == 1 and "load_average_1min" in result["machine"]


@pytest.mark.skipif(not has_monai(), reason="MONAI (benchmark-only) is not installed: pip install monai einops")
def test_train_step_benchmark_reports_every_model(tmp_path):
    bench = load("bench_train_step")
    out = tmp_path / "train.json"
    assert bench.main(["--patch", "16", "--base", "8", "--precision", "fp32", "--repeats", "1", "--warmup", "0",
                       "--matmul-size", "64", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["model"] for row in rows] == ["SimpleUNet3D", "BaselineUNet3D", "MONAI DiffusionModelUNet"]
    for row in rows:
        assert row["gflop_per_step"] > 0 and row["voxels_per_s"] > 0 and row["percent_of_matmul"] > 0
    assert rows[-1]["voxels_per_s_vs_monai"] == pytest.approx(1.0)


@pytest.mark.skipif(not has_monai(), reason="MONAI (benchmark-only) is not installed: pip install monai einops")
def test_sliding_window_benchmark_grids_and_agreement(tmp_path, capsys):
    bench = load("bench_sliding_window")
    out = tmp_path / "sw.json"
    # 16-voxel windows overlapping by 4 on a 40-voxel axis: MONAI's interval int(16 * 0.75) = 12
    # gives the same starts as ours (0, 12, 24), so the two blends differ only in the Gaussian.
    assert bench.main(["--shape", "40", "40", "40", "--patch", "16", "--overlap", "4", "--repeats", "1",
                       "--threads", "1", "--no-memory", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["grid"]["ours"] == result["grid"]["monai"] == [[0, 12, 24]] * 3
    assert [row["windows"] for row in result["rows"]] == [27, 27, 27]
    assert result["agreement"]["mean_abs_diff"] < 0.05 * result["agreement"]["output_abs_max"]
    own = {row["method"]: row["own_cost_s"] for row in result["rows"]}
    assert own["ours"] > 0 and own["monai"] > 0 and own["bare"] == 0
    capsys.readouterr()
    assert bench.main(["--worker", "ours", "--shape", "40", "40", "40", "--patch", "16", "--overlap", "4",
                       "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["peak_rss_growth_bytes"] >= 0


def test_patch_io_benchmark_reads_the_same_patches_everywhere(tmp_path):
    bench = load("bench_patch_io")
    out = tmp_path / "patch_io.json"
    assert bench.main(["--shape", "40", "36", "32", "--patch", "16", "--reads", "3", "--npz-repeats", "1",
                       "--workdir", str(tmp_path), "--json", str(out)]) == 0   # raises if store and npz differ
    result = json.loads(out.read_text())
    methods = [row["method"] for row in result["rows"]]
    assert any("read_threads=2" in m for m in methods) and methods[-1].startswith("npz")
    assert result["channels"] == 10 and all(row["n"] >= 1 and row["median_ms"] > 0 for row in result["rows"])
    assert not list(tmp_path.glob("bench_patch_io_*"))   # temporary files removed


def test_gamma_benchmark_agrees_with_pymedphys(tmp_path):
    pytest.importorskip("pymedphys")
    bench = load("bench_gamma")
    out = tmp_path / "gamma.json"
    assert bench.main(["--sizes", "64x64x64", "--no-openkbp", "--repeats", "1", "--min-seconds", "0",
                       "--pymedphys-repeats", "1", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1
    row = rows[0]
    assert abs(row["pass_difference_pp"]) < 0.1 and row["same_voxels"] and row["max_abs_gamma_difference"] < 1e-3
    assert row["ratio"] > 1


def test_train_step_profile_splits_kernel_time(tmp_path):
    bench = load("bench_train_step")
    out = tmp_path / "train.json"
    assert bench.main(["--models", "baseline", "--patch", "16", "--base", "8", "--precision", "fp32", "--repeats", "1",
                       "--warmup", "0", "--matmul-size", "64", "--threads", "1", "--profile", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert 0 < row["kernel_share_percent"] <= 100
    assert row["kernel_gflops"] >= row["achieved_gflops"] * 0.5   # kernels alone are faster than the whole step


def test_gpu_suite_script_runs_every_benchmark_at_toy_sizes(tmp_path):
    """The prepared GPU run (benchmarks/gpu_suite.sh) on the CPU with QUICK=1: every benchmark
    runs and writes its JSON, so a session lent a GPU can run it as it is."""
    import os
    import shutil
    import subprocess
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and timeout")
    env = dict(os.environ, DEVICE="cpu", QUICK="1", OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_suite.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    names = ["train_step", "diffusion_predict", "gamma"] + (["sliding_window"] if has_monai() else [])
    for name in names:
        assert json.loads((tmp_path / f"{name}.json").read_text())["rows"], name
    assert (tmp_path / "sliding_window.json").exists() == has_monai()


def test_host_memory_benchmark_compares_both_settings(tmp_path):
    bench = load("bench_host_memory")
    out = tmp_path / "host_memory.json"
    assert bench.main(["--base", "8", "--patch", "16", "--window", "16", "--repeats", "1", "--threads", "1",
                       "--json", str(out)]) == 0
    if not out.exists():  # not glibc: the script says so and compares nothing
        return
    rows = json.loads(out.read_text())["rows"]
    assert [row["case"] for row in rows] == ["train", "infer"]
    for row in rows:
        assert row["default_s"] > 0 and row["kept_s"] > 0
        assert set(row["rounds"]) == {"glibc default", "freed memory kept"}
