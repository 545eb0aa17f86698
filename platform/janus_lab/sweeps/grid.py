"""A sweep's grid: every combination of the listed values, in a fixed order, with stable names.

A cell is one combination, `{"masking.t2i_text_drop": 0.1, "masking.ti2i_image_drop": 0.5}`.
Its label (`t2i_text_drop=0.1 ti2i_image_drop=0.5`) names its MLflow child run and its table
row; its slug (`t2i_text_drop0.1-ti2i_image_drop0.5`) names folders and Ray Train runs.
"""

from __future__ import annotations

import itertools
import re
from typing import Any, Mapping

Cell = dict[str, Any]


def grid_cells(grid: Mapping[str, list[Any]]) -> list[Cell]:
    """Every combination of the grid's values; the last key varies fastest."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def short_key(key: str) -> str:
    """`masking.t2i_text_drop` -> `t2i_text_drop` (the last part names the value well enough)."""
    return key.rsplit(".", 1)[-1]


def cell_label(cell: Mapping[str, Any]) -> str:
    """`t2i_text_drop=0.1 ti2i_image_drop=0.5`."""
    return " ".join(f"{short_key(key)}={value}" for key, value in cell.items())


def cell_slug(cell: Mapping[str, Any]) -> str:
    """`t2i_text_drop0.1-ti2i_image_drop0.5`: safe in paths, S3 keys and Ray run names."""
    text = "-".join(f"{short_key(key)}{value}" for key, value in cell.items())
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)
