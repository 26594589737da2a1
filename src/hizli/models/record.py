"""``model.hizli``: the one record hizli keeps on a model it loaded or prepared.

transformers and PEFT own the model object; hizli adds a single attribute to it, this typed record,
instead of scattering its own attributes over the model, its modules and its parameters. Loading
creates it on the ``*ForCausalLM``; a PEFT wrapper made later forwards ``peft_model.hizli`` to that
same record, so both views read and write one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hizli.models.loader import LoadInfo
    from hizli.kernels.lora_casts import ComputeCopies
    from hizli.models.layer_graphs import LayerGraphs

ATTRIBUTE = "hizli"


@dataclass
class HizliState:
    """What hizli knows about one model.

    Attributes:
        info: how ``load`` loaded it (source, kind, dtype, device, 4-bit); None for a model hizli
            did not load.
        load_seconds: where loading went, by phase (shown by ``hizli bench``).
        fused_ops: modules routed through hizli's kernels by ``use_fused_ops``, counted by kind.
        lora: the ``get_peft_model`` arguments (saved with the recipe beside a run's outputs).
        checkpointing: the mode every layer got from ``use_gradient_checkpointing``: "off",
            "recompute" or "offload".
        layer_modes: each decoder layer's current mode ("keep", "recompute" or "offload").
        allowed_modes: the modes a memory plan may choose per layer (None until ``get_peft_model``
            chose checkpointing).
        compute_copies: the LoRA weights' compute-dtype copies while hizli's trainer runs (see
            ``lora_casts``); None otherwise, and then the fused layers cast at every use.
        defer_offloaded_mlp: offloaded layers run their fused MLP in slices on the first pass and
            only in backward when recomputed (``lora_mlp``'s ``in_pieces`` and ``output_unread``),
            and the memory plan counts their smaller peak. Off by default: its speed under a cap is
            not yet measured (``SFTTrainer.defer_offloaded_mlp``, bench lever ``defer_mlp``).
        layer_graphs: CUDA graphs of the offloaded layers (first pass, recompute and backward) while
            hizli's trainer runs with ``SFTTrainer.graph_offloaded_layers``
            (``hizli.models.layer_graphs``); None otherwise.
    """

    info: LoadInfo | None = None
    load_seconds: dict[str, float] = field(default_factory=dict)
    fused_ops: dict[str, int] = field(default_factory=dict)
    lora: dict[str, Any] | None = None
    checkpointing: str = "off"
    layer_modes: list[str] = field(default_factory=list)
    allowed_modes: tuple[str, ...] | None = None
    compute_copies: ComputeCopies | None = field(default=None, repr=False)
    defer_offloaded_mlp: bool = False
    layer_graphs: LayerGraphs | None = field(default=None, repr=False)


def find_state(model: Any) -> HizliState | None:
    """``model``'s record, through a PEFT wrapper too; None when hizli never touched it."""
    state = getattr(model, ATTRIBUTE, None)
    if state is None and hasattr(model, "get_base_model"):
        state = getattr(model.get_base_model(), ATTRIBUTE, None)
    return state if isinstance(state, HizliState) else None


def state_of(model: Any) -> HizliState:
    """``model``'s record, made (on the innermost model, where a PEFT wrapper finds it) if missing."""
    state = find_state(model)
    if state is None:
        state = HizliState()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        setattr(base, ATTRIBUTE, state)
    return state


def load_info(model: Any) -> LoadInfo | None:
    """How hizli loaded ``model`` (None for a model it did not load)."""
    state = find_state(model)
    return state.info if state is not None else None
