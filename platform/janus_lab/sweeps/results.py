"""A sweep's results table (CSV and Markdown) and heatmaps of one metric over the grid.

Rows are trials in grid order; columns are the grid keys, then the metrics. The heatmap puts
the first grid key on the rows and the second on the columns; further keys (a third, e.g.
temperature) get one panel per value combination.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from janus_lab.sweeps.grid import cell_label, short_key


@dataclass
class ResultsTable:
    """One row per trial: its grid values, its final metrics, its status and MLflow run."""

    params: list[str]
    """Grid keys, in grid order."""
    metrics: list[str]
    """Metric columns; the first is the one the sweep ranks by."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    """Per trial: every param and metric key (a missing metric is None), `status`, `run_id`."""
    seeds: list[str] = field(default_factory=list)
    """Set on an `aggregated()` table: the seed keys its rows average over."""

    def aggregated(self) -> "ResultsTable":
        """One row per cell of the keys that are not seeds (keys whose last part ends in `seed`:
        `train.seed`, `masking.seed`, `data.shuffle_seed`, ...):
        each metric's mean over the seeds, its sample standard deviation (`<metric>_std`) and
        the number of seeds that reported it (`<metric>_n`). Without seed keys, the table itself."""
        seeds = [p for p in self.params if p.rsplit(".", 1)[-1].endswith("seed")]
        if not seeds:
            return self
        keep = [p for p in self.params if p not in seeds]
        groups: dict[tuple, list[dict]] = {}
        for row in self.rows:
            groups.setdefault(tuple(row[p] for p in keep), []).append(row)
        table = ResultsTable(params=self.params, metrics=self.metrics, seeds=seeds)
        for values, rows in groups.items():
            out: dict[str, Any] = dict(zip(keep, values))
            out.update({key: ",".join(str(r[key]) for r in rows) for key in seeds})
            for metric in self.metrics:
                reported = [r[metric] for r in rows if r.get(metric) is not None]
                out[metric] = statistics.fmean(reported) if reported else None
                out[f"{metric}_std"] = statistics.stdev(reported) if len(reported) > 1 else None
                out[f"{metric}_n"] = len(reported)
            statuses = sorted({r["status"] for r in rows})
            out.update(status="/".join(statuses), run_id=" ".join(r["run_id"] for r in rows if r["run_id"]))
            table.rows.append(out)
        return table

    def add(self, cell: dict[str, Any], metrics: dict[str, Any], status: str, run_id: str | None) -> None:
        """Adds a trial's row; metrics the trial did not report are left empty."""
        row = dict(cell)
        row.update({name: _number(metrics.get(name)) for name in self.metrics})
        row.update(status=status, run_id=run_id or "")
        self.rows.append(row)

    def best(self, metric: str, mode: Literal["min", "max"]) -> dict[str, Any] | None:
        """The row with the best value of `metric`, or None when no trial reported it."""
        scored = [row for row in self.rows if row.get(metric) is not None]
        if not scored:
            return None
        pick = min if mode == "min" else max
        return pick(scored, key=lambda row: row[metric])

    def to_csv(self) -> str:
        """Full precision, dotted keys as headers: for scripts and spreadsheets."""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=[*self.params, *self.metrics, "status", "run_id"],
                                lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({key: "" if value is None else value for key, value in row.items()})
        return out.getvalue()

    def to_markdown(self, best: dict[str, Any] | None = None) -> str:
        """A Markdown table (what the driver prints); the best row, if given, is marked with *."""
        shown = [f"{m} (mean ± sd)" if self.seeds else m for m in self.metrics]
        header = [short_key(p) for p in self.params] + shown + ["status", "MLflow run"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows:
            cells = [str(row[p]) for p in self.params]
            cells += [_spread_cell_text(row, m) if self.seeds else _cell_text(row.get(m)) for m in self.metrics]
            mark = " *" if best is not None and row is best else ""
            cells += [row["status"] + mark, row["run_id"]]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def save_heatmap(self, path: str | Path, metric: str, mode: Literal["min", "max"], note: str = "") -> Path:
        """Draws `metric` over the grid as a PNG; the best cell is outlined.

        Args:
            path: the PNG file.
            metric: a column of the table.
            mode: min or max, for the title and the colour direction (better is brighter).
            note: a line added under the title (e.g. that scores come from a random test CLIP).
        """
        import matplotlib

        matplotlib.use("Agg")  # no display: sweeps run on cluster nodes
        import matplotlib.pyplot as plt

        rows_key = self.params[0]
        cols_key = self.params[1] if len(self.params) > 1 else None
        panel_keys = self.params[2:]
        row_values = _distinct(self.rows, rows_key)
        col_values = _distinct(self.rows, cols_key) if cols_key else [None]
        panels = list(itertools.product(*(_distinct(self.rows, k) for k in panel_keys))) or [()]
        best = self.best(metric, mode)
        figure, axes = plt.subplots(1, len(panels), squeeze=False,
                                    figsize=(1.2 + 1.3 * len(col_values) * len(panels), 1.4 + 0.7 * len(row_values)))
        colours = "viridis_r" if mode == "min" else "viridis"
        values = [row[metric] for row in self.rows if row.get(metric) is not None]
        low, high = (min(values), max(values)) if values else (0.0, 1.0)
        for axis, panel in zip(axes[0], panels):
            fixed = dict(zip(panel_keys, panel))
            grid = [[math.nan] * len(col_values) for _ in row_values]
            for row in self.rows:
                if any(row[k] != v for k, v in fixed.items()):
                    continue
                i, j = row_values.index(row[rows_key]), col_values.index(row[cols_key]) if cols_key else 0
                grid[i][j] = math.nan if row.get(metric) is None else row[metric]
                if row is best:
                    axis.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
                axis.text(j, i, _cell_text(row.get(metric)), ha="center", va="center", fontsize=8, color="white",
                          bbox={"facecolor": "black", "alpha": 0.35, "pad": 1, "linewidth": 0})
            axis.imshow(grid, cmap=colours, vmin=low, vmax=high if high > low else low + 1e-9, aspect="auto")
            axis.set_yticks(range(len(row_values)), [str(v) for v in row_values])
            axis.set_ylabel(short_key(rows_key))
            axis.set_xticks(range(len(col_values)), [str(v) for v in col_values] if cols_key else [""])
            if cols_key:
                axis.set_xlabel(short_key(cols_key))
            if fixed:
                axis.set_title(cell_label(fixed), fontsize=9)
        direction = "lower" if mode == "min" else "higher"
        figure.suptitle(f"{metric} ({direction} is better; best outlined)" + (f"\n{note}" if note else ""), fontsize=10)
        figure.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path


def _distinct(rows: list[dict], key: str) -> list:
    seen = []
    for row in rows:
        if row[key] not in seen:
            seen.append(row[key])
    return seen


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _cell_text(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _spread_cell_text(row: dict[str, Any], metric: str) -> str:
    if row.get(metric) is None:
        return ""
    spread = row.get(f"{metric}_std")
    return f"{row[metric]:.4g} ± {spread:.2g} (n={row[f'{metric}_n']})" if spread is not None \
        else f"{row[metric]:.4g} (n={row[f'{metric}_n']})"
