"""Training-step throughput: our U-Nets vs MONAI's DiffusionModelUNet, and vs the matmul ceiling.

One full training step = forward, MSE loss, backward, AdamW step, on random patches of
``--patch``^3 voxels with batch ``--batch``, in fp32 and under bf16 autocast. For every
(patch, batch, precision) the models are timed interleaved (round-robin) in the same run,
together with a square matmul of ``--matmul-size`` in the same dtype, the machine's own
"ceiling" for dense FLOP/s measured under the same load. Reported per model:

* patch-voxels per second (batch x patch^3 / median step time) and the ratio to MONAI;
* model FLOPs of forward + backward (counted once with ``torch.utils.flop_counter``:
  convolutions and matmuls only, the optimizer and elementwise ops count 0), achieved
  FLOP/s (FLOPs / step time) and that as % of the matmul FLOP/s;
* with ``--profile``: one extra step under ``torch.profiler``, split into the time of the
  FLOP-counted kernels (convolutions forward/backward and matmuls) and everything else
  (normalisation, activations, resampling, concatenation, optimizer); "kernel GFLOP/s" is the
  FLOPs over the kernels' own time, i.e. the % of the ceiling the step would reach if
  everything else took no time.

MONAI (benchmark only, not a dependency; ``pip install monai einops``):
``DiffusionModelUNet(spatial_dims=3, in_channels=10, out_channels=1, num_res_blocks=1,
channels=--monai-channels, attention_levels=(False,)*4, norm_num_groups=8)`` whose middle
block's self-attention (always built by MONAI) is replaced by an identity unless
``--monai-mid-attention``; default channels (b, 2b, 4b, 4b) for ``--base`` b, which gives about
the parameter count of our ``SimpleUNet3D(base_channels=b)`` (printed).

On the CPU the run keeps freed host memory for reuse, as ``vmat-train`` does there
(``vmat_diffusion.host_memory``); ``--release-freed-memory`` leaves glibc's defaults.

All-zero output layers (ours and MONAI's are zero-initialised) get small random weights first:
otherwise every upstream gradient is exactly 0 on the first steps and tiny (denormal) after,
which is not a training-time state and makes AdamW's arithmetic unrepresentatively slow.

Usage::

    python benchmarks/bench_train_step.py                          # CPU defaults, a few minutes
    python benchmarks/bench_train_step.py --patch 32 64 --precision fp32 --json train.json
    python benchmarks/bench_train_step.py --device cuda --patch 64 96 --batch 1 2 --base 32
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (keeps_freed_memory, load_average, print_table, start_benchmark,  # noqa: E402  (before torch)
                    settings_of, summarize_times, time_interleaved, write_json)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from vmat_diffusion.host_memory import keep_freed_memory  # noqa: E402
from vmat_diffusion.unet import BaselineUNet3D, SimpleUNet3D  # noqa: E402

CONSTRAINT_DIM = 13
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def monai_unet(channels, mid_attention: bool) -> nn.Module:
    """MONAI's DiffusionModelUNet configured like our SimpleUNet3D (10 inputs, 1 output, no attention)."""
    from monai.networks.nets import DiffusionModelUNet
    model = DiffusionModelUNet(spatial_dims=3, in_channels=10, out_channels=1, num_res_blocks=1,
                               channels=tuple(channels), attention_levels=(False,) * len(channels),
                               norm_num_groups=8)
    if not mid_attention:
        model.middle_block.attention = nn.Identity()
    return model


def randomize_zero_layers(model: nn.Module, seed: int = 0) -> None:
    """Give all-zero weight tensors (zero-initialised output convs) small random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2 and not parameter.any():
                parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))


class StepRunner:
    """One model, its AdamW and fixed random inputs: ``step()`` runs one training step."""

    def __init__(self, name: str, model: nn.Module, patch: int, batch: int, device: torch.device,
                 autocast_dtype, channels_last: bool):
        torch.manual_seed(0)
        self.name, self.model = name, model.to(device).train()
        self.device, self.autocast_dtype = device, autocast_dtype
        self.kind = "baseline" if isinstance(model, BaselineUNet3D) else ("simple" if isinstance(model, SimpleUNet3D)
                                                                         else "monai")
        in_channels = 9 if self.kind == "baseline" else 10
        shape = (batch, in_channels, patch, patch, patch)
        self.x = torch.randn(shape, device=device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
            self.x = self.x.contiguous(memory_format=torch.channels_last_3d)
        self.t = torch.randint(0, 1000, (batch,), device=device)
        self.constraints = torch.randn(batch, CONSTRAINT_DIM, device=device)
        self.target = torch.randn(batch, 1, patch, patch, patch, device=device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def forward(self) -> torch.Tensor:
        if self.kind == "baseline":
            return self.model(self.x, self.constraints)
        if self.kind == "simple":
            return self.model(self.x, self.t, self.constraints)
        return self.model(self.x, self.t)

    def loss(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            prediction = self.forward()
        return F.mse_loss(prediction.float(), self.target)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        self.optimizer.step()

    def count_flops(self) -> int:
        """Model FLOPs of one forward + backward (fp32, no optimizer step)."""
        with FlopCounterMode(display=False) as counter:
            self.loss().backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()


class MatmulCeiling:
    """``repeats`` square n x n matmuls in ``dtype``: the dense FLOP/s this machine reaches now."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, repeats: int = 4):
        generator = torch.Generator(device="cpu").manual_seed(0)
        self.a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
        self.b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
        self.repeats = repeats
        self.flops = 2 * n ** 3 * repeats

    def step(self) -> None:
        for _ in range(self.repeats):
            torch.mm(self.a, self.b)


FLOP_OPS = ("conv", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear")


def kernel_seconds(runner) -> tuple:
    """(seconds in FLOP-counted kernels, seconds of the whole step) of one profiled step."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        runner.step()
        total = time.perf_counter() - start
    kernels = sum(e.self_cpu_time_total for e in prof.key_averages()
                  if any(key in e.key for key in FLOP_OPS)) / 1e6
    return kernels, total


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_models(args) -> dict:
    """name -> freshly initialised model (same seed for every configuration)."""
    torch.manual_seed(0)
    models = {}
    if "simple" in args.models:
        models["SimpleUNet3D"] = SimpleUNet3D(base_channels=args.base, levels=args.levels)
    if "baseline" in args.models:
        models["BaselineUNet3D"] = BaselineUNet3D(base_channels=args.base, levels=args.levels)
    if "monai" in args.models:
        models["MONAI DiffusionModelUNet"] = monai_unet(args.monai_channels, args.monai_mid_attention)
    for model in models.values():
        randomize_zero_layers(model)
    if args.compile:
        for name in [n for n in models if not n.startswith("MONAI")]:
            models[name] = torch.compile(models[name])
    return models


def bench_configuration(args, device, patch: int, batch: int, precision: str) -> list:
    """Rows (one per model) for one (patch, batch, precision), all timed in the same rounds."""
    dtype = PRECISIONS[precision]
    runners = {}
    for name, model in build_models(args).items():
        channels_last = args.monai_channels_last if name.startswith("MONAI") else False
        runners[name] = StepRunner(name, model, patch, batch, device, dtype, channels_last)
    flops = {name: runner.count_flops() for name, runner in runners.items()}
    ceiling = MatmulCeiling(args.matmul_size, dtype or torch.float32, device)
    calls = {name: runner.step for name, runner in runners.items()}
    calls["matmul"] = ceiling.step
    times = time_interleaved(calls, device, repeats=args.repeats, warmup=args.warmup)
    matmul_flops_per_s = ceiling.flops / summarize_times(times["matmul"])["median_s"]
    monai_voxels_per_s = None
    rows = []
    for name, runner in runners.items():
        stats = summarize_times(times[name])
        voxels_per_s = batch * patch ** 3 / stats["median_s"]
        if name.startswith("MONAI"):
            monai_voxels_per_s = voxels_per_s
        rows.append({"model": name, "patch": patch, "batch": batch, "precision": precision,
                     "params_m": n_params(runner.model) / 1e6, "gflop_per_step": flops[name] / 1e9,
                     "median_s": stats["median_s"], "min_s": stats["min_s"], "max_s": stats["max_s"],
                     "voxels_per_s": voxels_per_s, "achieved_gflops": flops[name] / stats["median_s"] / 1e9,
                     "matmul_gflops": matmul_flops_per_s / 1e9,
                     "percent_of_matmul": 100.0 * flops[name] / stats["median_s"] / matmul_flops_per_s})
    for row in rows:
        row["voxels_per_s_vs_monai"] = row["voxels_per_s"] / monai_voxels_per_s if monai_voxels_per_s else None
        if args.profile and device.type == "cpu":
            kernels, total = kernel_seconds(runners[row["model"]])
            row["kernel_share_percent"] = 100.0 * kernels / total
            row["kernel_gflops"] = flops[row["model"]] / kernels / 1e9
            row["kernel_percent_of_matmul"] = 100.0 * row["kernel_gflops"] * 1e9 / matmul_flops_per_s
    return rows


COLUMNS = [("model", "model", "{}"), ("patch", "patch", "{}"), ("batch", "B", "{}"),
           ("precision", "prec", "{}"), ("params_m", "params M", "{:.2f}"), ("gflop_per_step", "GFLOP/step", "{:.1f}"),
           ("median_s", "step s", "{:.3f}"), ("voxels_per_s", "voxels/s", "{:,.0f}"),
           ("voxels_per_s_vs_monai", "x MONAI", "{:.2f}"), ("achieved_gflops", "GFLOP/s", "{:.1f}"),
           ("matmul_gflops", "matmul GFLOP/s", "{:.1f}"), ("percent_of_matmul", "% matmul", "{:.0f}")]
PROFILE_COLUMNS = [("kernel_share_percent", "% time in kernels", "{:.0f}"),
                   ("kernel_gflops", "kernel GFLOP/s", "{:.1f}"),
                   ("kernel_percent_of_matmul", "kernel % matmul", "{:.0f}")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--patch", type=int, nargs="+", default=[64])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--precision", nargs="+", choices=sorted(PRECISIONS), default=["fp32", "bf16"])
    parser.add_argument("--base", type=int, default=16, help="our base_channels")
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--models", nargs="+", choices=["simple", "baseline", "monai"],
                        default=["simple", "baseline", "monai"])
    parser.add_argument("--monai-channels", type=int, nargs="+", default=None,
                        help="MONAI channels per level (default: b, 2b, 4b, 4b, ... for --base b)")
    parser.add_argument("--monai-mid-attention", action="store_true",
                        help="keep the self-attention MONAI builds into its middle block")
    parser.add_argument("--monai-channels-last", action="store_true",
                        help="also give MONAI channels_last_3d weights and inputs (ours converts itself)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our models (not MONAI's)")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--profile", action="store_true",
                        help="CPU: also profile one step per model (time in conv/matmul kernels vs the rest)")
    parser.add_argument("--release-freed-memory", action="store_true",
                        help="CPU: leave glibc's malloc at its defaults (freed activations go back to the OS "
                             "and are faulted in again every step) instead of keeping them, as vmat-train does")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.monai_channels is None:
        widths = [args.base * 2 ** i for i in range(args.levels)]
        args.monai_channels = widths[:-1] + [widths[-2]] if args.levels > 1 else widths
    if len(args.monai_channels) != args.levels:
        parser.error(f"--monai-channels needs {args.levels} values (one per level)")
    if "monai" in args.models:
        try:
            import monai  # noqa: F401
        except ImportError:
            parser.error("MONAI is not installed: pip install monai einops, or leave it out with --models")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, info = start_benchmark(args.device, args.threads)
    if device.type == "cuda":
        # PyTorch lets fp32 convolutions use TF32 by default but not fp32 matmuls: the fp32
        # ceiling must be the same arithmetic as the models' convolutions (the switch is global:
        # the models' few matmuls, FiLM linears and MONAI's, use TF32 too)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
        info["tf32"] = {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
        print(f"fp32 on the GPU: TF32 {'on' if torch.backends.cudnn.allow_tf32 else 'off'} for convolutions and "
              f"the matmul ceiling alike")
    rows = []
    columns = COLUMNS + (PROFILE_COLUMNS if args.profile and device.type == "cpu" else [])
    with keep_freed_memory(keeps_freed_memory(args, device)) as info["freed_memory_kept"]:
        print(f"freed host memory kept for reuse (as in vmat-train on the CPU): {info['freed_memory_kept']}")
        for patch in args.patch:
            for batch in args.batch:
                for precision in args.precision:
                    rows += bench_configuration(args, device, patch, batch, precision)
                    print_table(f"training step, patch {patch}, batch {batch}, {precision}",
                                rows[-len(args.models):], columns)
    info["load_average_1min_end"] = load_average()
    print(f"\nload average at the end: {info['load_average_1min_end']}")
    print_table("all configurations", rows, columns)
    write_json(args.json, {"benchmark": "train_step", "machine": info,
                           "settings": settings_of(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
