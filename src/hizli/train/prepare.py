"""What the trainer does to its datasets before the first step: tokenise, check, choose a collator.

Rows may come as a text column (the recipe renders conversations into ``text``), as conversations
(``messages``/``conversations``), through a ``formatting_func``, or already tokenised
(``input_ids``/``labels``); all end as a ``TokenizedDataset`` with labels and a report of what was
dropped and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from hizli.data.collate import DataCollatorForSeq2Seq, PaddingFreeCollator


@dataclass
class DataSettings:
    """How the trainer turns rows into tokens (the TRL-style arguments of ``SFTTrainer``)."""

    max_seq_length: int
    num_proc: int = 1
    text_field: str | None = None
    formatting_func: Callable | None = None
    train_on: str = "all"  # "all" tokens or "assistant" turns only
    bad_rows: str = "skip"


def prepare_dataset(dataset: Any, tokenizer: Any, settings: DataSettings, split: str):
    """``dataset`` as a ``TokenizedDataset``; ``split`` ("train"/"eval") names it in errors."""
    from hizli.data import tokenize

    if isinstance(dataset, tokenize.TokenizedDataset):
        return dataset
    text_field = settings.text_field
    if settings.formatting_func is not None:
        dataset = _apply_formatting(dataset, settings.formatting_func)
        text_field = "text"
    columns = _columns(dataset)
    if "input_ids" in columns:
        return tokenize.TokenizedDataset.from_rows(list(dataset), max_seq_length=settings.max_seq_length)
    kw = dict(
        max_seq_length=settings.max_seq_length,
        num_proc=settings.num_proc,
        train_on=settings.train_on,
        bad_rows=settings.bad_rows,
    )
    if text_field is None and "text" in columns:
        text_field = "text"
    if text_field is not None:
        if text_field not in columns:
            raise ValueError(
                f"dataset_text_field={text_field!r} is not a column of the {split} "
                f"dataset; its columns are {sorted(columns)}"
            )
        return tokenize.tokenize_dataset(dataset, tokenizer, text_field=text_field, **kw)
    for name in ("messages", "conversations"):
        if name in columns:
            from hizli.data.sharegpt import standardize_sharegpt

            return tokenize.tokenize_dataset(standardize_sharegpt(dataset), tokenizer, messages_field=name, **kw)
    raise ValueError(
        f"the {split} dataset has columns {sorted(columns)}: pass dataset_text_field=..., or "
        "give it a 'text', 'messages' or 'conversations' column, or 'input_ids'"
    )


def check_token_ids(model: Any, dataset: Any, split: str) -> None:
    """Ids past the embedding table would fail deep inside the first forward: name the row now."""
    import numpy as np

    embeddings = model.get_input_embeddings()
    vocab = getattr(embeddings, "num_embeddings", None)
    ids = getattr(dataset, "_ids", None)
    if vocab is None or ids is None or len(ids) == 0:
        return
    bad = np.flatnonzero((ids >= vocab) | (ids < 0))
    if bad.size:
        position = int(bad[0])
        row = int(np.searchsorted(dataset._offsets, position, side="right") - 1)
        raise ValueError(
            f"{split} row {row} has token id {int(ids[position])}, outside this model's vocabulary "
            f"of {vocab} tokens: the data was tokenized with another tokenizer"
        )


def check_trainable(model: Any, train_dataset: Any, eval_dataset: Any) -> None:
    """Refuse, saying why, a training set with nothing to train on or token ids the model lacks."""
    if train_dataset is None or len(train_dataset) == 0:
        report = getattr(train_dataset, "report", None)
        if report is not None and report.rows_in:  # rows came in, none has a label: refuse, say why
            raise ValueError(
                f"nothing to train on: none of the {report.rows_in} rows has a trained token "
                f"({report.summary()}). Every label is -100: check the labels, train_on / "
                "train_on_responses_only (does the chat template match?) and max_seq_length"
            )
        raise ValueError("nothing to train on: train_dataset is empty (see the data report above)")
    check_token_ids(model, train_dataset, "train")
    if eval_dataset is not None:
        check_token_ids(model, eval_dataset, "eval")


def choose_collator(given: Callable | None, tokenizer: Any, *, packing: bool, padding_free: bool | None) -> Callable:
    """The collator a run uses. hizli's own collators may be swapped for the padding-free layout
    (same loss, no compute on pads); a collator that is not hizli's is used exactly as given."""
    ours = given is None or isinstance(given, (DataCollatorForSeq2Seq, PaddingFreeCollator))
    if not ours:
        return given
    if padding_free is None:
        padding_free = True
    if packing or padding_free or isinstance(given, PaddingFreeCollator):
        return PaddingFreeCollator(tokenizer)
    return given or DataCollatorForSeq2Seq(tokenizer)


def _columns(dataset: Any) -> set[str]:
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return set(names)
    if isinstance(dataset, (list, tuple)):
        return set(dataset[0]) if dataset else set()
    raise TypeError(f"train_dataset of type {type(dataset).__name__}: pass a datasets.Dataset or a list of dicts")


def _apply_formatting(dataset: Any, fn: Callable) -> list[dict[str, str]]:
    texts = []
    for row in dataset:
        out = fn(row)
        texts.append(out[0] if isinstance(out, list) and len(out) == 1 else out)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("formatting_func must return a string for each row")
    return [{"text": t} for t in texts]
