"""Switching a model between training and generation, and one chat turn through the chat template."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Iterable, Sequence


def accept_encodings_in_generate(model) -> None:
    """Let ``model.generate(input_ids=tokenizer.apply_chat_template(..., return_tensors="pt"))`` work.

    transformers 5 returns a BatchEncoding (a dict) from ``apply_chat_template(tokenize=True)``
    where 4.x returned a tensor; the recipe passes it as ``input_ids``. We unpack it.
    """
    if getattr(model.generate, "__qualname__", None) == _GENERATE_WRAPPER:  # this instance's is ours already
        return
    original = model.generate

    @functools.wraps(original, assigned=("__name__", "__doc__"))  # keeps its own qualname: see above
    def generate(*args: Any, **kwargs: Any):
        enc = kwargs.get("input_ids")
        if enc is None and args and isinstance(args[0], Mapping):  # BatchEncoding is a Mapping, not a dict
            enc, args = args[0], args[1:]
        if isinstance(enc, Mapping) and "input_ids" in enc:
            kwargs["input_ids"] = enc["input_ids"]
            if "attention_mask" in enc and "attention_mask" not in kwargs:
                kwargs["attention_mask"] = enc["attention_mask"]
        return original(*args, **kwargs)

    model.generate = generate


_GENERATE_WRAPPER = f"{accept_encodings_in_generate.__qualname__}.<locals>.generate"


def for_inference(model):
    """Evaluation mode with the KV cache on; returns the model (the recipe ignores the result)."""
    model.eval()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "config"):
        base.config.use_cache = True
    if hasattr(base, "generation_config") and base.generation_config is not None:
        base.generation_config.use_cache = True
    return model


def for_training(model):
    """Back to training mode (checkpointing, as chosen in get_peft_model, applies again)."""
    model.train()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    from hizli.models.record import find_state

    record = find_state(model)
    if record is not None and record.checkpointing != "off" and hasattr(base, "config"):
        base.config.use_cache = False
    return model


def chat_input_ids(tokenizer, messages: Iterable[dict], device) -> Any:
    """Token ids of ``messages`` through the chat template, ending with the assistant prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this tokenizer has no chat template; set one with hizli.get_chat_template(tokenizer, 'NAME') "
            "(`hizli templates` lists them)"
        )
    # hizli sets model_max_length to the training max_seq_length, which does not bound a chat:
    # verbose=False keeps the tokenizer from warning of "indexing errors" for a longer prompt.
    enc = tokenizer.apply_chat_template(
        list(messages),
        tokenize=True,
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
        tokenizer_kwargs={"verbose": False},
    )
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def generate_reply(
    model,
    tokenizer,
    messages: Iterable[dict],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    min_p: float | None = None,
    stream: bool = True,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
) -> str:
    """Answer the last user message; with ``stream`` the text is printed as it is produced.

    ``temperature=0`` decodes greedily (reproducible answers for scripts and tests). Generation
    stops at the model's EOS ids and at ``stop_ids`` (the chat template's end-of-turn tokens:
    ``hizli.data.templates.stop_token_ids(tokenizer)``). A streamed
    answer that the ``max_new_tokens`` limit cut short is followed by a line saying so.
    """
    import torch
    from transformers import TextStreamer

    for_inference(model)
    input_ids, attention_mask = chat_input_ids(tokenizer, messages, model.device)
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, use_cache=True, pad_token_id=tokenizer.pad_token_id)
    if temperature and temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature)
        if min_p:
            kwargs["min_p"] = min_p
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    eos = _stop_ids(model, stop_ids)
    if eos:
        kwargs["eos_token_id"] = eos
    if stream:
        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    new = out[0, input_ids.shape[1] :]
    if stream and len(new) >= max_new_tokens and int(new[-1]) not in eos:  # stopped by the limit, mid-answer
        print(f"[cut at max_new_tokens={max_new_tokens}]", flush=True)
    return tokenizer.decode(new, skip_special_tokens=True)


def _stop_ids(model, extra: Sequence[int]) -> list[int]:
    """EOS ids of the generation config plus ``extra`` (the chat template's stop tokens)."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(eos, int):
        ids.append(eos)
    elif isinstance(eos, (list, tuple)):
        ids.extend(int(i) for i in eos)
    ids.extend(int(i) for i in extra)
    return list(dict.fromkeys(ids))
