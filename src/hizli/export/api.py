"""The recipe's export methods, bound onto every model hizli adapts.

``models.lora.attach_methods`` binds ``save_pretrained_merged``, ``save_pretrained_gguf``,
``push_to_hub_merged`` and ``push_to_hub_gguf`` onto each adapted model. The work happens in
merge.py (merged safetensors), gguf.py (GGUF + Ollama Modelfile) and hub.py (uploads); every export
goes through a staging folder (staging.py).
"""

from __future__ import annotations

from typing import Any


def save_pretrained_merged(
    model, save_directory: str, tokenizer=None, save_method: str = "merged_16bit", **kwargs: Any
):
    """Merge the LoRA adapter into the base and save it; see ``hizli.export.merge.save_merged``."""
    from hizli.export import merge

    return merge.save_merged(model, save_directory, tokenizer, save_method=save_method, **kwargs)


def save_pretrained_gguf(model, save_directory: str, tokenizer=None, quantization_method: str = "q8_0", **kwargs: Any):
    """Write a GGUF file (and an Ollama Modelfile); see ``hizli.export.gguf.save_gguf``."""
    from hizli.export import gguf

    return gguf.save_gguf(model, save_directory, tokenizer, quantization_method=quantization_method, **kwargs)


def push_to_hub_merged(
    model,
    repo_id: str,
    tokenizer=None,
    save_method: str = "merged_16bit",
    token: str | None = None,
    private: bool = True,
    **kwargs: Any,
):
    """Merge, save to a temporary folder and upload it to ``repo_id`` (private unless ``private=False``)."""
    from hizli.export import hub

    return hub.push_merged(model, repo_id, tokenizer, save_method=save_method, token=token, private=private, **kwargs)


def push_to_hub_gguf(
    model,
    repo_id: str,
    tokenizer=None,
    quantization_method: str = "q8_0",
    token: str | None = None,
    private: bool = True,
    **kwargs: Any,
):
    """Write GGUF to a temporary folder and upload it to ``repo_id`` (private unless ``private=False``)."""
    from hizli.export import hub

    return hub.push_gguf(
        model, repo_id, tokenizer, quantization_method=quantization_method, token=token, private=private, **kwargs
    )


def push_to_hub(model, repo_id: str, tokenizer=None, token: str | None = None, private: bool = True, **kwargs: Any):
    """Upload the LoRA adapter (and tokenizer) to ``repo_id``, private by default.

    PEFT's own ``push_to_hub`` makes public repositories unless told otherwise; binding this one
    instead keeps the recipe's ``model.push_to_hub(...)`` private by default.
    """
    from hizli.export import hub

    return hub.push_adapter(model, repo_id, tokenizer, token=token, private=private, **kwargs)
