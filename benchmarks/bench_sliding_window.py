"""Sliding-window inference: ours vs MONAI's ``sliding_window_inference``, same predictor and windows.

A random volume of ``--shape`` (default 512 x 512 x 256, ``--channels`` channels) goes through
a window-sized predictor with windows of ``--patch`` voxels overlapping by ``--overlap`` voxels
(MONAI: overlap fraction ``overlap / patch``, mode="gaussian", sigma_scale 0.125). Timed
interleaved in the same run:

* ours: ``vmat_diffusion.sliding_window.sliding_window_inference``;
* MONAI: ``monai.inferers.sliding_window_inference`` (benchmark only; ``pip install monai``);
* bare forward passes: our window grid's windows (views of the volume for batch 1, else
  stacked copies) fed to the predictor, outputs discarded (no weights, no accumulation): the floor any windowing code
  pays. ``overhead %`` = (ours - bare) / bare.

Because 2-thread wall times here drift by 5-10 % between rounds, the windowing code's own
cost is also timed on its own: the same method with a free predictor (it returns a ready
window of ones), so the rounds take a tenth of the time and only the window handling,
weighting and accumulation are left. ``own cost %`` = that time / bare.

Also reported: both window grids (counts; MONAI's last window is pushed back from the border,
ours spaces the starts evenly, so the counts match but positions may differ), their maximum
and mean absolute difference, and peak memory per method: the peak RSS growth of a fresh
subprocess that builds the volume and runs the method (CPU), or the peak of
``torch.cuda.max_memory_allocated`` (GPU). The budget is the bare run's peak (volume + one
batch of windows and the predictor's activations) plus the float32 accumulators windowing
code usually keeps (output sum and weight sum; ours keeps only the output sum, its weights
being normalised per window).

On the CPU the timed rounds and the memory subprocesses keep freed host memory for reuse, as
``vmat-infer`` does there (``vmat_diffusion.host_memory``): the accumulators and the
predictor's activations are then not page-faulted in anew on every call;
``--release-freed-memory`` leaves glibc's defaults.

Predictors (``--model``): ``tiny`` (default; Conv3d(C, 8, 3) -> SiLU -> Conv3d(8, 1, 1) on
channels-last input, cheap,
so the windowing overhead is clearly visible) or ``unet`` (BaselineUNet3D(base 8, levels 3),
closer to real use; a 512 x 512 x 256 volume then takes a long time on CPU).

Usage::

    python benchmarks/bench_sliding_window.py                       # CPU defaults, a few minutes
    python benchmarks/bench_sliding_window.py --shape 256 256 128 --model unet --json sw.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (configure_threads, keeps_freed_memory, load_average, parse_device, start_benchmark,  # noqa: E402  (before torch)
                    peak_rss_bytes, print_table, run_json_subprocess, summarize_times, synchronize,
                    settings_of, time_interleaved, write_json)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from vmat_diffusion.host_memory import keep_freed_memory  # noqa: E402
from vmat_diffusion.sliding_window import sliding_window_inference, window_starts  # noqa: E402
from vmat_diffusion.unet import BaselineUNet3D  # noqa: E402

METHODS = ("ours", "monai", "bare")


def make_predictor(kind: str, channels: int, device: torch.device) -> nn.Module:
    """Window predictor (N, C, p, p, p) -> (N, 1, p, p, p), eval mode, fixed seed."""
    torch.manual_seed(0)
    if kind == "tiny":
        model = _ChannelsLast(nn.Sequential(nn.Conv3d(channels, 8, 3, padding=1), nn.SiLU(), nn.Conv3d(8, 1, 1)))
    else:
        unet = BaselineUNet3D(in_channels=channels, base_channels=8, levels=3)
        nn.init.normal_(unet.backbone.output.weight, std=0.1)  # zero-initialised: make the output non-trivial
        model = _NoConstraints(unet)
    return model.to(device).eval()


class _ChannelsLast(nn.Module):
    """Runs ``model`` on channels-last input (PyTorch's CPU convolutions with few channels are
    3x slower on the default layout; a cheap predictor should not be a pathological one)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.model(windows.contiguous(memory_format=torch.channels_last_3d))


class _NoConstraints(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.model(windows, None)


def free_predictor(args, device: torch.device):
    """A predictor that costs nothing: it returns a ready batch of ones (never modified by either method)."""
    ones = torch.ones((args.batch_size, 1) + (args.patch,) * 3, device=device)
    return lambda windows: ones[:windows.shape[0]]


def make_volume(args, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn((1, args.channels) + tuple(args.shape), generator=generator).to(device)


def our_grid(args):
    return [window_starts(size, args.patch, args.overlap) for size in args.shape]


def monai_grid(args):
    """MONAI's window starts per axis (scan interval int(patch * (1 - overlap fraction)))."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval
    fraction = args.overlap / args.patch
    interval = _get_scan_interval(tuple(args.shape), (args.patch,) * 3, 3, (fraction,) * 3)
    slices = dense_patch_slices(tuple(args.shape), (args.patch,) * 3, interval)
    return [sorted({int(s[axis].start) for s in slices}) for axis in range(3)]


def run_method(method: str, volume: torch.Tensor, predictor, args) -> torch.Tensor:
    """One whole-volume pass of ``method``; returns the blended output (None for "bare")."""
    with torch.no_grad():
        if method == "ours":
            return sliding_window_inference(volume, predictor, patch_size=args.patch, overlap=args.overlap,
                                            batch_size=args.batch_size, sigma_scale=0.125)
        if method == "monai":
            from monai.inferers import sliding_window_inference as monai_sliding_window_inference
            return monai_sliding_window_inference(volume, (args.patch,) * 3, args.batch_size, predictor,
                                                  overlap=args.overlap / args.patch, mode="gaussian",
                                                  sigma_scale=0.125)
        starts = our_grid(args)
        corners = [(x, y, z) for x in starts[0] for y in starts[1] for z in starts[2]]
        p = args.patch
        for i in range(0, len(corners), args.batch_size):
            views = [volume[0, :, x:x + p, y:y + p, z:z + p] for x, y, z in corners[i:i + args.batch_size]]
            predictor(views[0][None] if len(views) == 1 else torch.stack(views))
        return None


def worker(args) -> int:
    """Subprocess mode: peak memory growth of one method, printed as one JSON line."""
    device = parse_device(args.device)
    configure_threads(args.threads or None)
    predictor = make_predictor(args.model, args.channels, device)
    before = peak_rss_bytes()
    with keep_freed_memory(keeps_freed_memory(args, device)):
        volume = make_volume(args, device)
        run_method(args.worker, volume, predictor, args)
    print(json.dumps({"method": args.worker, "peak_rss_growth_bytes": peak_rss_bytes() - before}))
    return 0


def measure_memory(args, device: torch.device) -> dict:
    """{method: peak bytes above the baseline} (fresh subprocesses on CPU, CUDA allocator peaks on GPU)."""
    peaks = {}
    if device.type == "cuda":
        predictor = make_predictor(args.model, args.channels, device)
        for method in METHODS:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            volume = make_volume(args, device)
            output = run_method(method, volume, predictor, args)
            synchronize(device)
            peaks[method] = torch.cuda.max_memory_allocated(device) - base
            del volume, output
        return peaks
    script = str(Path(__file__).resolve())
    common_args = ["--shape", *map(str, args.shape), "--patch", str(args.patch), "--overlap", str(args.overlap),
                   "--batch-size", str(args.batch_size), "--channels", str(args.channels), "--model", args.model,
                   "--threads", str(args.threads), "--device", args.device]
    if args.release_freed_memory:
        common_args.append("--release-freed-memory")
    for method in METHODS:
        peaks[method] = run_json_subprocess([script, "--worker", method, *common_args])["peak_rss_growth_bytes"]
    return peaks


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 256], metavar=("X", "Y", "Z"))
    parser.add_argument("--channels", type=int, default=2, help="input channels of the volume")
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--overlap", type=int, default=32, help="voxels (MONAI gets overlap / patch)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per predictor call")
    parser.add_argument("--model", choices=["tiny", "unet"], default="tiny")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (median reported)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--release-freed-memory", action="store_true",
                        help="CPU: leave glibc's malloc at its defaults instead of keeping freed memory for "
                             "reuse, as vmat-infer does on the CPU")
    parser.add_argument("--worker", choices=METHODS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if any(size < args.patch for size in args.shape):
        parser.error(f"--shape {args.shape} must be at least --patch {args.patch} on every axis")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    try:
        import monai  # noqa: F401
    except ImportError:
        raise SystemExit("MONAI is not installed (benchmark only): pip install monai")
    device, info = start_benchmark(args.device, args.threads)
    predictor = make_predictor(args.model, args.channels, device)
    volume = make_volume(args, device)

    ours_starts, monai_starts = our_grid(args), monai_grid(args)
    n_ours = len(ours_starts[0]) * len(ours_starts[1]) * len(ours_starts[2])
    n_monai = len(monai_starts[0]) * len(monai_starts[1]) * len(monai_starts[2])
    print(f"window starts per axis, ours:  {ours_starts} ({n_ours} windows)")
    print(f"window starts per axis, MONAI: {monai_starts} ({n_monai} windows)")

    ours_out = run_method("ours", volume, predictor, args)  # also the warm-up of every method below
    monai_out = run_method("monai", volume, predictor, args)
    difference = (ours_out - monai_out).abs()
    agreement = {"max_abs_diff": difference.max().item(), "mean_abs_diff": difference.mean().item(),
                 "output_abs_max": ours_out.abs().max().item()}
    del ours_out, monai_out, difference
    print(f"ours vs MONAI: max |diff| {agreement['max_abs_diff']:.3g}, mean |diff| {agreement['mean_abs_diff']:.3g} "
          f"(output max |value| {agreement['output_abs_max']:.3g})")

    calls = {method: (lambda m=method: run_method(m, volume, predictor, args)) for method in METHODS}
    with keep_freed_memory(keeps_freed_memory(args, device)) as info["freed_memory_kept"]:
        print(f"freed host memory kept for reuse (as in vmat-infer on the CPU): {info['freed_memory_kept']}")
        times = time_interleaved(calls, device, repeats=args.repeats, warmup=1)
        free = free_predictor(args, device)
        own_calls = {method: (lambda m=method: run_method(m, volume, free, args)) for method in ("ours", "monai")}
        own_times = time_interleaved(own_calls, device, repeats=max(5, 2 * args.repeats), warmup=1)
    stats = {method: summarize_times(times[method]) for method in METHODS}
    own_cost = {method: statistics.median(own_times[method]) for method in own_times}
    peaks = {} if args.no_memory else measure_memory(args, device)
    voxels = int(torch.tensor(args.shape).prod())
    # The budget counts a float32 output sum (1 output channel) and a weight sum, as windowing code
    # usually keeps them (MONAI does); ours keeps only the output sum (normalised weights).
    accumulator_bytes = 4 * voxels * (1 + 1)
    rows = []
    for method in METHODS:
        row = {"method": method, "windows": n_monai if method == "monai" else n_ours,
               "median_s": stats[method]["median_s"], "min_s": stats[method]["min_s"], "max_s": stats[method]["max_s"],
               "time_vs_ours": stats[method]["median_s"] / stats["ours"]["median_s"],
               "overhead_vs_bare_percent": 100.0 * (stats[method]["median_s"] / stats["bare"]["median_s"] - 1.0),
               "own_cost_s": own_cost.get(method, 0.0),
               "own_cost_vs_bare_percent": 100.0 * own_cost.get(method, 0.0) / stats["bare"]["median_s"],
               "peak_mb": peaks[method] / 2 ** 20 if method in peaks else None}
        rows.append(row)
    budget = (peaks["bare"] + accumulator_bytes) if peaks else None
    info["load_average_1min_end"] = load_average()
    title = (f"sliding window, volume {args.channels} x {' x '.join(map(str, args.shape))}, patch {args.patch}, "
             f"overlap {args.overlap}, batch {args.batch_size}, predictor {args.model}")
    print_table(title, rows, [("method", "method", "{}"), ("windows", "windows", "{}"), ("median_s", "median s", "{:.2f}"),
                              ("min_s", "min s", "{:.2f}"), ("time_vs_ours", "time / ours", "{:.2f}"),
                              ("overhead_vs_bare_percent", "overhead vs bare %", "{:+.1f}"),
                              ("own_cost_s", "own cost s", "{:.3f}"),
                              ("own_cost_vs_bare_percent", "own cost %", "{:.1f}"),
                              ("peak_mb", "peak MB", "{:.0f}")])
    if budget is not None:
        print(f"memory budget (bare peak + float32 accumulators {accumulator_bytes / 2 ** 20:.0f} MB): "
              f"{budget / 2 ** 20:.0f} MB; ours {'within' if peaks['ours'] <= budget else 'OVER'} budget")
    print(f"load average at the end: {info['load_average_1min_end']}")
    write_json(args.json, {"benchmark": "sliding_window", "machine": info,
                           "settings": settings_of(args, "worker"),
                           "grid": {"ours": ours_starts, "monai": monai_starts},
                           "agreement": agreement, "accumulator_bytes": accumulator_bytes,
                           "memory_budget_bytes": budget, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
