"""Output helpers shared by the `raylm bench` commands: a text table, a JSON file, a PNG chart."""
from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Render rows as a fixed-width text table; floats get 4 significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.4e}"
        return "-" if value is None else str(value)

    text_rows = [[cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        if len(row) != len(headers):
            raise ValueError(f"table row has {len(row)} cells, headers have {len(headers)}")
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(headers, widths)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in text_rows]
    return "\n".join(lines)


def pooled_ratio_interval(rounds: Sequence[tuple[float, float, float, float]],
                          level: float = 0.95, resamples: int = 2000,
                          seed: int = 0) -> tuple[float, float] | None:
    """A bootstrap interval of a pooled rate ratio measured side by side in rounds.

    Each round is (amount_a, seconds_a, amount_b, seconds_b) of two setups that took turns in
    it; the figure is (sum amount_a / sum seconds_a) / (sum amount_b / sum seconds_b). Whole
    rounds are resampled, so the pairing (a drift of the machine falls on both setups of a
    round) is kept. None with fewer than 3 rounds (nothing to resample) or where a round's
    baseline did nothing (a resample could divide by zero). Seeded: one set of rounds always
    gives the same interval."""
    if len(rounds) < 3 or any(r[2] <= 0 or r[1] <= 0 or r[3] <= 0 for r in rounds):
        return None

    def ratio(picked: Sequence[tuple[float, float, float, float]]) -> float:
        amount_a, seconds_a, amount_b, seconds_b = (sum(r[i] for r in picked) for i in range(4))
        return (amount_a / seconds_a) / (amount_b / seconds_b)

    rng = random.Random(seed)
    ratios = sorted(ratio(rng.choices(rounds, k=len(rounds))) for _ in range(resamples))
    tail = (1 - level) / 2
    return ratios[int(tail * (resamples - 1))], ratios[int((1 - tail) * (resamples - 1))]


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write `data` as indented JSON, creating parent folders; returns the path written."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    logger.info("wrote %s", out)
    return out


def png_path_for(json_path: str | os.PathLike) -> Path:
    """The chart that goes next to a JSON result: results.json -> results.png."""
    return Path(json_path).with_suffix(".png")


def bar_chart(
    path: str | os.PathLike,
    title: str,
    panels: Sequence[tuple[str, dict[str, float]]],
) -> Path:
    """Save side-by-side bar panels, one per metric: panels = [(ylabel, {system: value}), ...]."""
    import matplotlib

    matplotlib.use("Agg")  # headless: benchmarks run on servers without a display
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("bar_chart needs at least one panel")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    colors = ["#3a6ea5", "#c0504d", "#9bbb59", "#8064a2"]
    for ax, (ylabel, values) in zip(axes[0], panels):
        names = list(values)
        heights = [values[n] for n in names]
        bars = ax.bar(names, heights, color=colors[: len(names)])
        ax.bar_label(bars, labels=[f"{h:.3g}" for h in heights], padding=2, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.margins(y=0.15)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    logger.info("wrote %s", out)
    return out
