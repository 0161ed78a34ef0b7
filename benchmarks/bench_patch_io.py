"""Patch read time: memory-mapped case store vs. compressed .npz.

Builds one synthetic case of ``--shape`` (default 512 x 512 x 256, 8 structures: ct + 8 SDF +
dose = 10 channels, 2.7 GB of float32) written straight to disk with ``open_memmap``, stores
it both as a store case folder (``vmat_diffusion.store``) and as a compressed ``.npz``, then
times reading one random ``--patch``^3 patch of all channels:

* store, cold: right after ``posix_fadvise(DONTNEED)`` on the store files (their pages dropped
  from the OS page cache where the OS honours it), every patch at a new random position;
* store, warm: the same positions again (pages cached);
* store, warm, into preallocated arrays (no fresh memory to fault in);
* the training path: ``PatchSampler`` cutting the same patches from the store case (tensors),
  with 1 and 2 read threads;
* in-RAM floor: the same strided copy from arrays already in memory;
* npz: ``np.load`` + indexing, which decompresses every channel (``--npz-repeats`` times).

Usage::

    python benchmarks/bench_patch_io.py                      # full size (needs ~5 GB of disk, minutes)
    python benchmarks/bench_patch_io.py --shape 256 256 128 --patch 64 --json out.json

The temporary files are deleted at the end unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, proc_kb_field_bytes  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vmat_diffusion.patches import PatchSampler  # noqa: E402
from vmat_diffusion.store import open_store_case  # noqa: E402

N_STRUCTURES = 8


def smooth_field(shape, x0: int, x1: int, seed: int) -> np.ndarray:
    """Rows x0:x1 of a smooth random field (sum of random plane waves) plus faint noise, float32."""
    rng = np.random.default_rng(seed)
    x = np.arange(x0, x1, dtype=np.float32)[:, None, None]
    y = np.arange(shape[1], dtype=np.float32)[None, :, None]
    z = np.arange(shape[2], dtype=np.float32)[None, None, :]
    field = np.zeros((x1 - x0, shape[1], shape[2]), dtype=np.float32)
    for _ in range(3):
        k = rng.uniform(0.01, 0.08, size=3).astype(np.float32)
        phase = np.float32(rng.uniform(0, 2 * np.pi))
        field += np.sin(k[0] * x + k[1] * y + k[2] * z + phase)
    noise = np.random.default_rng(seed * 1000 + x0).standard_normal(field.shape, dtype=np.float32)
    field += np.float32(0.01) * noise
    return field


def write_synthetic_store_case(folder: Path, shape, seed: int = 0, rows_per_chunk: int = 16) -> None:
    """A store case folder (ct, dose, masks_sdf, constraints, metadata) filled chunk by chunk."""
    folder.mkdir(parents=True)
    fmt = np.lib.format
    ct = fmt.open_memmap(folder / "ct.npy", mode="w+", dtype=np.float32, shape=tuple(shape))
    dose = fmt.open_memmap(folder / "dose.npy", mode="w+", dtype=np.float32, shape=tuple(shape))
    sdf = fmt.open_memmap(folder / "masks_sdf.npy", mode="w+", dtype=np.float32,
                          shape=(N_STRUCTURES,) + tuple(shape))
    for x0 in range(0, shape[0], rows_per_chunk):
        x1 = min(x0 + rows_per_chunk, shape[0])
        ct[x0:x1] = 0.5 + 0.15 * smooth_field(shape, x0, x1, seed)
        dose[x0:x1] = np.clip(35.0 + 15.0 * smooth_field(shape, x0, x1, seed + 1), 0.0, None)
        for s in range(N_STRUCTURES):
            sdf[s, x0:x1] = np.clip(0.4 * smooth_field(shape, x0, x1, seed + 2 + s), -1.0, 1.0)
    for array in (ct, dose, sdf):
        array.flush()
    del ct, dose, sdf
    np.save(folder / "constraints.npy", np.zeros(13, dtype=np.float32))
    metadata = {"case_id": "bench", "structures": [f"S{i}" for i in range(N_STRUCTURES)],
                "spacing_mm": [1.0, 1.0, 2.0], "rx_dose_gy": 70.0}
    (folder / "metadata.json").write_text(json.dumps(metadata))


def write_npz_from_store(folder: Path, npz_path: Path) -> None:
    """The same case as one compressed .npz (streamed from the memmaps)."""
    case = open_store_case(folder)
    np.savez_compressed(npz_path, ct=case.ct, dose=case.dose, masks_sdf=case.masks_sdf,
                        constraints=case.constraints, metadata=np.array(json.dumps(case.metadata)))


def page_cache_bytes() -> int:
    """The OS page cache size ("Cached" of /proc/meminfo) in bytes; -1 where unavailable."""
    cached = proc_kb_field_bytes("/proc/meminfo", "Cached")
    return -1 if cached is None else cached


def drop_from_page_cache(folder: Path) -> bool:
    """Ask the OS to evict the (clean) cached pages of every file in ``folder``; False if unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def random_corners(shape, patch: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    return [tuple(int(rng.integers(0, s - patch + 1)) for s in shape) for _ in range(n)]


def read_store_patch(case, corner, patch: int):
    """All channels of one patch, copied into RAM: ct (p,p,p), masks_sdf (S,p,p,p), dose (p,p,p)."""
    window = tuple(slice(c, c + patch) for c in corner)
    return (np.array(case.ct[window]), np.array(case.masks_sdf[(slice(None),) + window]),
            np.array(case.dose[window]))


def read_store_patch_into(case, corner, patch: int, buffers):
    """Like ``read_store_patch`` but into preallocated arrays (no new memory to fault in)."""
    window = tuple(slice(c, c + patch) for c in corner)
    np.copyto(buffers[0], case.ct[window])
    np.copyto(buffers[1], case.masks_sdf[(slice(None),) + window])
    np.copyto(buffers[2], case.dose[window])


def in_ram_floor(shape, patch: int, n: int, seed: int):
    """Times of copying the same-shaped patch out of an in-RAM array with the same strides.

    One (patch, Y, Z) float32 slab stands in for each of the 10 channels, so the copy has the
    strides of the full case without holding 2.7 GB in RAM.
    """
    slab = np.random.default_rng(seed).random((patch,) + tuple(shape[1:]), dtype=np.float32)
    corners = random_corners((patch,) + tuple(shape[1:]), patch, n, seed)
    times = []
    for corner in corners:
        window = tuple(slice(c, c + patch) for c in corner)
        start = time.perf_counter()
        for _ in range(N_STRUCTURES + 2):
            np.array(slab[window])
        times.append(time.perf_counter() - start)
    return times


def read_npz_patch(npz_path: Path, corner, patch: int):
    window = tuple(slice(c, c + patch) for c in corner)
    with np.load(npz_path, allow_pickle=False) as archive:
        return (archive["ct"][window].copy(), archive["masks_sdf"][(slice(None),) + window].copy(),
                archive["dose"][window].copy())


def time_calls(fn, args_list):
    times = []
    for args in args_list:
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return times


def summarize(name, times):
    return {"method": name, "n": len(times), "median_ms": 1e3 * statistics.median(times),
            "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times)}


def check_disk(workdir: Path, shape) -> int:
    case_bytes = 4 * (N_STRUCTURES + 2) * int(np.prod(shape))
    free = shutil.disk_usage(workdir).free
    if free < 2.2 * case_bytes:
        raise SystemExit(f"not enough disk in {workdir}: {free / 1e9:.1f} GB free, need about "
                         f"{2.2 * case_bytes / 1e9:.1f} GB (use --workdir or a smaller --shape)")
    return case_bytes


def run(args) -> dict:
    shape = tuple(args.shape)
    if any(s < args.patch for s in shape):
        raise SystemExit(f"--patch {args.patch} is larger than --shape {shape}")
    workdir = Path(tempfile.mkdtemp(prefix="bench_patch_io_", dir=args.workdir))
    try:
        case_bytes = check_disk(workdir, shape)
        store_case_dir, npz_path = workdir / "store_case", workdir / "case.npz"
        t0 = time.perf_counter()
        write_synthetic_store_case(store_case_dir, shape, seed=args.seed)
        t_store = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_npz_from_store(store_case_dir, npz_path)
        t_npz = time.perf_counter() - t0
        print(f"case {shape} x {N_STRUCTURES + 2} channels: {case_bytes / 1e9:.2f} GB float32; "
              f"store written in {t_store:.1f} s, npz ({npz_path.stat().st_size / 1e9:.2f} GB) in {t_npz:.1f} s",
              flush=True)

        case = open_store_case(store_case_dir)
        corners = random_corners(shape, args.patch, args.reads, args.seed + 1)
        cached_before = page_cache_bytes()
        dropped = drop_from_page_cache(store_case_dir)
        cached_after = page_cache_bytes()
        cold = time_calls(lambda c: read_store_patch(case, c, args.patch), [(c,) for c in corners])
        warm = time_calls(lambda c: read_store_patch(case, c, args.patch), [(c,) for c in corners])
        p = args.patch
        buffers = (np.empty((p, p, p), np.float32), np.empty((N_STRUCTURES, p, p, p), np.float32),
                   np.empty((p, p, p), np.float32))
        warm_into = time_calls(lambda c: read_store_patch_into(case, c, p, buffers), [(c,) for c in corners])
        centers = [tuple(c + p // 2 for c in corner) for corner in corners]
        via_sampler = {}
        for threads in (1, 2):   # the training path: PatchSampler cutting tensors out of the store case
            sampler = PatchSampler(patch_size=p, patches_per_volume=1, read_threads=threads)
            via_sampler[threads] = time_calls(lambda c: sampler._extract(case, c, False), [(c,) for c in centers])
        floor = in_ram_floor(shape, p, args.reads, args.seed + 2)
        npz = time_calls(lambda c: read_npz_patch(npz_path, c, args.patch),
                         [(c,) for c in corners[:args.npz_repeats]])
        expect = read_store_patch(case, corners[0], p)
        got = read_npz_patch(npz_path, corners[0], p)
        if not all(np.array_equal(a, b) for a, b in zip(expect, got)):
            raise RuntimeError("store and npz patches differ")

        rows = [summarize("store (memmap), warm", warm),
                summarize("store (memmap), cold" + ("" if dropped else " (page cache not dropped)"), cold),
                summarize("store (memmap), warm, into preallocated", warm_into),
                summarize("PatchSampler, warm, read_threads=1", via_sampler[1]),
                summarize("PatchSampler, warm, read_threads=2", via_sampler[2]),
                summarize("in-RAM numpy copy, same strides (floor)", floor),
                summarize("npz (np.load + index)", npz)]
        npz_median = rows[-1]["median_ms"]
        for row in rows:
            row["speedup_vs_npz"] = npz_median / row["median_ms"]
        return {"shape": list(shape), "channels": N_STRUCTURES + 2, "patch": p, "case_gb": case_bytes / 1e9,
                "npz_gb": npz_path.stat().st_size / 1e9, "store_write_s": t_store, "npz_write_s": t_npz,
                "page_cache_dropped": dropped, "page_cache_freed_gb": (cached_before - cached_after) / 1e9,
                "rows": rows, "machine": machine_info(torch.device("cpu"))}
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def print_table(result: dict) -> None:
    print(f"\none {result['patch']}^3 patch of {result['channels']} channels from a "
          f"{' x '.join(map(str, result['shape']))} case ({result['case_gb']:.2f} GB)")
    print(f"page cache freed before the cold reads: {result['page_cache_freed_gb']:.2f} GB")
    print(f"{'method':<40} {'n':>4} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'x vs npz':>9}")
    for row in result["rows"]:
        print(f"{row['method']:<40} {row['n']:>4} {row['median_ms']:>10.1f} {row['min_ms']:>9.1f} "
              f"{row['max_ms']:>9.1f} {row['speedup_vs_npz']:>9.0f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 256], metavar=("X", "Y", "Z"))
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--reads", type=int, default=30, help="patches read from the store (cold, then warm)")
    parser.add_argument("--npz-repeats", type=int, default=3, help="patches read from the npz")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="folder for the temporary files (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary files")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    result = run(args)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
