"""Full-volume diffusion sampling: ``predict_full_volume`` synchronous vs per-window, and batch size.

A small ``SimpleUNet3D`` (``--base``, ``--levels``; zero-initialised output layer given small
random weights so the samples are not trivial) samples a ``--shape`` volume with windows of
``--patch`` overlapping by ``--overlap`` voxels and ``--steps`` DDIM steps, in both modes
("synchronous": one DDIM step on the whole volume per step, window noise predictions blended;
"per_window": a full DDIM run per window, final windows blended) and with ``--batch-sizes``
windows per model call. All configurations are timed interleaved in the same run. A wrapper
counts the model calls and the windows they evaluated; both modes should evaluate
windows x steps windows.

Also reported: for the synchronous mode, the largest and the mean difference between the batch
sizes' samples (deterministic DDIM, seeded generator: only float rounding differs, but an
untrained model's first DDIM steps divide by sqrt(alpha_bar) ~ 0.01-0.1 and the x0 clipping
switches, so single voxels can move by 1e-3-1e-2 while the mean stays ~1e-7).

Usage::

    python benchmarks/bench_diffusion_predict.py                  # CPU defaults, a few minutes
    python benchmarks/bench_diffusion_predict.py --shape 64 64 48 --steps 5 --json diffusion.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (load_average, print_table, start_benchmark,  # noqa: E402  (before torch)
                    settings_of, summarize_times, time_interleaved, write_json)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from vmat_diffusion.schedule import NoiseSchedule  # noqa: E402
from vmat_diffusion.sliding_window import PREDICT_MODES, predict_full_volume, window_starts  # noqa: E402
from vmat_diffusion.unet import SimpleUNet3D  # noqa: E402

CONDITION_CHANNELS = 9  # CT + 8 structure SDFs
CONSTRAINT_DIM = 13


class CountingModel(nn.Module):
    """Wraps a noise predictor and counts its calls and the windows it evaluated."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.calls = 0
        self.windows = 0

    def forward(self, x, t, constraints):
        self.calls += 1
        self.windows += x.shape[0]
        return self.model(x, t, constraints)


def make_model(args, device: torch.device) -> CountingModel:
    torch.manual_seed(0)
    model = SimpleUNet3D(in_channels=1 + CONDITION_CHANNELS, base_channels=args.base, levels=args.levels,
                         constraint_dim=CONSTRAINT_DIM)
    nn.init.normal_(model.backbone.output.weight, std=0.1)
    return CountingModel(model).to(device).eval()


def make_inputs(args, device: torch.device):
    generator = torch.Generator().manual_seed(1)
    condition = torch.randn((1, CONDITION_CHANNELS) + tuple(args.shape), generator=generator).to(device)
    constraints = torch.randn(1, CONSTRAINT_DIM, generator=generator).to(device)
    return condition, constraints


def sample(model, condition, constraints, schedule, args, mode: str, batch_size: int) -> torch.Tensor:
    generator = torch.Generator(device=condition.device).manual_seed(2)
    return predict_full_volume(model, condition, constraints, schedule, patch_size=args.patch, overlap=args.overlap,
                               ddim_steps=args.steps, mode=mode, batch_size=batch_size, generator=generator)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64], metavar=("X", "Y", "Z"))
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--overlap", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="DDIM steps")
    parser.add_argument("--base", type=int, default=8, help="SimpleUNet3D base_channels")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", choices=PREDICT_MODES, default=list(PREDICT_MODES))
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (median reported)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, info = start_benchmark(args.device, args.threads)
    model = make_model(args, device)
    condition, constraints = make_inputs(args, device)
    schedule = NoiseSchedule().to(device)
    n_windows = 1
    for size in args.shape:
        n_windows *= len(window_starts(size, args.patch, args.overlap))
    print(f"volume {' x '.join(map(str, args.shape))}, patch {args.patch}, overlap {args.overlap}: {n_windows} windows "
          f"x {args.steps} DDIM steps = {n_windows * args.steps} window evaluations per sample")

    configs = [(mode, batch_size) for mode in args.modes for batch_size in args.batch_sizes]
    counts, samples = {}, {}
    for mode, batch_size in configs:  # one untimed run each: counts, results, warm-up
        model.calls = model.windows = 0
        samples[(mode, batch_size)] = sample(model, condition, constraints, schedule, args, mode, batch_size)
        counts[(mode, batch_size)] = (model.calls, model.windows)
    calls = {f"{mode}/{batch_size}": (lambda m=mode, b=batch_size: sample(model, condition, constraints, schedule,
                                                                          args, m, b))
             for mode, batch_size in configs}
    times = time_interleaved(calls, device, repeats=args.repeats, warmup=0)

    rows = []
    for mode, batch_size in configs:
        stats = summarize_times(times[f"{mode}/{batch_size}"])
        model_calls, windows = counts[(mode, batch_size)]
        rows.append({"mode": mode, "batch_size": batch_size, "model_calls": model_calls, "windows_evaluated": windows,
                     "median_s": stats["median_s"], "min_s": stats["min_s"], "max_s": stats["max_s"],
                     "ms_per_window": 1e3 * stats["median_s"] / windows})
    for row in rows:
        same_mode_b1 = next((r for r in rows if r["mode"] == row["mode"] and r["batch_size"] == min(args.batch_sizes)))
        row["speedup_vs_smallest_batch"] = same_mode_b1["median_s"] / row["median_s"]
        sync = next((r for r in rows if r["mode"] == "synchronous" and r["batch_size"] == row["batch_size"]), None)
        row["time_vs_synchronous"] = row["median_s"] / sync["median_s"] if sync else None
    sync_samples = [samples[("synchronous", b)] for b in args.batch_sizes if ("synchronous", b) in samples]
    batch_size_max_diff = max(((s - sync_samples[0]).abs().max().item() for s in sync_samples[1:]), default=None)
    batch_size_mean_diff = max(((s - sync_samples[0]).abs().mean().item() for s in sync_samples[1:]), default=None)
    info["load_average_1min_end"] = load_average()
    print_table(f"predict_full_volume, SimpleUNet3D(base {args.base}, levels {args.levels}), {args.steps} DDIM steps",
                rows, [("mode", "mode", "{}"), ("batch_size", "batch", "{}"), ("model_calls", "model calls", "{}"),
                       ("windows_evaluated", "windows evaluated", "{}"), ("median_s", "median s", "{:.2f}"),
                       ("min_s", "min s", "{:.2f}"), ("ms_per_window", "ms / window", "{:.1f}"),
                       ("speedup_vs_smallest_batch", "x vs batch 1", "{:.2f}"),
                       ("time_vs_synchronous", "time / synchronous", "{:.2f}")])
    if batch_size_max_diff is not None:
        print(f"synchronous samples, difference between batch sizes: max {batch_size_max_diff:.3g}, "
              f"mean {batch_size_mean_diff:.3g}")
    print(f"load average at the end: {info['load_average_1min_end']}")
    write_json(args.json, {"benchmark": "diffusion_predict", "machine": info,
                           "settings": settings_of(args),
                           "windows": n_windows, "synchronous_batch_size_max_diff": batch_size_max_diff,
                           "synchronous_batch_size_mean_diff": batch_size_mean_diff, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
