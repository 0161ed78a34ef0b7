"""``vmat-make-phantoms``: write synthetic prostate cases (the demo data) as case files."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..phantom import _check_spacing, write_phantoms


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmat-make-phantoms",
        description="Write N synthetic prostate cases (CT, 8 structures, a 70 Gy arc-model dose) "
                    "as OUT_DIR/<prefix>_000.npz, ...; phantom i uses seed SEED + i.")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the .npz case files into")
    parser.add_argument("--n", type=int, default=10, help="number of phantoms (default 10)")
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64], metavar=("X", "Y", "Z"),
                        help="voxels per axis, each >= 16 (default 96 96 64)")
    parser.add_argument("--spacing", nargs=3, default=[4.0, 4.0, 4.0], metavar=("SX", "SY", "SZ"),
                        help="voxel spacing in mm (default 4 4 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first phantom (default 0)")
    parser.add_argument("--prefix", default="phantom", help="file and case-id prefix (default 'phantom')")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.spacing = _check_spacing(args.spacing, name="argument --spacing")
    except ValueError as e:
        parser.error(str(e))
    try:
        paths = write_phantoms(args.out_dir, args.n, shape=tuple(args.shape), spacing_mm=tuple(args.spacing),
                               seed=args.seed, prefix=args.prefix, progress=not args.quiet and sys.stderr.isatty())
    except (ValueError, TypeError) as e:
        print(f"vmat-make-phantoms: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"vmat-make-phantoms: error: cannot write into {args.out_dir}: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"wrote {len(paths)} phantoms to {args.out_dir} ({paths[0].name} .. {paths[-1].name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
