"""The recipe's export methods, bound onto every model hizli adapts (see models.lora.attach_methods).

Owned by the export work (issue 7): merge.py, gguf.py and hub.py hold the implementations.
"""

from __future__ import annotations

from typing import Any


def save_pretrained_merged(model, save_directory: str, tokenizer=None, save_method: str = "merged_16bit",
                           **kwargs: Any):
    from hizli.export import merge

    return merge.save_merged(model, save_directory, tokenizer, save_method=save_method, **kwargs)


def save_pretrained_gguf(model, save_directory: str, tokenizer=None, quantization_method: str = "q8_0",
                         **kwargs: Any):
    from hizli.export import gguf

    return gguf.save_gguf(model, save_directory, tokenizer, quantization_method=quantization_method, **kwargs)


def push_to_hub_merged(model, repo_id: str, tokenizer=None, save_method: str = "merged_16bit",
                       token: str | None = None, private: bool = True, **kwargs: Any):
    from hizli.export import hub

    return hub.push_merged(model, repo_id, tokenizer, save_method=save_method, token=token, private=private,
                           **kwargs)


def push_to_hub_gguf(model, repo_id: str, tokenizer=None, quantization_method: str = "q8_0",
                     token: str | None = None, private: bool = True, **kwargs: Any):
    from hizli.export import hub

    return hub.push_gguf(model, repo_id, tokenizer, quantization_method=quantization_method, token=token,
                         private=private, **kwargs)


def export_cli(args) -> int:
    from hizli.export import cli

    return cli.run(args)
