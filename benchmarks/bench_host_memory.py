"""CPU training steps and inference windows with freed host memory kept for reuse vs glibc's defaults.

glibc hands every allocation above 32 MB a fresh ``mmap`` and unmaps it on ``free``, so a CPU
training step (or a large inference window) faults its big activations into memory again,
page by page, every time. ``vmat_diffusion.host_memory.keep_freed_memory`` (used by
``vmat-train`` and ``vmat-infer`` on the CPU) keeps them in the heap instead. Here both settings
are timed in the same process, alternating round by round (A, B, A, B, ...; each timed call
follows one untimed call under the same setting, so the heap has settled), per case:

* ``train``: one training step (forward, MSE, backward, AdamW) of ``--model`` at ``--patch``;
* ``infer``: one no-grad forward pass of a ``--window``^3 window (sliding-window inference).

Reported: median wall time per call, minor page faults and system CPU time per call, and the
ratio kept / default. Linux with glibc only (elsewhere there is nothing to compare).

Usage::

    python benchmarks/bench_host_memory.py                      # base 48, train patch 64, infer 128
    python benchmarks/bench_host_memory.py --cases train --patch 96 --repeats 2
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, settings_of, start_benchmark, write_json  # noqa: E402  (before torch)

import torch  # noqa: E402

from bench_train_step import StepRunner, randomize_zero_layers  # noqa: E402
from vmat_diffusion.host_memory import set_freed_memory_kept  # noqa: E402
from vmat_diffusion.unet import BaselineUNet3D, SimpleUNet3D  # noqa: E402

SETTINGS = ("glibc default", "freed memory kept")


def measure(call) -> dict:
    """Wall s, minor page faults and system CPU s of one call."""
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    call()
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"s": wall, "faults": after.ru_minflt - before.ru_minflt, "sys_s": after.ru_stime - before.ru_stime}


def compare(call, repeats: int) -> dict:
    """setting -> list of measurements, the two settings alternating round by round."""
    results = {name: [] for name in SETTINGS}
    for _ in range(repeats):
        for name in SETTINGS:
            set_freed_memory_kept(name == SETTINGS[1])
            call()  # settle: the heap grows (kept) or the previous setting's blocks are reused once
            results[name].append(measure(call))
    set_freed_memory_kept(False)
    return results


def make_model(kind: str, base: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = BaselineUNet3D(base_channels=base) if kind == "baseline" else SimpleUNet3D(base_channels=base)
    randomize_zero_layers(model)
    return model


def bench_case(args, case: str, device) -> dict:
    model = make_model(args.model, args.base)
    if case == "train":
        runner = StepRunner(args.model, model, args.patch, 1, device, None, False)
        call, size = runner.step, args.patch
    else:
        model.eval()
        channels = 9 if args.model == "baseline" else 10
        x = torch.randn(1, channels, args.window, args.window, args.window)
        constraints = torch.zeros(1, 13)
        t = torch.tensor([500])

        @torch.no_grad()
        def call():
            return model(x, constraints) if args.model == "baseline" else model(x, t, constraints)
        size = args.window
    results = compare(call, args.repeats)
    medians = {name: {key: statistics.median(m[key] for m in results[name]) for key in ("s", "faults", "sys_s")}
               for name in SETTINGS}
    return {"case": case, "model": type(model).__name__, "base": args.base, "size": size,
            "default_s": medians[SETTINGS[0]]["s"], "kept_s": medians[SETTINGS[1]]["s"],
            "ratio": medians[SETTINGS[1]]["s"] / medians[SETTINGS[0]]["s"],
            "default_faults": medians[SETTINGS[0]]["faults"], "kept_faults": medians[SETTINGS[1]]["faults"],
            "default_sys_s": medians[SETTINGS[0]]["sys_s"], "kept_sys_s": medians[SETTINGS[1]]["sys_s"],
            "rounds": results}


COLUMNS = [("case", "case", "{}"), ("model", "model", "{}"), ("base", "base", "{}"), ("size", "size", "{}"),
           ("default_s", "default s", "{:.2f}"), ("kept_s", "kept s", "{:.2f}"), ("ratio", "kept / default", "{:.2f}"),
           ("default_faults", "faults default", "{:,.0f}"), ("kept_faults", "faults kept", "{:,.0f}"),
           ("default_sys_s", "sys s default", "{:.2f}"), ("kept_sys_s", "sys s kept", "{:.2f}")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=["train", "infer"], default=["train", "infer"])
    parser.add_argument("--model", choices=["baseline", "simple"], default="baseline")
    parser.add_argument("--base", type=int, default=48, help="base_channels (48: the models' default)")
    parser.add_argument("--patch", type=int, default=64, help="training patch size")
    parser.add_argument("--window", type=int, default=128, help="inference window size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="rounds per setting (median reported)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device, info = start_benchmark("cpu", args.threads)
    if not set_freed_memory_kept(False):
        print("not glibc: nothing to compare")
        return 0
    rows = [bench_case(args, case, device) for case in args.cases]
    print_table("freed host memory kept vs glibc defaults (median per call)", rows, COLUMNS)
    write_json(args.json, {"benchmark": "host_memory", "machine": info,
                           "settings": settings_of(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
