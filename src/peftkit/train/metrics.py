"""Training metrics: one JSON object per line in ``metrics.jsonl`` (and to any reporters), and a
loss-curve PNG."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from peftkit.io import atomic_file
from peftkit.train.reporting import LoggingConfig, MetricsSink, open_sinks

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
#: Per-step metrics of the preference objectives drawn under the loss (objectives/losses.py names).
OBJECTIVE_PLOT_KEYS = ("rewards/margins", "rewards/accuracies", "kl", "accuracy", "margin")
PLOT_INTERVAL_S = 30.0  # redrawing costs ~0.2 s: often enough to watch a run, rare enough not to slow it


class MetricsLog:
    """Append-only metrics file; on resume, lines past the resumed step are dropped so the
    file reads as if the run had never been interrupted. Each record also goes to the reporters
    ``reporting`` names (``train/reporting.py``); :meth:`close` (or ``with``) closes them."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        resume_step: int | None = None,
        enabled: bool = True,
        reporting: LoggingConfig | None = None,
    ):
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        self.sinks: list[MetricsSink] = []
        self._last_plot = 0.0
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    if record.get("step", 0) <= resume_step:
                        self.records.append(record)
        with atomic_file(self.path, "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in self.records)
        if reporting is not None:
            self.sinks = open_sinks(reporting, output_dir, resume_step=resume_step)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def plot(self, *, force: bool = True) -> Path | None:
        """Draw training (and validation) loss against step into ``loss.png``.

        With ``force=False`` nothing is drawn if the last drawing is less than
        ``PLOT_INTERVAL_S`` old."""
        if not self.enabled or (not force and time.monotonic() - self._last_plot < PLOT_INTERVAL_S):
            return None
        self._last_plot = time.monotonic()
        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]
        if not train and not val:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        extra = [key for key in OBJECTIVE_PLOT_KEYS if any(key in r for r in self.records)]
        if extra:  # a preference objective: its margins / accuracies under the loss
            fig, (ax, below) = plt.subplots(2, 1, figsize=(7, 6), dpi=110, sharex=True)
            for key in extra:
                points = [(r["step"], r[key]) for r in self.records if key in r]
                below.plot(*zip(*points), lw=1, label=key)
            below.set_xlabel("optimizer step")
            below.grid(alpha=0.3)
            below.legend()
        else:
            fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        if train:
            steps, losses = zip(*train)
            ax.plot(steps, losses, lw=1, alpha=0.5, label="train loss")
            window = max(1, len(losses) // 20)
            if window > 1:
                smooth = [
                    sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
                    for i in range(len(losses))
                ]
                ax.plot(steps, smooth, lw=2, label=f"train loss (mean of {window})")
        if val:
            steps, losses = zip(*val)
            ax.plot(steps, losses, "o-", lw=2, label="validation loss")
        if not extra:
            ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (per pair)" if extra else "loss (nats / label token)")
        finite = [v for _, v in train + val if math.isfinite(v)]
        if finite and max(finite) / max(min(finite), 1e-9) > 50:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        target = self.path.parent / PLOT_FILE
        with atomic_file(target, "wb") as handle:
            fig.savefig(handle, format="png")
        plt.close(fig)
        return target
