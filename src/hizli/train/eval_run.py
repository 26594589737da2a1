"""``hizli eval PATH --data FILE``: a model's loss and perplexity on held-out conversations.

PATH is anything hizli loads (an adapter folder, a merged folder, a ``.gguf`` file, an embedded
model name). The conversations are rendered with the chat template and labelled exactly as
training does, and the loss is the training loss itself (``hizli.train.evaluate``), so the figure
equals the trainer's eval loss on the same rows. ``generate=N`` also answers the first N
conversations greedily (the prompt is every turn before the last assistant turn, whose text is
kept as the reference).

Everything that can be checked before the model loads (the data file, the template, the output
files) is checked first, so a mistake costs a second, not a model load.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hizli.train.evaluate import EvalResult

RESULT_FILE = "eval.json"
SAMPLES_FILE = "samples.jsonl"


@dataclass
class EvalReport:
    """What ``run_eval`` measured and where it came from (``to_dict`` is what ``--json`` prints)."""

    path: str
    data: str
    template: str
    max_seq_length: int
    train_on: str
    result: EvalResult
    rows_in: int
    rows_skipped: int
    rows_truncated: int
    seconds: float
    samples: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "data": self.data,
            "template": self.template,
            "max_seq_length": self.max_seq_length,
            "train_on": self.train_on,
            **self.result.to_dict(),
            "rows_in": self.rows_in,
            "rows_skipped": self.rows_skipped,
            "rows_truncated": self.rows_truncated,
            "seconds": round(self.seconds, 3),
            "samples": self.samples,
            "files": self.files,
        }

    def lines(self) -> list[str]:
        """The text ``hizli eval`` prints."""
        r = self.result
        trained = "assistant turns" if self.train_on == "assistant" else "all tokens"
        out = [
            f"{self.path} on {self.data}: template {self.template}, max_seq_length {self.max_seq_length}, "
            f"scoring {trained}",
            f"  loss        {r.loss:.6f}  (mean cross-entropy per trained token, nats)",
            f"  perplexity  {r.perplexity:.4f}",
            f"  tokens      {r.trained_tokens:,} trained of {r.tokens:,}, in {r.rows} rows",
        ]
        if self.rows_skipped or self.rows_truncated:
            out.append(
                f"  rows        {self.rows_in} read, {self.rows_skipped} without a trained token after "
                f"truncation (not scored), {self.rows_truncated} truncated to {self.max_seq_length} tokens"
            )
        for s in self.samples if not self.files else []:
            out += [f"  --- sample {s['row']}: {_short(s['prompt'][-1]['content'])}", f"  {s['answer']}"]
        out += [f"  wrote {f}" for f in self.files]
        out.append(f"  {self.seconds:.1f} s")
        return out


def run_eval(
    path: str,
    data: str,
    *,
    template: str | None = None,
    max_seq_length: int = 2048,
    train_on: str = "all",
    batch_size: int = 8,
    load_in_4bit: bool = False,
    generate: int = 0,
    max_new_tokens: int = 256,
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    schema: str = "auto",
    show_progress: bool = False,
) -> EvalReport:
    """Evaluate the model at ``path`` on the conversations in ``data``.

    Args:
        path: adapter folder, merged folder, ``.gguf`` file or embedded model name.
        data: a ``.jsonl``/``.json``/``.parquet`` file of conversations (ShareGPT, OpenAI messages or
            Alpaca schema), or ``hizli:sharegpt`` for the packaged sample.
        template: chat template name to render with (``hizli templates``); default: the tokenizer's
            own (a trained adapter folder saves the template it was trained with).
        max_seq_length: rows are cut to this many tokens, as in training.
        train_on: ``"all"`` scores every token, ``"assistant"`` only assistant turns (as training with
            ``train_on_responses_only``).
        batch_size: rows per forward pass.
        load_in_4bit: load the base weights in NF4 (match how the adapter was trained for the
            training run's exact figure).
        generate: answer the first ``generate`` conversations greedily.
        max_new_tokens: longest generated answer.
        out_dir: write ``eval.json`` (and ``samples.jsonl``) here.
        overwrite: replace those files if they exist.
        schema: ``"auto"``, ``"sharegpt"``, ``"messages"`` or ``"alpaca"``.
        show_progress: progress bars.

    Returns:
        An ``EvalReport``.

    Raises:
        ValueError: a setting or the data is unusable (the message names which and how to fix it).
        FileNotFoundError: ``path`` or ``data`` does not exist.
    """
    start = time.perf_counter()
    if train_on not in ("all", "assistant"):
        raise ValueError(f"train_on={train_on!r}: use 'all' or 'assistant' (--responses-only)")
    for name, value, low in (
        ("max_seq_length", max_seq_length, 8),
        ("batch_size", batch_size, 1),
        ("generate", generate, 0),
        ("max_new_tokens", max_new_tokens, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}={value!r} must be an integer >= {low} (--{name.replace('_', '-')})")
    if template is not None:
        from hizli.data.templates import lookup

        try:
            lookup(template)
        except ValueError as e:
            raise ValueError(f"--template {template!r}: {e}") from None
    targets = _output_files(out_dir, generate, overwrite)
    _check_model_path(path)
    rows = _load_rows(data, schema)

    from hizli.data.collate import PaddingFreeCollator
    from hizli.data.tokenize import tokenize_dataset
    from hizli.models import loader
    from hizli.train.evaluate import evaluate_loss

    model, tokenizer = loader.load(
        path, max_seq_length=max_seq_length, load_in_4bit=load_in_4bit, adapter_trainable=False
    )
    if template is not None:
        from hizli.data.templates import get_chat_template

        tokenizer = get_chat_template(tokenizer, chat_template=template)
    elif not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{path}: its tokenizer has no chat template; pass --template NAME (`hizli templates` "
            "lists them; use the one the model was trained with)"
        )
    ds = tokenize_dataset(
        rows,
        tokenizer,
        max_seq_length=max_seq_length,
        messages_field="messages",
        train_on=train_on,
        bad_rows="skip",
        show_progress=show_progress,
    )
    report = ds.report
    if len(ds) == 0:
        raise ValueError(
            f"--data {data}: none of its {report.rows_in} rows has a token to score after "
            f"rendering and truncation to --max-seq-length {max_seq_length}"
            + (" (with --responses-only, only assistant turns count)" if train_on == "assistant" else "")
        )
    result = evaluate_loss(
        model, ds, PaddingFreeCollator(tokenizer), batch_size=batch_size, show_progress=show_progress
    )
    samples = _generate(model, tokenizer, rows, generate, max_new_tokens) if generate else []
    out = EvalReport(
        path=str(path),
        data=str(data),
        template=template or "the tokenizer's own",
        max_seq_length=max_seq_length,
        train_on=train_on,
        result=result,
        rows_in=report.rows_in,
        rows_skipped=len(report.skipped),
        rows_truncated=report.truncated,
        seconds=time.perf_counter() - start,
        samples=samples,
    )
    if targets:
        _write(out, targets)
    return out


def prompt_and_reference(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """A conversation split at its last assistant turn: (the turns before it, its text)."""
    last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
    return [dict(m) for m in messages[:last]], str(messages[last].get("content", ""))


# ---------------------------------------------------------------- helpers
def _output_files(out_dir, generate: int, overwrite: bool) -> dict[str, Path]:
    if out_dir is None:
        return {}
    folder = Path(out_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {out_dir}: is a file; pass a folder to write {RESULT_FILE} into")
    targets = {"result": folder / RESULT_FILE}
    if generate:
        targets["samples"] = folder / SAMPLES_FILE
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise ValueError(
            f"--out {out_dir}: {', '.join(existing)} already exist(s); refusing to overwrite. Pick "
            "another folder or pass --force"
        )
    return targets


def _load_rows(data: str, schema: str):
    from hizli.data.load import load_conversations
    from hizli.data.problems import DataError

    source = str(data)
    if source.startswith("hizli:"):
        from hizli.data.sample import sample_path

        source = sample_path(source.split(":", 1)[1])
    elif not Path(source).expanduser().is_file():
        raise FileNotFoundError(
            f"--data {data}: no such file (pass a .jsonl, .json or .parquet file of "
            "conversations, or hizli:sharegpt for the packaged sample)"
        )
    try:
        rows = load_conversations(source, schema=schema, bad_rows="error")
    except DataError as e:
        shown = "\n  ".join(str(p) for p in e.report.skipped[:20])
        more = f"\n  ... and {len(e.report.skipped) - 20} more" if len(e.report.skipped) > 20 else ""
        raise ValueError(
            f"--data {data}: {len(e.report.skipped)} of {e.report.rows_in} rows are unusable:\n  "
            f"{shown}{more}\nFix or remove them (`hizli data check {data}` lists them all)"
        ) from None
    if len(rows) == 0:
        raise ValueError(f"--data {data}: the file holds no conversations; pass a file with at least one row")
    return rows


def _check_model_path(path: str) -> None:
    """A local-looking PATH that does not exist fails here, naming PATH (not as a hub download error)."""
    from hizli.models.embedded import EMBEDDED

    name = str(path)
    if name.lower() in EMBEDDED or Path(name).expanduser().exists():
        return
    hub_like = name.count("/") == 1 and not name.startswith((".", "/", "~")) and Path(name).suffix == ""
    if not hub_like:
        raise FileNotFoundError(
            f"PATH {name}: no such adapter folder, model folder or .gguf file, and not an "
            f"embedded model name ({', '.join(EMBEDDED)})"
        )


def _generate(model, tokenizer, rows, n: int, max_new_tokens: int) -> list[dict[str, Any]]:
    from hizli.data.templates import stop_token_ids
    from hizli.models.inference import generate_reply

    stop_ids = stop_token_ids(tokenizer)
    samples: list[dict[str, Any]] = []
    for i in range(len(rows)):
        if len(samples) == n:
            break
        prompt, reference = prompt_and_reference(rows[i]["messages"])
        if not prompt:
            continue  # an answer with nothing before it: no prompt to answer
        answer = generate_reply(
            model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=0.0, stream=False, stop_ids=stop_ids
        )
        samples.append({"row": i, "prompt": prompt, "reference": reference, "answer": answer})
    return samples


def _write(report: EvalReport, targets: dict[str, Path]) -> None:
    """Each file through a temporary name and a rename: never half a file under the final name."""
    folder = targets["result"].parent
    folder.mkdir(parents=True, exist_ok=True)
    report.files = [str(p) for p in targets.values()]
    texts = {"result": json.dumps({k: v for k, v in report.to_dict().items() if k != "samples"}, indent=2) + "\n"}
    if "samples" in targets:
        texts["samples"] = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in report.samples)
    for key, text in texts.items():
        tmp = targets[key].with_name(targets[key].name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, targets[key])


def _short(text: str, n: int = 70) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."
