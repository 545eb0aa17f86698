"""Ingest speed: records/s of the miniature world's ingest with one VQ encoder actor against two.

    .venv/bin/python benchmarks/ingest.py                    # 600 records, ~2 min on 2 idle cores
    .venv/bin/python benchmarks/ingest.py --records 3000     # the demo's world size

Writes `--records` miniature-world records (a third text-to-image, the rest edits; the ShareGPT-4o-
Image layout, `jobs/sample_data.py --world mini`) to a temporary folder, starts a local Ray
cluster (`ray.init(address="local", num_cpus=4)`, as the local stack), and ingests them with
`jobs/configs/ingest_mini.yaml` into local Parquet shards twice, timed end to end by
`run_ingest` (actor start, PNG reads, VQ encoding, shard writes):

- **baseline**: `ray.num_encoder_actors=1`, what the mini ingest config shipped before;
- **ours**: `ray.num_encoder_actors=2`, what it ships now (one actor per core).

VQ encoding a 64 px image is ~30 ms on one core (the Janus VQ encoder at base 64 channels),
so it is most of the ingest; one actor computes in one thread. A work item (`ray.records_per_task`
records) goes whole to one actor, so the items must be small enough to spread over both.
Both runs must produce the same rows and codes: the script compares them and fails if they differ.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from data_stream import RAY_CPUS, log, start_ray


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=600, help="miniature-world records to write and ingest")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world's records")
    parser.add_argument("--records-per-task", type=int, default=None,
                        help="records per work item, both runs (default: the config's, 100)")
    args = parser.parse_args(argv)
    if args.records < 300:
        parser.error("--records must be at least 300 (256 of them are held out for validation)")
    return args


def ingest(source: Path, out: Path, actors: int, records_per_task: int | None):
    from janus_lab.config import load_config
    from janus_lab.data import run_ingest
    from janus_lab.data.config import IngestConfig

    cfg = load_config(IngestConfig, "jobs/configs/ingest_mini.yaml",
                      [f"source.path={source}", f"output.uri={out}", "output.overwrite=true",
                       f"ray.num_encoder_actors={actors}"]
                      + ([f"ray.records_per_task={records_per_task}"] if records_per_task else []))
    return run_ingest(cfg)


def rows_by_id(uri: str) -> dict:
    """Every row of a dataset (both splits) by record id: its task and its codes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from janus_lab.data.schema import REJECTS_NAME

    shards = sorted(p for p in Path(uri).glob("*.parquet") if p.name != REJECTS_NAME)
    table = pa.concat_tables(pq.read_table(p) for p in shards)
    ids = table.column("id").to_pylist()
    keep = ["task", "output_codes", "input_codes"]
    columns = {name: table.column(name).to_pylist() for name in keep}
    return {record: tuple(columns[name][i] for name in keep) for i, record in enumerate(ids)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    from janus_lab.miniature.world import training_records, write_world_dataset

    with tempfile.TemporaryDirectory(prefix="janus-bench-ingest-") as tmp:
        work = Path(tmp)
        t2i = args.records // 3
        write_world_dataset(work / "source", training_records(args.seed, t2i, args.records - t2i), "sharegpt4o")
        log(f"wrote {args.records} miniature records ({t2i} text-to-image) to {work / 'source'}")
        start_ray()
        timings, contents = {}, {}
        for label, actors in (("baseline: 1 encoder actor", 1), ("ours: 2 encoder actors", 2)):
            out = work / f"shards-{actors}"
            start = time.perf_counter()
            result = ingest(work / "source", out, actors, args.records_per_task)
            timings[label] = time.perf_counter() - start
            contents[label] = rows_by_id(str(out))
            log(f"{label}: {result.manifest.rows} rows in {timings[label]:.1f} s")
        ray.shutdown()
    first, second = contents.values()
    if first != second:
        raise SystemExit("the two ingests wrote different rows or codes")
    print(f"\nminiature world, {args.records} records, 64 px, local Ray ({RAY_CPUS} logical CPUs); same rows "
          f"and codes in both")
    print("| ingest | seconds | records/s |")
    print("|---|---|---|")
    for label, seconds in timings.items():
        print(f"| {label} | {seconds:.1f} | {args.records / seconds:.1f} |")
    base, ours = timings.values()
    print(f"| ratio ours / baseline (records/s) | | {base / ours:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
