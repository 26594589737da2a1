"""``TrainingArguments``: the recipe's fields, with transformers' names and meanings, validated up front."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
OPTIMIZERS = ("adamw_8bit", "adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "sgd")


@dataclass
class TrainingArguments:
    """Training settings. Field names and defaults follow ``transformers.TrainingArguments`` where
    both have the field; the recipe's values are in ``configs/reference.yaml``.

    hizli-only fields: ``padding_free`` (None = auto: lay batches out as one row without padding),
    ``merge_micro_batches`` (None = auto: run the micro-batches of one optimizer step as one when
    memory allows; exact, since the loss is normalised per optimizer step), ``fused_cross_entropy``
    (False computes the loss from full logits: the same loss, more memory; for comparisons), ``max_memory_gib``
    (cap for the memory plan, in GiB; on a GPU also a hard limit on PyTorch's allocator while
    training, lifted afterwards; on a CPU the plan is used only when a cap is given), ``nan_policy``
    ("stop" or "skip" a step whose loss or gradient is not finite), ``bad_rows`` ("error" or "skip"
    unusable data rows), ``oom_retries`` (how often a step that runs out of GPU memory is planned
    again for 3/4 of the budget and repeated; 0 stops at the first one, with an explanation).

    Several processes (torchrun): ``parallel`` ("ddp": every rank holds the whole model; "fsdp": the
    frozen base weights are sharded over the ranks, FSDP2), ``keep_global_batch`` (divide
    ``gradient_accumulation_steps`` by the number of ranks, so a recipe makes the same optimizer
    steps on 1 or N processes; otherwise a step holds batch x accumulation x ranks rows, as in
    transformers), ``reshard`` (allow resuming a checkpoint written by another number of ranks).
    """

    output_dir: str = "outputs"
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    num_train_epochs: float = 3.0
    max_steps: int = -1
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    logging_steps: int = 1
    save_strategy: str = "steps"
    save_steps: int = 500
    save_total_limit: int | None = None
    eval_strategy: str = "no"
    eval_steps: int | None = None
    seed: int = 42
    data_seed: int | None = None
    fp16: bool = False
    bf16: bool = False
    optim: str = "adamw_8bit"
    report_to: Any = "none"
    run_name: str | None = None
    logging_dir: str | None = None
    disable_tqdm: bool = False
    dataloader_num_workers: int = 0
    resume_from_checkpoint: str | bool | None = None
    # hizli-only
    padding_free: bool | None = None
    merge_micro_batches: bool | None = None
    max_memory_gib: float | None = None
    fused_cross_entropy: bool = True
    nan_policy: str = "stop"
    bad_rows: str = "error"
    oom_retries: int = 2
    parallel: str = "ddp"
    keep_global_batch: bool = False
    reshard: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __init__(self, **kwargs: Any) -> None:
        names = {f.name for f in dataclasses.fields(self) if f.name != "extra"}
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            raise TypeError(_unknown_message("TrainingArguments", unknown, names))
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            setattr(self, f.name, kwargs.get(f.name, default))
        self.extra = {}
        self.validate()

    def validate(self) -> None:
        """Raise one ValueError listing every problem (not just the first)."""
        problems = validate_fields(self)
        if problems:
            raise ValueError("invalid TrainingArguments:\n  - " + "\n  - ".join(problems))

    @property
    def train_batch_rows(self) -> int:
        """Rows per optimizer step (per device)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    def accumulation(self, world_size: int) -> int:
        """Micro-batches each rank runs per optimizer step on ``world_size`` ranks."""
        if not self.keep_global_batch or world_size == 1:
            return self.gradient_accumulation_steps
        if self.gradient_accumulation_steps % world_size:
            raise ValueError(
                f"keep_global_batch: gradient_accumulation_steps={self.gradient_accumulation_steps} cannot "
                f"be divided by {world_size} ranks; use a multiple of {world_size}, or leave "
                "keep_global_batch off (a step then holds batch x accumulation x ranks rows)"
            )
        return self.gradient_accumulation_steps // world_size

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}


def validate_fields(a: TrainingArguments) -> list[str]:
    problems: list[str] = []

    def positive_int(name: str, allow_zero: bool = False) -> None:
        v = getattr(a, name)
        ok = isinstance(v, int) and not isinstance(v, bool) and (v >= 0 if allow_zero else v > 0)
        if not ok:
            problems.append(f"{name}={v!r} must be an integer {'>= 0' if allow_zero else '> 0'}")

    for name in (
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
    ):
        positive_int(name)
    for name in ("warmup_steps", "save_steps", "dataloader_num_workers", "oom_retries"):
        positive_int(name, allow_zero=True)
    if not isinstance(a.max_steps, int) or isinstance(a.max_steps, bool) or a.max_steps == 0 or a.max_steps < -1:
        problems.append(f"max_steps={a.max_steps!r} must be a positive integer, or -1 to use num_train_epochs")
    if a.max_steps == -1 and not (isinstance(a.num_train_epochs, (int, float)) and a.num_train_epochs > 0):
        problems.append(f"num_train_epochs={a.num_train_epochs!r} must be > 0 when max_steps is -1")
    for name in ("learning_rate",):
        v = getattr(a, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            problems.append(f"{name}={v!r} must be a number > 0 (the recipe uses 2e-4)")
    for name in ("weight_decay", "max_grad_norm", "adam_epsilon"):
        v = getattr(a, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            problems.append(f"{name}={v!r} must be a number >= 0")
    for name in ("adam_beta1", "adam_beta2"):
        v = getattr(a, name)
        if not isinstance(v, (int, float)) or not 0 <= v < 1:
            problems.append(f"{name}={v!r} must be in [0, 1)")
    if not isinstance(a.warmup_ratio, (int, float)) or not 0 <= a.warmup_ratio < 1:
        problems.append(f"warmup_ratio={a.warmup_ratio!r} must be in [0, 1)")
    if a.lr_scheduler_type not in SCHEDULERS:
        problems.append(f"lr_scheduler_type={a.lr_scheduler_type!r}: use one of {', '.join(SCHEDULERS)}")
    if a.optim not in OPTIMIZERS:
        problems.append(f"optim={a.optim!r}: use one of {', '.join(OPTIMIZERS)}")
    if a.fp16 and a.bf16:
        problems.append(
            "fp16=True and bf16=True together: choose one (the recipe sets "
            "fp16=not is_bfloat16_supported(), bf16=is_bfloat16_supported())"
        )
    if a.save_strategy not in ("steps", "no", "epoch"):
        problems.append(f"save_strategy={a.save_strategy!r}: use 'steps', 'epoch' or 'no'")
    if a.eval_strategy not in ("no", "steps", "epoch"):
        problems.append(f"eval_strategy={a.eval_strategy!r}: use 'no', 'steps' or 'epoch'")
    if a.eval_steps is not None and (not isinstance(a.eval_steps, int) or a.eval_steps <= 0):
        problems.append(f"eval_steps={a.eval_steps!r} must be a positive integer or None")
    if a.save_total_limit is not None and (not isinstance(a.save_total_limit, int) or a.save_total_limit < 1):
        problems.append(f"save_total_limit={a.save_total_limit!r} must be a positive integer or None")
    if a.nan_policy not in ("stop", "skip"):
        problems.append(f"nan_policy={a.nan_policy!r}: use 'stop' or 'skip'")
    if a.bad_rows not in ("error", "skip"):
        problems.append(f"bad_rows={a.bad_rows!r}: use 'error' or 'skip'")
    if a.max_memory_gib is not None and not (isinstance(a.max_memory_gib, (int, float)) and a.max_memory_gib > 0):
        problems.append(f"max_memory_gib={a.max_memory_gib!r} must be a number > 0 or None")
    if a.parallel not in ("ddp", "fsdp"):
        problems.append(f"parallel={a.parallel!r}: use 'ddp' (data parallel) or 'fsdp' (sharded base weights)")
    if a.report_to not in ("none", None, [], ["none"]):
        problems.append(f"report_to={a.report_to!r}: hizli writes OUTPUT_DIR/metrics.jsonl; use report_to='none'")
    return problems


def _unknown_message(owner: str, unknown: list[str], valid: set[str]) -> str:
    parts = []
    for k in unknown:
        near = difflib.get_close_matches(k, valid, n=1)
        parts.append(f"'{k}'" + (f" (did you mean '{near[0]}'?)" if near else ""))
    return f"{owner} got unknown argument(s): {', '.join(parts)}"
