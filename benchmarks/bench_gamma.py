"""Gamma index speed and agreement: ``vmat_diffusion.gamma`` vs ``pymedphys.gamma`` (0.41).

Both compute global 3 %/3 mm gamma with a 10 % lower dose cutoff, ``max_gamma=1.1`` and
``interp_fraction=10`` (pymedphys is called with ``lower_percent_dose_cutoff=10`` explicitly: its
default is 20). Each case is a reference dose and an "evaluated" dose made from it by a sub-voxel
shift (up to 1 mm per axis), a global scale within +-1 % and smooth noise (1 % of the maximum,
8 mm correlation) inside the dose region, so pass rates are high but not 100 %.

Cases: phantom doses (``vmat_diffusion.phantom.make_phantom``) of 64x64x64 (6 x 6 x 4 mm),
128x128x64 (3 x 3 x 4 mm) and 256x256x128 (2 mm), two real OpenKBP doses when the folder exists,
plus one of them against a poor "prediction" like a model's (the dose Gaussian-blurred by 3 voxels
and scaled by 1.06: about half the voxels fail, so the search cannot stop early), and with
``--big`` a 512x512x256 (1 mm) phantom for ours only.

The table shows, per case: evaluated voxels, our time per call (after a warm-up call, the best
of ``--repeats`` samples, each the mean of as many calls as take ``--min-seconds``: a 10 ms call
timed alone would see only the machine's fastest or slowest moments, a 1 s pymedphys call sees
their mean), pymedphys's time (best of ``--pymedphys-repeats`` calls, after a numba warm-up on a
tiny dose), the ratio, both pass
rates (gamma <= 1, percent of evaluated voxels), their difference (percentage points) and the
largest gamma difference. Wall-clock times; CPU times are in the JSON. pymedphys gets axes
starting at 0 (its usual use), so a few voxels on the low faces of the grid may differ (see
``vmat_diffusion.gamma``). The header's "torch op overhead" is the time of one small
multithreaded op: microseconds on an idle machine; milliseconds when other processes keep the
cores busy, and then ``--threads 1`` is much faster for ours.

Usage::

    python benchmarks/bench_gamma.py                                  # all sizes + OpenKBP
    python benchmarks/bench_gamma.py --sizes 64x64x64 128x128x64 --json out.json
    python benchmarks/bench_gamma.py --skip-pymedphys-above 3000000 --big
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, parse_device, synchronize, write_json  # noqa: E402  (sets OMP_WAIT_POLICY before torch loads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402

from vmat_diffusion.gamma import gamma_index, pass_rate_from_gamma

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OPENKBP = REPO_ROOT.parent / "shared" / "data" / "openkbp"
OPENKBP_PATIENTS = ("train-pats/pt_2", "validation-pats/pt_208")
POOR_PREDICTION_PATIENT = "validation-pats/pt_208"
PHANTOM_CASES = {  # shape -> spacing (mm)
    "64x64x64": (6.0, 6.0, 4.0),
    "128x128x64": (3.0, 3.0, 4.0),
    "256x256x128": (2.0, 2.0, 2.0),
}
BIG_CASE = ("512x512x256", (1.0, 1.0, 1.0))
CRITERIA = dict(dose_percent=3.0, distance_mm=3.0, cutoff_percent=10.0, max_gamma=1.1, interp_fraction=10)


def perturbed(dose: np.ndarray, spacing_mm, seed: int) -> np.ndarray:
    """Sub-voxel shift (<= 1 mm per axis), scale 0.99-1.01 and smooth 1 % noise in the dose region."""
    rng = np.random.default_rng(seed)
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    shift_voxels = rng.uniform(-1.0, 1.0, 3) / spacing
    noise = ndimage.gaussian_filter(rng.standard_normal(dose.shape).astype(np.float32), 8.0 / spacing)
    noise *= 0.01 * float(dose.max()) / max(float(noise.std()), 1e-12)
    moved = ndimage.shift(dose, shift_voxels, order=1, mode="nearest") * rng.uniform(0.99, 1.01)
    return np.clip(moved + noise * (dose > 0.05 * dose.max()), 0.0, None).astype(np.float32)


def phantom_dose(shape, spacing_mm, seed: int = 0) -> np.ndarray:
    from vmat_diffusion.phantom import make_phantom
    return np.asarray(make_phantom("bench", shape=shape, spacing_mm=spacing_mm, seed=seed).dose, dtype=np.float32)


def openkbp_dose(folder: Path):
    """(dose (128, 128, 128) Gy float32, voxel size mm) of one OpenKBP patient folder."""
    try:
        from vmat_diffusion.openkbp import read_openkbp_patient
        patient = read_openkbp_patient(folder)
        return patient.dose.astype(np.float32), tuple(patient.voxel_dimensions_mm)
    except ImportError:
        table = np.loadtxt(folder / "dose.csv", delimiter=",", skiprows=1)
        dose = np.zeros(128 ** 3, dtype=np.float32)
        dose[table[:, 0].astype(np.int64)] = table[:, 1]
        return dose.reshape(128, 128, 128), tuple(np.loadtxt(folder / "voxel_dimensions.csv"))


def best_of(call, repeats: int, device=torch.device("cpu"), min_seconds: float = 0.0):
    """(the last result, best wall s per call, best CPU s per call) over ``repeats`` samples; a
    sample is as many back-to-back calls as take ``min_seconds`` (at least one), averaged, so a
    short call is timed over as long a stretch of the machine's fluctuating speed as a long one
    (GPU work waited for)."""
    walls, cpus = [], []
    for _ in range(repeats):
        synchronize(device)
        wall, cpu, calls = time.perf_counter(), time.process_time(), 0
        while calls == 0 or time.perf_counter() - wall < min_seconds:
            result = call()
            synchronize(device)
            calls += 1
        walls.append((time.perf_counter() - wall) / calls)
        cpus.append((time.process_time() - cpu) / calls)
    return result, min(walls), min(cpus)


def time_ours(reference, evaluated, spacing_mm, repeats: int, threads: int, device=torch.device("cpu"),
              min_seconds: float = 0.0):
    """(gamma numpy array, best wall s, best CPU s) per call; on a GPU the doses are tensors
    already there (the copy to the device is not timed) and the time includes a synchronisation."""
    torch.set_num_threads(threads)  # again: a pymedphys (numba) call may have reset it
    if device.type != "cpu":
        reference, evaluated = (torch.from_numpy(a).to(device) for a in (reference, evaluated))
    gamma_index(reference, evaluated, spacing_mm, **CRITERIA)  # warm-up (builds the cached search plan)
    gamma, wall, cpu = best_of(lambda: gamma_index(reference, evaluated, spacing_mm, **CRITERIA), repeats, device,
                               min_seconds)
    return (gamma.cpu().numpy() if torch.is_tensor(gamma) else gamma), wall, cpu


def poor_prediction(dose: np.ndarray) -> np.ndarray:
    """A smooth, biased stand-in for a model's prediction: blurred by 3 voxels, scaled by 1.06."""
    return (ndimage.gaussian_filter(dose, 3.0) * 1.06).astype(np.float32)


def run_pymedphys(reference, evaluated, spacing_mm, repeats: int = 1):
    """(gamma, best wall s, best CPU s) of ``repeats`` pymedphys.gamma calls."""
    import pymedphys
    axes = tuple(np.arange(n) * s for n, s in zip(reference.shape, spacing_mm))
    return best_of(lambda: pymedphys.gamma(
        axes, reference, axes, evaluated, CRITERIA["dose_percent"], CRITERIA["distance_mm"],
        lower_percent_dose_cutoff=CRITERIA["cutoff_percent"], max_gamma=CRITERIA["max_gamma"],
        interp_fraction=CRITERIA["interp_fraction"]), repeats)


def warm_up_pymedphys():
    dose = np.zeros((8, 8, 8), dtype=np.float32)
    dose[2:6, 2:6, 2:6] = 1.0
    run_pymedphys(dose, dose, (1.0, 1.0, 1.0))


def bench_case(name, reference, evaluated, spacing_mm, args, with_pymedphys: bool) -> dict:
    ours, wall, cpu = time_ours(reference, evaluated, spacing_mm, args.repeats, args.threads, args.device,
                                args.min_seconds)
    row = dict(case=name, shape=list(reference.shape), spacing_mm=[float(s) for s in spacing_mm],
               torch_threads=torch.get_num_threads(), op_overhead_ms=op_overhead_ms(),
               evaluated_voxels=int(np.count_nonzero(~np.isnan(ours))),
               ours_s=wall, ours_cpu_s=cpu, ours_pass=pass_rate_from_gamma(ours))
    if with_pymedphys:
        theirs, p_wall, p_cpu = run_pymedphys(reference, evaluated, spacing_mm, args.pymedphys_repeats)
        both = ~np.isnan(theirs) & ~np.isnan(ours)
        row.update(pymedphys_s=p_wall, pymedphys_cpu_s=p_cpu, ratio=p_wall / wall,
                   pymedphys_pass=pass_rate_from_gamma(theirs),
                   pass_difference_pp=row["ours_pass"] - pass_rate_from_gamma(theirs),
                   same_voxels=bool(np.array_equal(np.isnan(theirs), np.isnan(ours))),
                   max_abs_gamma_difference=float(np.abs(theirs[both] - ours[both]).max()) if both.any() else 0.0)
    print_row(row)
    return row


HEADER = (f"{'case':<24}{'voxels':>10}{'ours s':>9}{'pymedphys s':>13}{'ratio':>8}"
          f"{'ours %':>9}{'pmp %':>9}{'diff pp':>9}{'max |dg|':>10}")


def print_row(row: dict) -> None:
    def num(key, width, fmt):
        return format(row[key], f"{width}{fmt}") if key in row else "-".rjust(width)
    print(f"{row['case']:<24}{row['evaluated_voxels']:>10}{num('ours_s', 9, '.3f')}{num('pymedphys_s', 13, '.2f')}"
          f"{num('ratio', 8, '.0f')}{num('ours_pass', 9, '.3f')}{num('pymedphys_pass', 9, '.3f')}"
          f"{num('pass_difference_pp', 9, '.3f')}{num('max_abs_gamma_difference', 10, '.1e')}", flush=True)


def op_overhead_ms(repeats: int = 200) -> float:
    """Mean time (ms) of one multithreaded elementwise op on 100k floats: on an idle machine a few
    microseconds; when other processes keep the cores busy, each op waits for its threads."""
    values = torch.rand(100_000)
    start = time.perf_counter()
    for _ in range(repeats):
        values.mul(2.0)
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", default=list(PHANTOM_CASES), choices=list(PHANTOM_CASES),
                        help="phantom sizes to run")
    parser.add_argument("--openkbp", type=Path, default=DEFAULT_OPENKBP, help="OpenKBP folder (skipped if absent)")
    parser.add_argument("--no-openkbp", action="store_true", help="skip the real OpenKBP doses")
    parser.add_argument("--skip-pymedphys-above", type=int, default=None, metavar="N",
                        help="run pymedphys only on volumes of at most N voxels")
    parser.add_argument("--big", action="store_true", help="also time ours on a 512x512x256 1 mm phantom")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed samples of ours (the best is reported), each --min-seconds long")
    parser.add_argument("--min-seconds", type=float, default=1.0,
                        help="each sample of ours repeats the call for at least this long and reports the "
                             "mean per call (about one pymedphys call on the smallest case); 0: one call")
    parser.add_argument("--pymedphys-repeats", type=int, default=2, help="timed pymedphys calls (best is reported)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and numba threads (1: what BENCHMARKS.md reports; the small ops of ours gain "
                             "little from a second thread, and lose much under OMP_WAIT_POLICY=PASSIVE)")
    parser.add_argument("--device", default="cpu", help="where ours runs (cuda: tensors on the GPU); "
                        "pymedphys always runs on the CPU")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    args.device = parse_device(args.device)

    try:
        import numba
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        import pymedphys  # noqa: F401
        have_pymedphys = True
        warm_up_pymedphys()
    except ImportError as error:
        print(f"pymedphys not available ({error}); timing ours only")
        have_pymedphys = False
    # after numba: starting its OpenMP threading layer resets the thread count torch uses
    torch.set_num_threads(args.threads)

    def pymedphys_for(volume) -> bool:
        return have_pymedphys and (args.skip_pymedphys_above is None or volume.size <= args.skip_pymedphys_above)

    overhead = op_overhead_ms()
    print(f"device={args.device}  threads={args.threads}  criteria={CRITERIA}  torch op overhead {overhead:.3f} ms")
    print(HEADER)
    rows = RowsWithJson(args, overhead)  # the JSON is rewritten after every case: a run cut short keeps its rows
    for seed, size in enumerate(args.sizes):
        shape = tuple(int(n) for n in size.split("x"))
        reference = phantom_dose(shape, PHANTOM_CASES[size])
        evaluated = perturbed(reference, PHANTOM_CASES[size], seed=seed)
        rows.append(bench_case(f"phantom {size}", reference, evaluated, PHANTOM_CASES[size], args,
                               pymedphys_for(reference)))
    if not args.no_openkbp and (args.openkbp / "train-pats").is_dir():
        for seed, patient in enumerate(OPENKBP_PATIENTS, start=100):
            if not (args.openkbp / patient).is_dir():
                continue
            reference, spacing = openkbp_dose(args.openkbp / patient)
            evaluated = perturbed(reference, spacing, seed=seed)
            rows.append(bench_case(f"openkbp {patient.split('/')[-1]}", reference, evaluated, spacing, args,
                                   pymedphys_for(reference)))
            if patient == POOR_PREDICTION_PATIENT:
                rows.append(bench_case(f"openkbp {patient.split('/')[-1]} poor", reference,
                                       poor_prediction(reference), spacing, args, pymedphys_for(reference)))
    if args.big:
        size, spacing = BIG_CASE
        shape = tuple(int(n) for n in size.split("x"))
        reference = phantom_dose(shape, spacing)
        evaluated = perturbed(reference, spacing, seed=7)
        rows.append(bench_case(f"phantom {size}", reference, evaluated, spacing, args, with_pymedphys=False))
    return 0


class RowsWithJson(list):
    """The table's rows; each ``append`` also rewrites ``--json`` (if given) with all rows so far."""

    def __init__(self, args, overhead_ms: float):
        super().__init__()
        self.args, self.overhead_ms = args, overhead_ms

    def append(self, row) -> None:
        super().append(row)
        args = self.args
        write_json(args.json, dict(
            criteria=CRITERIA, threads=args.threads, repeats=args.repeats, min_seconds=args.min_seconds,
            pymedphys_repeats=args.pymedphys_repeats, op_overhead_ms=self.overhead_ms,
            machine=machine_info(args.device), device=str(args.device), rows=list(self),
        ), quiet=True)


if __name__ == "__main__":
    sys.exit(main())
