"""What a run reports while it trains: a progress bar, a line per logging step, metrics.jsonl, loss.png.

``metrics.jsonl`` holds one JSON line per optimizer step (``step``, ``loss``, ``lr``, ...) and one per
evaluation (``step``, ``eval_loss``, ``eval_perplexity``, ``eval_tokens``, ``eval_rows``); a line is
an evaluation exactly when it has ``eval_loss``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class RunLog:
    """Writes one JSON line per optimizer step (and per evaluation) to ``OUTPUT_DIR/metrics.jsonl``
    and drives the bar.

    The file is appended to and flushed every step, so a crashed run keeps its history. A fresh run
    starts it empty; a resumed run rewrites it from the checkpoint's ``history`` (its log history up
    to its step), so the file reads as one clean run and never keeps lines of another run.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        total_steps: int,
        start_step: int,
        logging_steps: int,
        disable_bar: bool = False,
        *,
        history: list[dict[str, Any]] | None = None,
        writes: bool = True,
    ) -> None:
        """``writes=False`` (every rank but the first): no file, no bar, nothing printed."""
        from tqdm.auto import tqdm

        self.writes = writes
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="training",
            unit="step",
            disable=disable_bar or not writes,
            dynamic_ncols=True,
        )
        self.logging_steps = logging_steps
        self.file = None
        if not writes:
            return
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        if history is not None:
            self._rewrite([e for e in history if "loss" in e and e.get("step", 0) <= start_step])
        else:
            self._truncate_after(start_step)
        self.file = open(self.path, "a")

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
            if entry.get("step", 0) <= step:
                keep.append(entry)
        self._rewrite(keep)

    def _rewrite(self, entries: list[dict[str, Any]]) -> None:
        # temporary file + rename: an interruption here leaves the old history, never half of it
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in entries))
        os.replace(tmp, self.path)

    def step(self, entry: dict[str, Any]) -> None:
        if not self.writes:
            return
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        self.bar.update(1)
        postfix = {"loss": f"{entry['loss']:.4f}", "lr": f"{entry['lr']:.2e}", "tok/s": f"{entry['tokens_per_s']:.0f}"}
        if entry.get("peak_reserved_gib") is not None:
            postfix["mem"] = f"{entry['peak_reserved_gib']:.2f}G"
        self.bar.set_postfix(postfix, refresh=False)
        if entry["step"] % self.logging_steps == 0:
            shown = {k: entry[k] for k in ("step", "loss", "grad_norm", "lr", "tokens_per_s", "epoch") if k in entry}
            self.bar.write(json.dumps(_round(shown)))

    def eval(self, entry: dict[str, Any]) -> None:
        """An evaluation at ``entry["step"]``: a line in metrics.jsonl and one printed above the bar."""
        if not self.writes:
            return
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        self.bar.write(
            f"step {entry['step']}: eval_loss {entry['eval_loss']:.4f}, perplexity "
            f"{entry['eval_perplexity']:.4g} ({entry['eval_tokens']} tokens)"
        )

    def note(self, text: str) -> None:
        if self.writes:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()


def _round(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(f"{v:.5g}") if isinstance(v, float) else v) for k, v in d.items()}


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every line of ``OUTPUT_DIR/metrics.jsonl`` (training steps and evaluations), in order."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(output_dir: str | os.PathLike, eval_points: list[tuple[int, float]] | None = None) -> Path | None:
    """Write ``OUTPUT_DIR/loss.png`` from metrics.jsonl (None when matplotlib is missing).

    Eval losses come from the file's evaluation lines (those of a resumed run's earlier part too);
    ``eval_points`` (step, loss) pairs are drawn where the file has none.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lines = read_metrics(output_dir)
    entries = [e for e in lines if "loss" in e]
    if not entries:
        return None
    evals = [(e["step"], e["eval_loss"]) for e in lines if "eval_loss" in e] or list(eval_points or [])
    last_ppl = next((e["eval_perplexity"] for e in reversed(lines) if "eval_perplexity" in e), None)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([e["step"] for e in entries], [e["loss"] for e in entries], label="train loss", lw=1.2)
    if evals:
        label = "eval loss" + (f" (last perplexity {last_ppl:.4g})" if last_ppl is not None else "")
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per trained token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(output_dir) / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def run_summary(
    *,
    rows: int,
    total_steps: int,
    batch: tuple[int, int],
    layout: str,
    parts: int | None,
    amp_dtype: Any,
    device: Any,
    world_size: int = 1,
) -> str:
    """The line a run starts with: rows, steps, batch shape, layout, precision, device."""
    how = ""
    if parts is not None:
        how = (
            f" (each step's rows run as up to {parts} micro-batches)"
            if parts > 1
            else " (each step's rows run as 1 micro-batch)"
        )
    precision = str(amp_dtype).replace("torch.", "") if amp_dtype else "model dtype"
    ranks = f" x {world_size} ranks" if world_size > 1 else ""
    return (
        f"hizli: {rows} rows, {total_steps} steps of {batch[0]} x {batch[1]}{ranks} rows, "
        f"layout {layout}{how}, precision {precision}, on {device}"
    )


def step_entry(
    step_no: int, result: Any, elapsed: float, epoch: float, peak_reserved_gib: float | None
) -> dict[str, Any]:
    """One optimizer step's line of ``metrics.jsonl`` (``result``: ``hizli.train.context.StepResult``)."""
    return {
        "step": step_no,
        "loss": result.loss,
        "lr": result.lr,
        "grad_norm": result.grad_norm,
        "tokens": result.tokens,
        "tokens_per_s": result.tokens / elapsed,
        "step_time_s": elapsed,
        "epoch": round(epoch, 4),
        "peak_reserved_gib": peak_reserved_gib,
    }


def train_metrics(
    *,
    losses: list[float],
    trained_tokens: int,
    runtime: float,
    rows_per_step: int,
    peak_reserved_gib: float | None,
    total_steps: int,
    epoch: float,
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """``TrainOutput.metrics``: transformers' names (``train_runtime``, ``train_loss``, ...), the last
    evaluation's ``eval_*`` figures; ``losses`` holds the steps of this call that updated the weights."""
    steps = len(losses)
    out = {
        "train_runtime": round(runtime, 4),
        "train_loss": float(sum(losses) / steps) if steps else float("nan"),
        "train_steps_per_second": round(steps / runtime, 4) if runtime else 0.0,
        "train_samples_per_second": round(steps * rows_per_step / runtime, 4) if runtime else 0.0,
        "train_tokens_per_second": round(trained_tokens / runtime, 2) if runtime else 0.0,
        "peak_reserved_gib": peak_reserved_gib,
        "total_steps": total_steps,
        "epoch": epoch,
    }
    evals = [e for e in history if "eval_loss" in e]
    if evals:
        out.update({k: v for k, v in evals[-1].items() if k.startswith("eval_")})
    return out
