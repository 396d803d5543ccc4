"""The run's learning curve: the loss per step and the held-out acceptance per evaluation,
written as JSON and drawn as a PNG (loss and acceptance against step)."""
from __future__ import annotations

import json
import pathlib
from dataclasses import asdict, dataclass, field

from raylm.workers.distill.acceptance import Acceptance


@dataclass
class Curve:
    losses: list[float] = field(default_factory=list)  # index = step - 1
    evals: list[tuple[int, Acceptance]] = field(default_factory=list)  # (step, measure)

    def to_json(self, extra: dict) -> dict:
        return {**extra, "loss": self.losses,
                "eval": [{"step": s, **asdict(a)} for s, a in self.evals]}

    def write_json(self, path: pathlib.Path, extra: dict) -> None:
        path.write_text(json.dumps(self.to_json(extra), indent=1))

    def write_png(self, path: pathlib.Path, title: str) -> None:
        import matplotlib

        matplotlib.use("Agg")  # no display: write the file only
        import matplotlib.pyplot as plt

        fig, (ax_loss, ax_acc) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        steps = list(range(1, len(self.losses) + 1))
        ax_loss.plot(steps, self.losses, lw=0.6, alpha=0.4, label="loss")
        window = max(1, len(self.losses) // 50)
        smooth = [sum(self.losses[max(0, i - window + 1):i + 1]) / len(
            self.losses[max(0, i - window + 1):i + 1]) for i in range(len(self.losses))]
        ax_loss.plot(steps, smooth, lw=1.5, label=f"loss (mean of {window})")
        ax_loss.set_ylabel("loss")
        ax_loss.legend()
        ax_loss.set_title(title)
        eval_steps = [s for s, _ in self.evals]
        ax_acc.plot(eval_steps, [a.acceptance_rate for _, a in self.evals], "o-",
                    label="acceptance rate (k-block)")
        ax_acc.plot(eval_steps, [a.agreement for _, a in self.evals], "s--",
                    label="argmax agreement")
        ax_acc.set_ylim(0, 1)
        ax_acc.set_ylabel("held-out greedy acceptance")
        ax_acc.set_xlabel("step")
        ax_len = ax_acc.twinx()
        ax_len.plot(eval_steps, [a.mean_acceptance_length for _, a in self.evals], "^:",
                    color="tab:green", label="mean acceptance length")
        ax_len.set_ylabel("tokens per target step")
        lines = ax_acc.get_legend_handles_labels()
        more = ax_len.get_legend_handles_labels()
        ax_acc.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
