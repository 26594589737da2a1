"""Put PEFT LoRA adapters on a loaded model with the recipe's arguments, every one of them honoured."""

from __future__ import annotations

from typing import Any, Sequence

from hizli import _log
from hizli._startup import gc_paused

RECIPE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@gc_paused()  # PEFT imports and every projection gets its adapter: see hizli._startup
def add_lora(
    model,
    r: int = 16,
    target_modules: Sequence[str] | str | None = RECIPE_TARGETS,
    lora_alpha: float = 16,
    *,
    lora_dropout: float = 0.0,
    bias: str = "none",
    use_gradient_checkpointing: bool | str = "unsloth",
    random_state: int = 3407,
    use_rslora: bool = False,
    loftq_config: Any = None,
    modules_to_save: Sequence[str] | None = None,
    init_lora_weights: bool | str = True,
    max_seq_length: int | None = None,
    **unknown: Any,
):
    """Wrap ``model`` in a ``peft.PeftModel`` with LoRA on ``target_modules``.

    ``random_state`` seeds the adapter initialisation only (the caller's RNG state is restored);
    ``use_rslora`` scales updates by ``lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``.
    """
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    if unknown:
        raise TypeError(f"get_peft_model() got unexpected argument(s): {', '.join(sorted(unknown))}")
    if isinstance(model, PeftModel):
        raise ValueError(
            "this model already has LoRA adapters (get_peft_model was called twice); "
            "call it once on the model from FastLanguageModel.from_pretrained"
        )
    _check_lora_args(r, lora_alpha, lora_dropout, bias, use_rslora)
    if loftq_config not in (None, {}):
        raise ValueError(
            "loftq_config is not supported by hizli yet; pass loftq_config=None (the recipe's value). "
            "LoftQ initialisation needs the full-precision base weights, which a 4-bit load does not keep"
        )
    targets = _check_targets(model, target_modules)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        bias=bias,
        target_modules=targets,
        use_rslora=use_rslora,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        init_lora_weights=init_lora_weights,
        task_type="CAUSAL_LM",
    )
    # fork_rng: the adapter init is reproducible from random_state and the user's RNG is untouched
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(random_state)
        peft_model = get_peft_model(model, config)
    from hizli.models.record import state_of

    record = state_of(peft_model)  # the base model's record (PEFT forwards the attribute), or a new one
    if record.info is not None:
        # recorded in adapter_config.json: FastLanguageModel.from_pretrained(adapter_dir) finds the base
        peft_model.peft_config["default"].base_model_name_or_path = record.info.source
    if max_seq_length:
        peft_model.max_seq_length = max_seq_length
    from hizli.models.checkpointing import set_checkpointing

    record.checkpointing = set_checkpointing(peft_model, use_gradient_checkpointing)
    record.lora = dict(
        r=r,
        target_modules=list(targets),
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        bias=bias,
        use_gradient_checkpointing=use_gradient_checkpointing,
        random_state=random_state,
        use_rslora=use_rslora,
    )
    attach_methods(peft_model)
    return peft_model


def _check_lora_args(r, lora_alpha, lora_dropout, bias, use_rslora) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r={r!r}: the LoRA rank must be a positive integer (the recipe uses 16)")
    if not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool) or lora_alpha <= 0:
        raise ValueError(f"lora_alpha={lora_alpha!r} must be a positive number (the recipe uses 16)")
    if not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout={lora_dropout!r} must be in [0, 1) (the recipe uses 0)")
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias={bias!r}: use 'none' (the recipe's value), 'all' or 'lora_only'")
    if not isinstance(use_rslora, bool):
        raise ValueError(f"use_rslora={use_rslora!r} must be True or False")


def _check_targets(model, target_modules) -> list[str]:
    import torch

    if target_modules is None or target_modules == "all-linear":
        target_modules = RECIPE_TARGETS
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    linear_names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            leaf = name.rsplit(".", 1)[-1]
            if leaf != "lm_head":
                linear_names.add(leaf)
    missing = [t for t in target_modules if t not in linear_names]
    if missing:
        raise ValueError(
            f"target_modules {missing} are not linear layers of this model; it has: {sorted(linear_names)}"
        )
    return list(dict.fromkeys(target_modules))


def attach_methods(model) -> None:
    """Adapt a LoRA model's own methods (bound per instance, PEFT class untouched): ``save_pretrained``
    keeps the embeddings out of the adapter, ``generate`` accepts a tokenizer's encoding. The recipe's
    export methods are bound above this layer (``hizli.api.attach_export_methods``)."""
    if hasattr(model, "peft_config") and getattr(model.save_pretrained, "__qualname__", None) != _SAVE_WRAPPER:
        original_save = model.save_pretrained

        def save_pretrained(save_directory, **kwargs):
            # PEFT's "auto" looks the base model's config up by name to see whether embeddings
            # changed, and warns when the name is not a folder or hub id (our embedded models);
            # hizli trains embeddings only through modules_to_save, which PEFT saves regardless.
            kwargs.setdefault("save_embedding_layers", False)
            return original_save(save_directory, **kwargs)

        model.save_pretrained = save_pretrained
    from hizli.models.inference import accept_encodings_in_generate

    accept_encodings_in_generate(model)


_SAVE_WRAPPER = f"{attach_methods.__qualname__}.<locals>.save_pretrained"


def lora_parameters(model) -> list:
    """The trainable parameters (LoRA A/B and anything in modules_to_save)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        _log.warn_once("no-trainable", "the model has no trainable parameters; did you call get_peft_model?")
    return params
