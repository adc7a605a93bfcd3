"""The pipeline's report: per-variant results, the selection, and how to show them (JSON, Rich table, PNG)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from strata.core.errors import ConfigError
from strata.core.fsutil import write_bytes_atomic

REPORT_NAME = "report.json"
PLOT_NAME = "accuracy_vs_throughput.png"
SCHEMA = "strata.optimize-report/v1"


@dataclass(frozen=True)
class VariantResult:
    """Everything measured and decided about one variant."""

    id: str
    path: str | None
    profile: str
    runtime: str
    precision: str
    passes: tuple[str, ...]
    verified: bool
    accuracy: Mapping[str, float]
    latency_ms: Mapping[str, float] | None
    throughput: float | None
    speedup: float | None
    size_bytes: int | None
    peak_memory_bytes: int | None
    gate: str
    reason: str | None
    notes: tuple[str, ...] = ()
    throughput_batch1: float | None = None
    speedup_batch1: float | None = None

    def values(self) -> dict[str, float | None]:
        """The metrics a gate may name."""
        values: dict[str, float | None] = dict(self.accuracy)
        values.update(
            {
                "throughput": self.throughput,
                "speedup": self.speedup,
                "speedup_batch1": self.speedup_batch1,
                "latency_p50_ms": self.latency_ms["p50"] if self.latency_ms else None,
                "latency_p95_ms": self.latency_ms["p95"] if self.latency_ms else None,
                "size_bytes": None if self.size_bytes is None else float(self.size_bytes),
                "peak_memory_bytes": None if self.peak_memory_bytes is None else float(self.peak_memory_bytes),
            }
        )
        return values

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "profile": self.profile,
            "runtime": self.runtime,
            "precision": self.precision,
            "passes": list(self.passes),
            "verified": self.verified,
            "accuracy": dict(self.accuracy),
            "latency_ms": dict(self.latency_ms) if self.latency_ms is not None else None,
            "throughput": self.throughput,
            "speedup": self.speedup,
            "throughput_batch1": self.throughput_batch1,
            "speedup_batch1": self.speedup_batch1,
            "size_bytes": self.size_bytes,
            "peak_memory_bytes": self.peak_memory_bytes,
            "gate": self.gate,
            "reason": self.reason,
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> VariantResult:
        return cls(
            id=str(raw["id"]),
            path=raw.get("path"),
            profile=str(raw["profile"]),
            runtime=str(raw["runtime"]),
            precision=str(raw["precision"]),
            passes=tuple(raw.get("passes", ())),
            verified=bool(raw["verified"]),
            accuracy=dict(raw.get("accuracy") or {}),
            latency_ms=raw.get("latency_ms"),
            throughput=raw.get("throughput"),
            speedup=raw.get("speedup"),
            size_bytes=raw.get("size_bytes"),
            peak_memory_bytes=raw.get("peak_memory_bytes"),
            gate=str(raw["gate"]),
            reason=raw.get("reason"),
            notes=tuple(raw.get("notes", ())),
            throughput_batch1=raw.get("throughput_batch1"),
            speedup_batch1=raw.get("speedup_batch1"),
        )


@dataclass(frozen=True)
class Report:
    """`DIR/report.json`: the model, this host, every variant with its verdict, and the choice per profile."""

    model: Mapping[str, Any]
    host_profile: str
    task: str
    gate: str
    targets: tuple[str, ...]
    data: Mapping[str, Any]
    benchmark: Mapping[str, Any]
    variants: tuple[VariantResult, ...]
    selected: Mapping[str, str]
    selection_notes: Mapping[str, str]
    skipped_passes: Mapping[str, str] = field(default_factory=dict)

    def variant(self, variant_id: str) -> VariantResult:
        for variant in self.variants:
            if variant.id == variant_id:
                return variant
        raise KeyError(variant_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "model": dict(self.model),
            "host_profile": self.host_profile,
            "task": self.task,
            "gate": self.gate,
            "targets": list(self.targets),
            "data": dict(self.data),
            "benchmark": dict(self.benchmark),
            "variants": [v.to_json() for v in self.variants],
            "selected": dict(self.selected),
            "selection_notes": dict(self.selection_notes),
            "skipped_passes": dict(self.skipped_passes),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Report:
        """Raises:
        ConfigError: not a report this strata wrote.
        """
        if raw.get("schema") != SCHEMA:
            raise ConfigError(f"not a strata optimize report (schema {raw.get('schema')!r})")
        try:
            return cls(
                model=raw["model"],
                host_profile=raw["host_profile"],
                task=raw["task"],
                gate=raw["gate"],
                targets=tuple(raw["targets"]),
                data=raw["data"],
                benchmark=raw["benchmark"],
                variants=tuple(VariantResult.from_json(v) for v in raw["variants"]),
                selected=raw["selected"],
                selection_notes=raw.get("selection_notes", {}),
                skipped_passes=raw.get("skipped_passes", {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"optimize report is malformed: {exc}") from exc


def write_report(report: Report, out_dir: Path) -> Path:
    """Write `out_dir/report.json` atomically.

    Raises:
        OSError: the folder is not writable.
    """
    path = out_dir / REPORT_NAME
    write_bytes_atomic(path, (json.dumps(report.to_json(), indent=2, sort_keys=False) + "\n").encode())
    return path


def read_report(out_dir: Path) -> Report:
    """Read `out_dir/report.json`.

    Raises:
        ConfigError: missing, not JSON, or not a report.
    """
    try:
        raw = json.loads((out_dir / REPORT_NAME).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {out_dir / REPORT_NAME}: {exc}") from exc
    return Report.from_json(raw)


def headline_metrics(task: str) -> tuple[str, ...]:
    """The accuracy columns worth a glance for a task."""
    return {
        "classification": ("top1_agreement", "accuracy"),
        "embedding": ("mean_cosine", "min_cosine"),
        "regression": ("rel_error", "max_abs_error"),
    }.get(task, ())


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# The columns a narrow terminal leaves out first (report.json and --json have them all); variant, runtime and gate
# always stay. Every column but the reason keeps its cells on one line: a runtime is never cut into "onnxruntim e".
_LEAVE_OUT_FIRST = ("speedup (batch 1)", "p50 ms", "MB", "items/s", "metric 2", "selected for", "p95 ms")
_LEAVE_OUT_LAST = ("speedup", "profile", "metric 1", "reason")
_REASON_MIN = 24  # the reason wraps between words, in at least this many columns


def report_table(report: Report, width: int | None = None) -> Table:
    """A Rich table of every variant: accuracy, speed, size, verdict; selected ones marked with the profiles.

    With `width` (the terminal's), the columns that do not fit are left out, least useful first, and the caption
    names them; no cell is split mid-word."""
    chosen_by: dict[str, list[str]] = {}
    for profile, variant_id in report.selected.items():
        chosen_by.setdefault(variant_id, []).append(profile)
    metrics = headline_metrics(report.task)
    batch = report.benchmark.get("batch")
    # (key, header, cells); a header may take two lines, so that it is no wider than its numbers need
    columns: list[tuple[str, str, list[str]]] = [
        ("variant", "variant", [v.id for v in report.variants]),
        ("profile", "profile", [v.profile for v in report.variants]),
        ("runtime", "runtime", [v.runtime for v in report.variants]),
        *(
            (f"metric {i + 1}", metric, [_fmt(v.accuracy.get(metric), ".4f") for v in report.variants])
            for i, metric in enumerate(metrics)
        ),
        ("items/s", "items/s", [_fmt(v.throughput, ".1f") for v in report.variants]),
        (
            "speedup",
            f"speedup\n(batch {batch})",
            [_fmt(v.speedup, ".2f") + ("x" if v.speedup is not None else "") for v in report.variants],
        ),
        (
            "speedup (batch 1)",
            "speedup\n(batch 1)",
            [_fmt(v.speedup_batch1, ".2f") + ("x" if v.speedup_batch1 is not None else "") for v in report.variants],
        ),
        ("p50 ms", "p50\nms", [_fmt((v.latency_ms or {}).get("p50"), ".2f") for v in report.variants]),
        ("p95 ms", "p95\nms", [_fmt((v.latency_ms or {}).get("p95"), ".2f") for v in report.variants]),
        (
            "MB",
            "MB",
            [_fmt(None if v.size_bytes is None else v.size_bytes / 1e6, ".1f") for v in report.variants],
        ),
        ("gate", "gate", [_verdict(v.gate) for v in report.variants]),
        ("selected for", "selected\nfor", [", ".join(chosen_by.get(v.id, [])) for v in report.variants]),
        ("reason", "reason", [v.reason or "" for v in report.variants]),
    ]
    left_out: list[str] = []
    if width is not None:
        for key in (*_LEAVE_OUT_FIRST, *_LEAVE_OUT_LAST):
            if _table_width(columns) <= width:
                break
            header = next((h for k, h, _ in columns if k == key), None)
            if header is not None:
                columns = [c for c in columns if c[0] != key]
                left_out.append(header.replace("\n", " "))
    caption = f"left out for the terminal's width: {', '.join(left_out)} (see report.json)" if left_out else None
    table = Table(
        title=f"{report.model.get('name')} {report.model.get('version')} on {report.host_profile}",
        caption=caption,
        caption_justify="left",
    )
    for key, header, _ in columns:
        if key == "reason":
            table.add_column(header, min_width=_REASON_MIN, overflow="fold")  # a word longer than it, folded
        else:
            table.add_column(header, no_wrap=True)
    for row in zip(*(cells for _, _, cells in columns), strict=True):
        table.add_row(*row)
    return table


def _verdict(gate: str) -> str:
    style = {"passed": "green", "failed": "red", "unverified": "yellow"}.get(gate, "")
    return f"[{style}]{gate}[/{style}]" if style else gate


def _table_width(columns: Sequence[tuple[str, str, Sequence[str]]]) -> int:
    """The width the table needs with every one-line cell whole and the reason at its narrowest: _REASON_MIN,
    its `min_width`, however short (or absent) the reasons are."""
    from rich.text import Text

    width = 1  # the left border; each column adds its padding (2) and a border (1)
    for key, header, cells in columns:
        widest = max([Text.from_markup(cell).cell_len for cell in cells] + [len(line) for line in header.split("\n")])
        width += (_REASON_MIN if key == "reason" else widest) + 3
    return width


def _plot_points(variants: Sequence[VariantResult], metric: str) -> list[tuple[VariantResult, float, float]]:
    return [
        (v, float(v.accuracy[metric]), float(v.throughput))
        for v in variants
        if v.accuracy.get(metric) is not None and v.throughput is not None
    ]


def no_plot_reason(report: Report) -> str:
    """Why `plot_accuracy_vs_throughput` wrote no plot for this report (for a run that has none)."""
    import importlib.util

    metrics = headline_metrics(report.task)
    if not metrics:
        return f"the task {report.task} has no accuracy metric to plot"
    if not _plot_points(report.variants, metrics[0]):
        return "no variant was both measured for accuracy and timed"
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed: pip install 'strata[optimize]'"
    return "it could not be drawn"


def plot_accuracy_vs_throughput(
    variants: Sequence[VariantResult], metric: str, selected: Sequence[str], out: Path
) -> Path | None:
    """Scatter of `metric` against throughput per measured variant (PNG, matplotlib's Agg backend).

    Returns None when matplotlib is not installed or no variant has both numbers.

    Raises:
        OSError: the PNG cannot be written.
    """
    points = _plot_points(variants, metric)
    if not points:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(9, 6), dpi=110)
    for variant, accuracy, throughput in points:
        color = {"passed": "tab:green", "failed": "tab:red"}.get(variant.gate, "tab:gray")
        marker = "*" if variant.id in selected else "o"
        axes.scatter([throughput], [accuracy], c=color, marker=marker, s=180 if marker == "*" else 50, zorder=3)
        axes.annotate(variant.id, (throughput, accuracy), fontsize=7, xytext=(4, 3), textcoords="offset points")
    axes.set_xlabel("throughput (items/s, this host)")
    axes.set_ylabel(f"{metric} vs fp32")
    axes.set_title("accuracy against throughput (green: passed, red: failed, star: selected)")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)
    return out
