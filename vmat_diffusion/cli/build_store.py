"""``vmat-build-store DATA_DIR [STORE_DIR]``: convert case files to a memory-mapped case store.

STORE_DIR defaults to DATA_DIR/.vmat_store (where ``store.open_cases`` looks by default).
Converting again is cheap: cases whose source file is unchanged (size and mtime) are skipped.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..case import CaseFormatError, find_cases
from ..fileio import non_folder_on_path
from ..store import DEFAULT_CACHE_NAME, DEFAULT_THRESHOLDS, build_store, centers_filename


def _threshold(text: str) -> float:
    """argparse type of ``--thresholds``: one dose threshold (fraction of Rx) that the store accepts."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers (fractions of Rx), got {text!r}") from None
    try:
        centers_filename(value)  # the store's rule for a threshold
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmat-build-store",
        description="Convert the .npz case files of DATA_DIR into a store of uncompressed, memory-mapped "
                    "arrays so training reads a patch without decompressing the whole case.")
    parser.add_argument("data_dir", help="folder of .npz case files")
    parser.add_argument("store_dir", nargs="?", default=None,
                        help=f"store folder (default: DATA_DIR/{DEFAULT_CACHE_NAME})")
    parser.add_argument("--thresholds", type=_threshold, nargs="+", default=list(DEFAULT_THRESHOLDS),
                        help="dose thresholds (fraction of Rx) whose dose-biased patch centres are "
                             "precomputed (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="convert every case again")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        print(f"error: DATA_DIR {data_dir} is not a folder", file=sys.stderr)
        return 2
    if not find_cases(data_dir):
        print(f"error: no .npz case files in {data_dir}", file=sys.stderr)
        return 2
    store_dir = Path(args.store_dir) if args.store_dir else data_dir / DEFAULT_CACHE_NAME
    blocking = non_folder_on_path(store_dir)
    if blocking is not None:
        print(f"error: STORE_DIR: {blocking} exists and is not a folder", file=sys.stderr)
        return 2
    try:
        report = build_store(data_dir, store_dir, thresholds=args.thresholds, force=args.force,
                             progress=not args.quiet and sys.stderr.isatty())
    except (CaseFormatError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
