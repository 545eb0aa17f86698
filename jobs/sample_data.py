"""Write a procedural dataset in the real layouts: the sample world, or the miniature world.

    python jobs/sample_data.py --out data/sample
    python jobs/sample_data.py --out /tmp/echo --layout echo4o --seed 1
    python jobs/sample_data.py --world mini --out data/mini-world --t2i 2000 --edits 3000
    python jobs/sample_data.py --world mini --out data/mini-compose --layout echo4o --edits 600 --only compose
    python jobs/sample_data.py --world mini --eval-requests data/mini-eval

`sample` (default): 48 text-to-image and 32 editing records (every fourth with two input
images), in the exact ShareGPT-4o-Image layout by default; the same seed writes
byte-identical files. `mini`: the miniature world at 64 px (`janus_lab.miniature.world`):
text-to-image records and edits spread evenly over background, recolour, move, add, remove and
two-input composition, none showing a held-out scene. `--eval-requests` writes the held-out
records as a `jobs/generate.py requests=` file with their scoring targets beside it.
"""

from __future__ import annotations

import argparse
import sys

from janus_lab.data.sample import LAYOUTS, write_sample_dataset


def write_mini(args: argparse.Namespace) -> str:
    from janus_lab.miniature.world import EDIT_KINDS, training_records, write_eval_requests, write_world_dataset

    if args.eval_requests:
        path = write_eval_requests(args.eval_requests, samples=args.samples)
        return f"wrote the held-out requests to {path} (targets beside it)"
    edits = args.only or EDIT_KINDS
    records = training_records(args.seed, args.t2i, args.edits, edits=edits)
    write_world_dataset(args.out, records, args.layout, overwrite=args.overwrite)
    t2i = sum(r.task == "t2i" for r in records)
    return f"wrote {len(records)} miniature records ({t2i} t2i, {len(records) - t2i} edits) in the " \
           f"{args.layout} layout to {args.out}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", choices=("sample", "mini"), default="sample", help="which world (default: sample)")
    parser.add_argument("--out", default="data/sample", help="local folder to write (default: data/sample)")
    parser.add_argument("--layout", choices=LAYOUTS, default="sharegpt4o", help="source layout (default: sharegpt4o)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace the folder if it is not empty")
    parser.add_argument("--t2i", type=int, default=2000, help="mini: text-to-image records (default: 2000)")
    parser.add_argument("--edits", type=int, default=3000, help="mini: editing records (default: 3000)")
    parser.add_argument("--only", nargs="+", metavar="EDIT", help="mini: only these edit kinds")
    parser.add_argument("--eval-requests", metavar="FOLDER", help="mini: write the held-out requests file instead")
    parser.add_argument("--samples", type=int, default=1, help="mini --eval-requests: images per request")
    args = parser.parse_args(argv)
    try:
        if args.world == "mini":
            print(write_mini(args))
            return 0
        records = write_sample_dataset(args.out, args.layout, seed=args.seed, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    t2i = sum(r.task == "t2i" for r in records)
    print(f"wrote {len(records)} records ({t2i} t2i, {len(records) - t2i} ti2i) in the {args.layout} layout "
          f"to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
