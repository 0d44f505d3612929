"""Per-pair registration report: key metric, aggregation (identity vs registered), JSON/CSV files, printed table.

MONAI's ``MetricsSaver`` writes metrics that follow its ``Cumulative`` contract (tensors per class); registration
records mix per-structure dicts, deformation statistics and timings, and the report must include the identity
baseline, so they are aggregated here.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence

import numpy as np
from ignite.engine import Engine, Events
from ignite.metrics import Metric

from .files import atomic_write_json, atomic_write_text, logger

__all__ = ["PairRecordMean", "RegistrationReport", "format_table", "summarize"]


class PairRecordMean(Metric):
    """Mean over pairs of one scalar field of the evaluator's ``records`` (the key metric for checkpoints)."""

    def __init__(self, field: str = "registered_mean_dice") -> None:
        self.field = field
        # ignite expects (y_pred, y) when the output is a mapping; this metric reads the records list instead.
        super().__init__(output_transform=lambda output: output["records"])

    def reset(self) -> None:
        self._values: list[float] = []

    def update(self, records: list[dict]) -> None:
        self._values += [r[self.field] for r in records if self.field in r and not math.isnan(r[self.field])]

    def compute(self) -> float:
        return float(np.mean(self._values)) if self._values else float("nan")


def _nanmean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def summarize(records: Sequence[dict], quantile: float = 0.3) -> dict:
    """Aggregate per-pair records: means over pairs, DSC30 (``quantile`` of pair mean Dice), per-structure Dice."""
    summary: dict = {"pairs": len(records), "scored_pairs": sum("registered_mean_dice" in r for r in records)}
    for method in ("identity", "registered"):
        dices = [r[f"{method}_mean_dice"] for r in records if f"{method}_mean_dice" in r]
        if dices:
            summary[f"{method}_mean_dice"] = _nanmean(dices)
            summary[f"{method}_std_dice"] = float(np.nanstd(dices))
            summary[f"{method}_dsc30"] = float(np.nanquantile(dices, quantile))
            per_label: dict[str, list[float]] = {}
            for r in records:
                for label, value in r.get(f"{method}_dice", {}).items():
                    per_label.setdefault(label, []).append(value)
            summary[f"{method}_dice_per_label"] = {
                k: _nanmean(v) for k, v in sorted(per_label.items(), key=lambda kv: int(kv[0]))
            }
        hd = [r[f"{method}_mean_hd95"] for r in records if f"{method}_mean_hd95" in r]
        if hd:
            summary[f"{method}_mean_hd95"] = _nanmean(hd)
    for field in ("folding_fraction", "std_log_jacobian", "sdlogj_learn2reg", "seconds"):
        summary[f"registered_{field}"] = _nanmean([r[field] for r in records])
    return summary


def format_table(summary: dict) -> str:
    """Plain-text comparison of identity and registration."""

    def cell(key: str, scale: float = 1.0, digits: int = 3) -> str:
        value = summary.get(key)
        return (
            "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value * scale:.{digits}f}"
        )

    rows = [
        ("method", "mean Dice", "DSC30", "HD95", "folded %", "std log|J|", "SDlogJ(L2R)", "s/pair"),
        (
            "identity",
            cell("identity_mean_dice"),
            cell("identity_dsc30"),
            cell("identity_mean_hd95", digits=2),
            "0.000",
            "0.000",
            "0.000",
            "-",
        ),
        (
            "registered",
            cell("registered_mean_dice"),
            cell("registered_dsc30"),
            cell("registered_mean_hd95", digits=2),
            cell("registered_folding_fraction", 100.0),
            cell("registered_std_log_jacobian"),
            cell("registered_sdlogj_learn2reg"),
            cell("registered_seconds", digits=4),
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths)) for row in rows]
    return f"{summary['pairs']} held-out pairs\n" + "\n".join(lines)


def _records_csv(records: Sequence[dict]) -> str:
    scalar_fields = [k for k in records[0] if not isinstance(records[0][k], dict)]
    label_fields = []
    for method in ("identity", "registered"):
        for metric in ("dice", "hd95"):
            labels = sorted({label for r in records for label in r.get(f"{method}_{metric}", {})}, key=int)
            label_fields += [(f"{method}_{metric}", label) for label in labels]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(scalar_fields + [f"{group}_{label}" for group, label in label_fields])
    for r in records:
        writer.writerow(
            [r.get(k) for k in scalar_fields] + [r.get(group, {}).get(label, "") for group, label in label_fields]
        )
    return buffer.getvalue()


class RegistrationReport:
    """Collects the evaluator's per-pair ``records``; at epoch end writes ``{name}.json`` (summary + pairs) and
    ``{name}.csv`` (one row per pair) atomically into ``output_dir``, logs the identity-vs-registered table, and puts
    the summary's scalars into ``engine.state.metrics`` for the stats/TensorBoard handlers.
    """

    def __init__(self, output_dir: str | None, name: str = "metrics", quantile: float = 0.3) -> None:
        self.output_dir, self.name, self.quantile = output_dir, name, quantile
        self.records: list[dict] = []
        self.summary: dict = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._finish)

    def _reset(self, engine: Engine) -> None:
        self.records = []

    def _collect(self, engine: Engine) -> None:
        self.records += engine.state.output["records"]

    def _finish(self, engine: Engine) -> None:
        if not self.records:
            raise RuntimeError("no held-out pair was evaluated; check the datalist's validation/test section")
        self.summary = summarize(self.records, self.quantile)
        for key, value in self.summary.items():
            if isinstance(value, float):
                engine.state.metrics[key] = value
        scored = f"{self.summary['scored_pairs']} of {self.summary['pairs']} pairs scored by Dice (both labels present)"
        logger.info("registration report (epoch %d): %s\n%s", engine.state.epoch, scored, format_table(self.summary))
        if self.output_dir:
            base = os.path.join(self.output_dir, self.name)
            atomic_write_json(base + ".json", {"summary": self.summary, "pairs": self.records})
            atomic_write_text(base + ".csv", _records_csv(self.records))
