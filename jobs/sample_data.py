"""Write the procedural sample dataset (coloured shapes, descriptions and edit instructions).

    python jobs/sample_data.py --out data/sample
    python jobs/sample_data.py --out /tmp/echo --layout echo4o --seed 1

48 text-to-image and 32 editing records (every fourth with two input images), in the exact
ShareGPT-4o-Image layout by default; the same seed writes byte-identical files.
"""

from __future__ import annotations

import argparse
import sys

from janus_lab.data.sample import LAYOUTS, write_sample_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/sample", help="local folder to write (default: data/sample)")
    parser.add_argument("--layout", choices=LAYOUTS, default="sharegpt4o", help="source layout (default: sharegpt4o)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace the folder if it is not empty")
    args = parser.parse_args(argv)
    try:
        records = write_sample_dataset(args.out, args.layout, seed=args.seed, overwrite=args.overwrite)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    t2i = sum(r.task == "t2i" for r in records)
    print(f"wrote {len(records)} records ({t2i} t2i, {len(records) - t2i} ti2i) in the {args.layout} layout "
          f"to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
