"""``SFTTrainer``: the recipe's trainer, as an explicit loop that reads top to bottom.

One optimizer step:
  1. take the step's micro-batches (``gradient_accumulation_steps`` of ``per_device_train_batch_size``
     rows; on the padding-free layout they may run as one), and count their trained tokens;
  2. for each: forward, summed token loss, backward of ``loss_sum / trained_tokens_of_the_step``;
  3. unscale (fp16), clip, check the loss and gradient norm are finite, step, schedule, zero;
  4. log, checkpoint, evaluate as the arguments say.
Because every micro-batch is divided by the same step-wide token count, 2 x 4 rows, 8 x 1 and
1 x 8 give the same update (see tests/train/test_train_accumulation.py).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from hizli import _log
from hizli.data.collate import DataCollatorForSeq2Seq, PaddingFreeCollator
from hizli.kernels import warmup
from hizli.train import checkpoint, memory, metrics, optim, step as step_mod
from hizli.train.args import TrainingArguments, _unknown_message
from hizli.models.checkpointing import apply_layer_modes
from hizli.train.batches import BatchPlan, Position
from hizli.train.memory_plan import plan_for, split_step


class NonFiniteLossError(RuntimeError):
    """The loss or gradient of a step was NaN/inf; the weights were not changed."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM: a checkpoint was saved (``.checkpoint``) and training stopped."""

    def __init__(self, message: str, checkpoint_path: Path | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint_path


@dataclass
class TrainOutput:
    """What ``train()`` returns; ``metrics["train_runtime"]`` as in transformers."""

    global_step: int
    training_loss: float
    metrics: dict[str, Any]
    memory: memory.MemoryReport | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)


class SFTTrainer:
    """Supervised fine-tuning of a (LoRA) model on chat data, taking the recipe's call as written.

    Args:
        model: from ``FastLanguageModel.get_peft_model`` (any transformers causal LM works).
        tokenizer: the tokenizer (``processing_class=`` is accepted too, as in newer TRL).
        train_dataset: rows with a text column (``dataset_text_field``), or conversations
            (``messages``/``conversations``), or already tokenized ``input_ids``/``labels``.
        args: ``TrainingArguments``.
        data_collator: the recipe's ``DataCollatorForSeq2Seq(tokenizer=...)``. hizli lays the same
            rows out without padding where that is faster (same loss); a collator that is not
            hizli's is used as given.
        dataset_text_field, max_seq_length, dataset_num_proc, packing: as in TRL's SFTTrainer.
        train_on: "all" tokens (the recipe's default) or "assistant" turns only (also reachable
            through ``train_on_responses_only(trainer)``).
    """

    def __init__(self, model=None, tokenizer=None, train_dataset=None, eval_dataset=None,
                 args: TrainingArguments | None = None, data_collator: Callable | None = None,
                 dataset_text_field: str | None = None, max_seq_length: int | None = None,
                 dataset_num_proc: int | None = None, packing: bool = False,
                 formatting_func: Callable | None = None, processing_class=None,
                 callbacks: list | None = None, train_on: str = "all", **unknown: Any) -> None:
        if unknown:
            raise TypeError(_unknown_message("SFTTrainer", list(unknown), set(_SFT_ARGS)))
        if model is None:
            raise ValueError("SFTTrainer needs model=...")
        self.tokenizer = tokenizer if tokenizer is not None else processing_class
        if self.tokenizer is None:
            raise ValueError("SFTTrainer needs tokenizer=... (or processing_class=...)")
        if args is not None and not isinstance(args, TrainingArguments):
            raise TypeError("args must be hizli.TrainingArguments (transformers' class has other defaults)")
        if train_on not in ("all", "assistant"):
            raise ValueError(f"train_on={train_on!r}: use 'all' or 'assistant'")
        self.model = model
        self.args = args or TrainingArguments()
        self.data_collator = data_collator
        self.packing = bool(packing)
        self.max_seq_length = int(max_seq_length or getattr(model, "max_seq_length", None) or 2048)
        self.dataset_num_proc = dataset_num_proc or 1
        self.dataset_text_field = dataset_text_field
        self.formatting_func = formatting_func
        self.train_on = train_on
        self.callbacks = list(callbacks or [])
        for cb in self.callbacks:
            if not callable(cb):
                raise TypeError(f"callbacks: {type(cb).__name__} is not callable. hizli calls each callback "
                                "with every optimizer step's metrics (a dict: step, loss, lr, tokens, ...)")
        self.recipe: dict[str, Any] | None = None  # set by `hizli train` to save beside outputs
        self.memory_plan: dict[str, Any] | None = None
        self._ce_chunk_rows: int | None = None  # rows per chunk of the fused loss (None: the kernel's choice)
        self.fused_cross_entropy = True  # False: the plain loss with all logits (a benchmark lever)
        self.keep_lora_copies = True  # False: cast the LoRA weights at every use (a benchmark lever)
        self.train_dataset = self._prepare(train_dataset, "train") if train_dataset is not None else None
        self.eval_dataset = self._prepare(eval_dataset, "eval") if eval_dataset is not None else None
        self.state: dict[str, Any] = {"global_step": 0, "log_history": []}
        self._stop_signal: str | None = None

    # ---------------------------------------------------------------- data
    def _prepare(self, dataset, split: str):
        from hizli.data import tokenize

        if isinstance(dataset, tokenize.TokenizedDataset):
            return dataset
        if self.formatting_func is not None:
            dataset = _apply_formatting(dataset, self.formatting_func)
            text_field = "text"
        else:
            text_field = self.dataset_text_field
        columns = _columns(dataset)
        if "input_ids" in columns:
            return tokenize.TokenizedDataset.from_rows(list(dataset), max_seq_length=self.max_seq_length)
        kw = dict(max_seq_length=self.max_seq_length, num_proc=self.dataset_num_proc, train_on=self.train_on,
                  bad_rows=self.args.bad_rows)
        if text_field is None and "text" in columns:
            text_field = "text"
        if text_field is not None:
            if text_field not in columns:
                raise ValueError(f"dataset_text_field={text_field!r} is not a column of the {split} "
                                 f"dataset; its columns are {sorted(columns)}")
            return tokenize.tokenize_dataset(dataset, self.tokenizer, text_field=text_field, **kw)
        for name in ("messages", "conversations"):
            if name in columns:
                from hizli.data.sharegpt import standardize_sharegpt

                return tokenize.tokenize_dataset(standardize_sharegpt(dataset), self.tokenizer,
                                                 messages_field=name, **kw)
        raise ValueError(f"the {split} dataset has columns {sorted(columns)}: pass dataset_text_field=..., or "
                         "give it a 'text', 'messages' or 'conversations' column, or 'input_ids'")

    def _collator(self) -> Callable:
        ours = self.data_collator is None or isinstance(self.data_collator, (DataCollatorForSeq2Seq,
                                                                            PaddingFreeCollator))
        if not ours:
            return self.data_collator  # a foreign collator is used exactly as given
        padding_free = self.args.padding_free
        if padding_free is None:
            padding_free = True  # identical loss, no compute on pads
        if self.packing or padding_free or isinstance(self.data_collator, PaddingFreeCollator):
            return PaddingFreeCollator(self.tokenizer)
        return self.data_collator or DataCollatorForSeq2Seq(self.tokenizer)

    # ---------------------------------------------------------------- training
    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainOutput:
        """Train for ``max_steps`` (or ``num_train_epochs``); see the module docstring."""
        from hizli.models.record import find_state

        record = find_state(self.model)
        try:
            return self._train(resume_from_checkpoint, record)
        finally:
            if record is not None:  # the copies follow this run's optimizer only: none outlive it
                record.compute_copies = None

    def _train(self, resume_from_checkpoint: str | bool | None, record) -> TrainOutput:
        args, model = self.args, self.model
        if self.train_dataset is None or len(self.train_dataset) == 0:
            report = getattr(self.train_dataset, "report", None)
            if report is not None and report.rows_in:  # rows came in, none has a label: refuse, say why
                raise ValueError(f"nothing to train on: none of the {report.rows_in} rows has a trained token "
                                 f"({report.summary()}). Every label is -100: check the labels, train_on / "
                                 "train_on_responses_only (does the chat template match?) and max_seq_length")
            raise ValueError("nothing to train on: train_dataset is empty (see the data report above)")
        self._check_token_ids(self.train_dataset, "train")
        if self.eval_dataset is not None:
            self._check_token_ids(self.eval_dataset, "eval")
        device = next(model.parameters()).device
        amp_dtype = self._precision(device)
        torch.manual_seed(args.seed)
        model.train()

        collate = self._collator()
        plan = BatchPlan(self.train_dataset.lengths, args.per_device_train_batch_size,
                         args.gradient_accumulation_steps, args.data_seed or args.seed,
                         packing=self.packing, max_seq_length=self.max_seq_length)
        total_steps = plan.total_steps(args.max_steps, args.num_train_epochs)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = optim.build_optimizer(params, args)
        if record is not None and self.keep_lora_copies:
            from hizli.models.lora_casts import ComputeCopies

            record.compute_copies = ComputeCopies()
            optimizer.register_step_post_hook(record.compute_copies.step_taken)
        warmup.wait()  # the background kernel compile holds some GPU memory: let it finish before planning
        parts = self._plan_memory(collate, plan, total_steps, params, amp_dtype)
        scheduler = optim.build_scheduler(optimizer, args, total_steps)
        scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

        position, start_step = Position(), 0
        resume = checkpoint.resolve(resume_from_checkpoint if resume_from_checkpoint is not None
                                    else args.resume_from_checkpoint, args.output_dir)
        if resume is not None:
            saved = checkpoint.load(resume, model, optimizer)
            scheduler.load_state_dict(saved["scheduler"])
            if scaler is not None and saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
            position = Position(**saved["position"])
            start_step = saved["global_step"]
            self.state["log_history"] = saved.get("log_history", [])
        self.state["global_step"] = start_step
        self._write_recipe()

        start_mem = memory.snapshot(device)
        _log.info(" ".join(start_mem.lines()))
        memory.reset_peak(device)
        log = metrics.RunLog(args.output_dir, total_steps, start_step, args.logging_steps, args.disable_tqdm)
        self._describe(log, plan, total_steps, collate, parts, amp_dtype, device)
        t_start = time.perf_counter()
        losses: list[float] = []
        trained_tokens = 0
        self._oom_retries = 0
        eval_points: list[tuple[int, float]] = []
        step_no = start_step
        restore_cap = _cap_allocator(device, args.max_memory_gib)
        try:
            with self._signals():
                for micro, _before, after in plan.steps(position):
                    if step_no >= total_steps:
                        break
                    t0 = time.perf_counter()
                    result, parts = self._step_or_replan(micro, parts, step_no + 1, optimizer, scheduler, scaler,
                                                         params, device, amp_dtype, collate, plan, total_steps)
                    step_no += 1
                    self.state["global_step"] = step_no
                    elapsed = time.perf_counter() - t0
                    if result is not None:
                        loss, grad_norm, tokens = result
                        losses.append(loss)
                        trained_tokens += tokens
                        entry = {"step": step_no, "loss": loss, "lr": scheduler.get_last_lr()[0],
                                 "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tokens / elapsed,
                                 "step_time_s": elapsed, "epoch": round(after.epoch + after.micro / max(
                                     1, len(plan.micro_batches(after.epoch))), 4),
                                 "peak_reserved_gib": _peak_gib(device)}
                        log.step(entry)
                        self.state["log_history"].append(entry)
                        for callback in self.callbacks:
                            callback(entry)
                    if self._should_eval(step_no, total_steps):
                        ev = self.evaluate()
                        eval_points.append((step_no, ev["eval_loss"]))
                        log.note(f"step {step_no}: eval_loss {ev['eval_loss']:.4f}")
                        self.state["log_history"].append({"step": step_no, **ev})
                    saving = args.save_strategy == "steps" and args.save_steps and step_no % args.save_steps == 0
                    if saving or self._stop_signal:
                        path = self._save_checkpoint(step_no, after, optimizer, scheduler, scaler)
                        if self._stop_signal:
                            raise TrainingInterrupted(
                                f"{self._stop_signal} at step {step_no}: checkpoint saved to {path}. Resume "
                                f"with `hizli train RECIPE --resume` or trainer.train(resume_from_checkpoint=True)",
                                path)
        finally:
            restore_cap()
            log.close()
        runtime = time.perf_counter() - t_start
        report = memory.finish(start_mem, runtime)
        metrics.plot_loss(args.output_dir, eval_points)
        out = {
            "train_runtime": round(runtime, 4),
            "train_loss": float(sum(losses) / len(losses)) if losses else float("nan"),
            "train_steps_per_second": round(len(losses) / runtime, 4) if runtime else 0.0,
            "train_samples_per_second": round(len(losses) * args.train_batch_rows / runtime, 4) if runtime else 0.0,
            "train_tokens_per_second": round(trained_tokens / runtime, 2) if runtime else 0.0,
            "peak_reserved_gib": report.figures()["peak_reserved_gib"],
            "total_steps": step_no,
            "epoch": step_no / max(1, plan.steps_per_epoch()),
        }
        if eval_points:
            out["eval_loss"] = eval_points[-1][1]
        return TrainOutput(step_no, out["train_loss"], out, report, self.state["log_history"])

    def _step_or_replan(self, micro, parts, step_no, optimizer, scheduler, scaler, params, device, amp_dtype,
                        collate, plan, total_steps):
        """One optimizer step. Out of GPU memory, nothing has been updated yet: with a memory plan and
        retries left, plan again for 3/4 of the budget and repeat the step; else explain and stop.
        Returns the step's result and the (possibly new) micro-batch count."""
        while True:
            lengths = self.train_dataset.lengths
            budget = self.memory_plan["tokens_per_micro_batch"] if self.memory_plan and parts != 1 else None
            groups = micro if parts is None else split_step(sum(micro, []), lengths, parts, budget)
            batches = [collate([self.train_dataset[i] for i in rows]) for rows in groups]
            try:
                return self._optimizer_step(batches, micro, step_no, optimizer, scheduler, scaler, params, device,
                                            amp_dtype), parts
            except torch.OutOfMemoryError as e:
                from hizli.train import oom

                optimizer.zero_grad(set_to_none=True)  # free the step's gradients before measuring
                e.__traceback__ = None  # its frames hold the step's activations: let them go too
                del batches
                if self.memory_plan is None or self._oom_retries >= self.args.oom_retries:
                    raise oom.explain(e, device=device, args=self.args, model=self.model, step=step_no,
                                      max_seq_length=self.max_seq_length, longest_row=max(lengths),
                                      memory_plan=self.memory_plan) from None
                self._oom_retries += 1
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                smaller = 0.75 * self.memory_plan["budget_gib"]
                _log.warn_once(f"oom-retry-{self._oom_retries}",
                               f"step {step_no} ran out of memory; planning again for {smaller:.2f} GiB and "
                               f"repeating the step (retry {self._oom_retries} of {self.args.oom_retries})")
                parts = self._plan_memory(collate, plan, total_steps, params, amp_dtype, budget_gib=smaller)

    def _optimizer_step(self, batches, micro, step_no, optimizer, scheduler, scaler, params, device, amp_dtype):
        """Steps 2-3 of the module docstring. Returns (loss, grad_norm, tokens) or None if skipped."""
        moved = [step_mod.to_device(b, device) for b in batches]
        n_trained = sum(b.n_trained for b in moved)
        tokens = sum(b.n_tokens for b in moved)
        if n_trained == 0:
            _log.warn_once("empty-step", f"step {step_no}: no trained token in its rows; skipped")
            return None
        total = torch.zeros((), dtype=torch.float32, device=device)
        autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
        for b in moved:
            with autocast:
                loss_sum = step_mod.loss_sum(self.model, b, ce_chunk_rows=self._ce_chunk_rows,
                                             fused=self.fused_cross_entropy)
            scaled = loss_sum / n_trained
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            total += loss_sum.detach().float()
        if scaler is not None:
            scaler.unscale_(optimizer)
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        loss = total / n_trained
        loss_value, norm_value = float(loss), float(grad_norm)  # the step's one host sync
        if not math.isfinite(loss_value) or (not math.isfinite(norm_value) and scaler is None):
            optimizer.zero_grad(set_to_none=True)
            rows = sorted(sum(micro, []))
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            where = self.train_dataset.describe_rows(rows) if hasattr(self.train_dataset, "describe_rows") else \
                f"rows {rows[:20]}{' ...' if len(rows) > 20 else ''}"
            message = (f"step {step_no}: the {what} is {loss_value if what == 'loss' else norm_value} "
                       f"({where}); the weights were not changed")
            if self.args.nan_policy == "stop":
                raise NonFiniteLossError(message + ". Lower learning_rate, check these rows, or set "
                                                   "nan_policy='skip'")
            _log.warn_once(f"nan-{step_no}", message + "; step skipped (nan_policy='skip')")
            scheduler.step()
            return None
        if scaler is not None:
            scaler.step(optimizer)  # skips the update itself if fp16 gradients overflowed
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value, tokens

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss per trained token over the eval set."""
        if self.eval_dataset is None:
            raise ValueError("evaluate() needs eval_dataset=...")
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        amp = self._precision(device, quiet=True)
        collate = self._collator()
        n = len(self.eval_dataset)
        bs = self.args.per_device_eval_batch_size
        total, count = 0.0, 0
        for i in range(0, n, bs):
            b = step_mod.to_device(collate([self.eval_dataset[j] for j in range(i, min(n, i + bs))]), device)
            with torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext():
                total += float(step_mod.loss_sum(model, b))
            count += b.n_trained
        if was_training:
            model.train()
        return {"eval_loss": total / max(1, count), "eval_tokens": count}

    def _check_token_ids(self, dataset, split: str) -> None:
        """Ids past the embedding table would fail deep inside the first forward: name the row now."""
        import numpy as np

        embeddings = self.model.get_input_embeddings()
        vocab = getattr(embeddings, "num_embeddings", None)
        ids = getattr(dataset, "_ids", None)
        if vocab is None or ids is None or len(ids) == 0:
            return
        bad = np.flatnonzero((ids >= vocab) | (ids < 0))
        if bad.size:
            position = int(bad[0])
            row = int(np.searchsorted(dataset._offsets, position, side="right") - 1)
            raise ValueError(f"{split} row {row} has token id {int(ids[position])}, outside this model's vocabulary "
                             f"of {vocab} tokens: the data was tokenized with another tokenizer")

    def _should_eval(self, step_no: int, total: int) -> bool:
        if self.eval_dataset is None or self.args.eval_strategy == "no":
            return False
        every = self.args.eval_steps or self.args.logging_steps
        return step_no % every == 0 or step_no == total

    # ---------------------------------------------------------------- helpers
    def _precision(self, device: torch.device, quiet: bool = False):
        a = self.args
        if device.type != "cuda":
            if (a.fp16 or a.bf16) and not quiet:
                _log.warn_once("cpu-precision", f"{'fp16' if a.fp16 else 'bf16'}=True was asked for, but there is "
                                                "no GPU: training in the model's own precision on the CPU "
                                                "(float32 by default)")
            return None
        if a.bf16:
            if not torch.cuda.is_bf16_supported():
                raise ValueError("bf16=True but this GPU has no bfloat16; set fp16=True instead")
            return torch.bfloat16
        if a.fp16:
            return torch.float16
        return None  # neither asked for: no autocast, as in transformers

    def _plan_memory(self, collate, plan: BatchPlan, total_steps: int, params, amp_dtype,
                     budget_gib: float | None = None) -> int | None:
        """How many micro-batches each step runs as (None: the recipe's own micro-batches), and
        what each layer keeps for backward; see ``hizli.train.memory_plan``. ``budget_gib``
        overrides ``max_memory_gib`` (the retry after an out-of-memory error uses it)."""
        budget_gib = budget_gib or self.args.max_memory_gib
        merge = self.args.merge_micro_batches
        padding_free = isinstance(collate, PaddingFreeCollator)
        if merge and not padding_free:
            raise ValueError("merge_micro_batches=True needs the padding-free layout (padding_free=True)")
        if not padding_free or merge is False:
            self.memory_plan = None
            return None
        if not next(self.model.parameters()).is_cuda and not budget_gib:
            # On a CPU memory is plentiful but fresh memory is slow: keeping every activation ran at
            # 52 tokens/s against 75-91 recomputing (SmolLM2-135M, NF4, 1,442 tokens, 2 cores), so
            # without a cap layers keep what use_gradient_checkpointing asked for, one batch a step.
            self.memory_plan = None
            return 1
        steps, epoch = [], 0
        while len(steps) < total_steps and epoch < 3:  # the longest step of the epochs this run sees
            groups = plan.micro_batches(epoch)
            ga = plan.grad_accum
            steps += [sum(groups[i:i + ga], []) for i in range(0, len(groups), ga)]
            epoch += 1
        n_params = sum(p.numel() for p in params)
        optimizer_bytes = n_params * (4 + (2 if self.args.optim.endswith("8bit") else 8))
        elt = 2 if amp_dtype in (torch.float16, torch.bfloat16) else next(p for p in params).element_size()
        memory_plan = plan_for(self.model, steps=steps[:max(total_steps, 1)], lengths=self.train_dataset.lengths,
                               budget_gib=budget_gib, allocator_capped=bool(self.args.max_memory_gib), amp_elt=elt,
                               optimizer_bytes=optimizer_bytes)
        if merge:  # asked for one micro-batch per step: keep the layer modes, force the count
            memory_plan.micro_batches = 1
        apply_layer_modes(self.model, memory_plan.layer_modes)
        if next(self.model.parameters()).is_cuda:
            self._ce_chunk_rows = memory_plan.ce_chunk_rows
        self.memory_plan = memory_plan.to_dict()
        _log.info(memory_plan.describe())
        for note in memory_plan.notes:
            _log.warn_once(f"plan-{note}", note)
        return memory_plan.micro_batches

    def _save_checkpoint(self, step_no: int, after: Position, optimizer, scheduler, scaler) -> Path:
        state = {
            "global_step": step_no,
            "position": {"epoch": after.epoch, "micro": after.micro},
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "log_history": self.state["log_history"],
            "args": {k: v for k, v in self.args.to_dict().items() if _jsonable(v)},
        }
        return checkpoint.save(self.args.output_dir, step_no, self.model, optimizer, state,
                               self.args.save_total_limit)

    def _write_recipe(self) -> None:
        import yaml

        out = Path(self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        recipe = self.recipe or self._recipe_from_objects()
        tmp = out / "recipe.yaml.tmp"
        tmp.write_text(yaml.safe_dump(recipe, sort_keys=False))
        os.replace(tmp, out / "recipe.yaml")

    def _recipe_from_objects(self) -> dict[str, Any]:
        from hizli.models.record import find_state

        record = find_state(self.model)
        info = record.info if record is not None else None
        return {
            "model": {"name": info.source if info else None, "max_seq_length": self.max_seq_length,
                      "dtype": info.dtype if info else None,
                      "load_in_4bit": info.load_in_4bit_requested if info else None},
            "lora": record.lora if record is not None else None,
            "data": {"dataset_text_field": self.dataset_text_field, "packing": self.packing,
                     "train_on": self.train_on, "rows": len(self.train_dataset) if self.train_dataset else 0},
            "train": {k: v for k, v in self.args.to_dict().items() if _jsonable(v)},
        }

    def _describe(self, log, plan, total_steps, collate, parts, amp_dtype, device) -> None:
        layout = getattr(collate, "layout", type(collate).__name__)
        how = "" if parts is None else (f" (each step's rows run as up to {parts} micro-batches)" if parts > 1
                                        else " (each step's rows run as 1 micro-batch)")
        log.note(f"hizli: {len(self.train_dataset)} rows, {total_steps} steps of "
                 f"{self.args.per_device_train_batch_size} x {self.args.gradient_accumulation_steps} rows, "
                 f"layout {layout}{how}, "
                 f"precision {str(amp_dtype).replace('torch.', '') if amp_dtype else 'model dtype'}, on {device}")

    @contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM finish the current step, save a checkpoint and stop; a second one kills."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self._stop_signal:  # second signal: stop now
                signal.signal(signum, previous[signum] if callable(previous[signum]) else signal.SIG_DFL)
                raise KeyboardInterrupt
            self._stop_signal = name
            print(f"\nhizli: {name}: finishing this step, then saving a checkpoint (again to stop at once)",
                  flush=True)

        for s in previous:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            self._stop_signal = None

    def save_model(self, output_dir: str | None = None) -> None:
        out = output_dir or self.args.output_dir
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)


_SFT_ARGS = ("model", "tokenizer", "train_dataset", "eval_dataset", "args", "data_collator", "dataset_text_field",
             "max_seq_length", "dataset_num_proc", "packing", "formatting_func", "processing_class", "callbacks",
             "train_on")


def _peak_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
    return round(memory.snapshot("cpu").reserved_gib, 3)


def _cap_allocator(device, max_memory_gib: float | None):
    """Make ``max_memory_gib`` a hard limit for PyTorch's CUDA allocator while training; returns the
    function that puts the previous limit back.

    Capped, the allocator frees its cached blocks and retries before it would reserve more than the
    cap (and raises out-of-memory only if the live tensors themselves do not fit), so fragmentation
    cannot push the reserved peak over what the user allowed.
    """
    if not max_memory_gib or device.type != "cuda":
        return lambda: None
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    previous = getter(index) if getter is not None else 1.0
    torch.cuda.set_per_process_memory_fraction(min(previous, max_memory_gib * 1024**3 / total), index)
    return lambda: torch.cuda.set_per_process_memory_fraction(previous, index)


def _jsonable(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, list, dict))


def _columns(dataset) -> set[str]:
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return set(names)
    if isinstance(dataset, (list, tuple)):
        return set(dataset[0]) if dataset else set()
    raise TypeError(f"train_dataset of type {type(dataset).__name__}: pass a datasets.Dataset or a list of dicts")


def _apply_formatting(dataset, fn):
    rows = list(dataset)
    texts = []
    for row in rows:
        out = fn(row)
        texts.append(out[0] if isinstance(out, list) and len(out) == 1 else out)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("formatting_func must return a string for each row")
    return [{"text": t} for t in texts]
