"""A small dataset in the ingested shard layout, made directly (no images, no ingest job).

Training tests use it so they depend only on the shard schema, not on the ingest pipeline.
Codes are drawn from a small set of patterns so that a few steps visibly lower the loss.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from janus_lab.data.schema import DatasetManifest

SCHEMA = pa.schema([
    ("id", pa.string()), ("task", pa.string()), ("prompt", pa.string()),
    ("output_codes", pa.list_(pa.int16())), ("input_codes", pa.list_(pa.list_(pa.int16()))),
    ("input_pixels", pa.list_(pa.binary())), ("source", pa.string()), ("split", pa.string()),
])
COLOURS = ["red", "green", "blue", "yellow"]


def _png(side: int, colour: int) -> bytes:
    rgb = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 30)][colour]
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def write_synthetic_dataset(root: str | Path, num_t2i: int = 24, num_ti2i: int = 16, num_val: int = 8,
                            num_image_tokens: int = 16, image_side: int = 64, rows_per_shard: int = 16,
                            rows_per_row_group: int | None = None, seed: int = 0) -> Path:
    """Writes shards + `_manifest.json` under `root`; returns `root`.

    Rows go in source order, as two source files one after the other: the T2I rows (source
    `synthetic:text_to_image`), the TI2I rows (`synthetic:text_and_image_to_image`), then the
    validation rows. Row groups hold `rows_per_row_group` rows (default: a whole shard).
    """
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 16384, size=(len(COLOURS), num_image_tokens))
    rows = []
    total = num_t2i + num_ti2i + num_val
    for index in range(total):
        task = "ti2i" if num_t2i <= index < num_t2i + num_ti2i or (index >= num_t2i + num_ti2i and index % 2) else "t2i"
        split = "val" if index >= num_t2i + num_ti2i else "train"
        colour = int(rng.integers(len(COLOURS)))
        source = "synthetic:text_to_image" if task == "t2i" else "synthetic:text_and_image_to_image"
        row = {"id": f"sample-{index:04d}", "task": task, "source": source, "split": split,
               "output_codes": patterns[colour].astype(np.int16).tolist(), "input_codes": [], "input_pixels": []}
        if task == "t2i":
            row["prompt"] = f"a {COLOURS[colour]} square"
        else:
            before = int(rng.integers(len(COLOURS)))
            row["prompt"] = f"make the {COLOURS[before]} square {COLOURS[colour]}"
            count = 2 if index % 3 == 0 else 1
            row["input_codes"] = [patterns[before].astype(np.int16).tolist()] * count
            row["input_pixels"] = [_png(image_side, before)] * count
        rows.append(row)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, start in enumerate(range(0, total, rows_per_shard)):
        name = f"shard-{number:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[start:start + rows_per_shard], schema=SCHEMA), root / name,
                       compression="zstd", row_group_size=rows_per_row_group or rows_per_shard)
        shards.append(name)
    counts: dict = {}
    for row in rows:
        counts.setdefault(row["task"], {}).setdefault(row["split"], 0)
        counts[row["task"]][row["split"]] += 1
    DatasetManifest(source={"format": "synthetic", "path": None},
                    model={"preset": "debug", "image_size": image_side, "num_image_tokens": num_image_tokens,
                           "fingerprint": None},  # patterns, not a tokenizer's codes: nothing to check
                    counts=counts, rows=total, shards=shards, rejects=0, val_fraction=None, seed=seed,
                    val_count=num_val).write(str(root))
    return root
