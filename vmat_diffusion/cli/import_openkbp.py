"""``vmat-import-openkbp SRC DST [--force]``: convert OpenKBP patient folders to case files.

The split folders under SRC are kept: SRC/train-pats/pt_2/ -> DST/train-pats/pt_2.npz.
Exits 1 when any patient failed (each failure is printed with the file and line at fault).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..fileio import non_folder_on_path
from ..openkbp import find_openkbp_patients, import_openkbp


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmat-import-openkbp",
        description="Convert OpenKBP patient folders (pt_*/ with sparse CSVs) to vmat_diffusion case "
                    "files (.npz), keeping the split folders (SRC/train-pats/pt_2 -> DST/train-pats/pt_2.npz).")
    parser.add_argument("src", help="OpenKBP folder (e.g. provided-data, or one split such as train-pats)")
    parser.add_argument("dst", help="output folder for the case files")
    parser.add_argument("--force", action="store_true", help="re-convert patients whose case file exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        n_found = len(find_openkbp_patients(args.src))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if n_found == 0:
        print(f"error: no OpenKBP patient folders (pt_*/ with ct.csv) under {args.src}", file=sys.stderr)
        return 2
    blocking = non_folder_on_path(args.dst)
    if blocking is not None:
        print(f"error: DST: {blocking} exists and is not a folder (the case files go into {args.dst})",
              file=sys.stderr)
        return 2
    progress = not args.quiet and sys.stderr.isatty()
    report = import_openkbp(args.src, args.dst, force=args.force, progress=progress)
    print(f"{n_found} patients under {args.src} -> {args.dst}: {report.summary()}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
