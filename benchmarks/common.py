"""Shared helpers of the benchmarks: timing, tables, JSON, machine and version info.

Timing rules used by every benchmark (machines are noisy, especially shared CPUs):

* warm-up calls first (allocator, oneDNN/cuDNN kernel selection, lazy init), not timed;
* alternatives are timed **interleaved** (A, B, C, A, B, C, ...; ``time_interleaved``) so a
  change of machine load hits all of them alike, and compared as ratios of medians;
* the median (not the mean) of the repeats is reported, with min and max;
* the 1-minute load average is recorded before and after each benchmark (``os.getloadavg``).

OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``, set here before torch loads
OpenMP, unless already set): on a shared, oversubscribed CPU the default busy-waiting made
2-thread training steps 2-3x slower in wall time than 1 thread (measured on the 2-core dev
machine at load average ~4), which is contention, not the code being measured. Import this
module before torch.

Run the benchmarks from the repository root (``python benchmarks/bench_x.py``); each puts its own
folder first on ``sys.path``, so ``import common`` finds this file.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Dict, List, Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def parse_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> torch.device; SystemExit if CUDA is asked for but absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def configure_threads(threads: Optional[int]) -> int:
    """Set torch's intra-op thread count (None keeps torch's default); returns the count in use."""
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def start_benchmark(device_name: str, threads: int) -> tuple:
    """(device, machine info) after setting the torch threads (0: torch's default); prints the
    machine summary line every benchmark starts with."""
    device = parse_device(device_name)
    configure_threads(threads or None)
    info = machine_info(device)
    print(machine_summary(info))
    return device, info


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so a wall-clock time covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, repeats: int = 5,
                     warmup: int = 1) -> Dict[str, List[float]]:
    """Time several alternatives round-robin: ``warmup`` untimed rounds, then ``repeats`` timed ones.

    Returns {name: [seconds per call, one per round]}. Interleaving makes a slow phase of the
    machine (another process starting) fall on all alternatives instead of one.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_once(fn, device))
    return times


def summarize_times(times: Sequence[float]) -> dict:
    """{median_s, min_s, max_s, n} of a list of seconds."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> Optional[str]:
    """Installed version of a distribution, None if absent."""
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # PackageNotFoundError and broken metadata alike
        return None


def machine_info(device: torch.device) -> dict:
    """Machine, versions and settings to store next to every result."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "monai": package_version("monai"),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "device": str(device),
        "load_average_1min": load_average(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def machine_summary(info: dict) -> str:
    """One line for the top of a benchmark's output: CPU, threads, device, versions, load."""
    monai = f", monai {info['monai']}" if info.get("monai") else ""
    return (f"{info['cpu']} ({info['cpu_count']} CPUs, {info['torch_threads']} torch threads), "
            f"device {info['device']}, torch {info['torch']}{monai}, load average {info['load_average_1min']}")


def format_row(values: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))


def print_table(title: str, rows: List[dict], columns: Sequence[tuple]) -> None:
    """Print ``rows`` as a plain-text table.

    columns: (key, header, format) triples, e.g. ("median_ms", "median ms", "{:.1f}"); a missing
    or None value prints as "-".
    """
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([("-" if row.get(key) is None else fmt.format(row[key])) for key, _, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    print(f"\n{title}")
    print(format_row(cells[0], widths))
    print(format_row(["-" * w for w in widths], widths))
    for line in cells[1:]:
        print(format_row(line, widths))


def keeps_freed_memory(args, device: torch.device) -> bool:
    """Whether a run keeps freed host memory (``vmat_diffusion.keep_freed_memory``), as vmat-train
    and vmat-infer do on the CPU: on the CPU unless ``--release-freed-memory`` was given."""
    return device.type == "cpu" and not args.release_freed_memory


def settings_of(args, *leave_out: str) -> dict:
    """The command-line settings of a run, for its JSON (without --json and ``leave_out``)."""
    return {key: value for key, value in vars(args).items() if key not in ("json",) + leave_out}


def write_json(path: Optional[str], payload: dict, quiet: bool = False) -> None:
    """Write ``payload`` as indented JSON to ``path`` (nothing when path is None), atomically:
    a run stopped by ``timeout`` mid-write leaves the previous file, never half of one."""
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        os.replace(partial, path)
        if not quiet:
            print(f"wrote {path}")


def proc_kb_field_bytes(path: str, field: str) -> Optional[int]:
    """A "Field:  N kB" line of a Linux /proc file (e.g. /proc/meminfo "Cached") in bytes; None
    where the file or field is missing."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far, in bytes.

    Linux: VmHWM of /proc/self/status, which starts afresh in a new program (ru_maxrss does
    not: it is inherited from the parent across fork + exec, so a child of a big benchmark
    process would report the parent's peak). Elsewhere: ru_maxrss.
    """
    high_water = proc_kb_field_bytes("/proc/self/status", "VmHWM")
    if high_water is not None:
        return high_water
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def run_json_subprocess(argv: Sequence[str], timeout_s: float = 1800.0) -> dict:
    """Run ``python argv...`` in a fresh interpreter and parse the last stdout line as JSON.

    Used for peak-memory measurements: ru_maxrss is a high-water mark of the whole process,
    so each method gets a process of its own.
    """
    completed = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout_s)
    if completed.returncode != 0:
        raise RuntimeError(f"subprocess {' '.join(argv)} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])
