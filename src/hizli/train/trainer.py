"""``SFTTrainer``: the recipe's trainer, as an explicit loop that reads top to bottom.

One optimizer step:
  1. take the step's micro-batches (``gradient_accumulation_steps`` of ``per_device_train_batch_size``
     rows; on the padding-free layout they may run as one), and count their trained tokens;
  2. for each: forward, summed token loss, backward of ``loss_sum / trained_tokens_of_the_step``;
  3. unscale (fp16), clip, check the loss and gradient norm are finite, step, schedule, zero;
  4. log, checkpoint, evaluate as the arguments say.
Because every micro-batch is divided by the same step-wide token count, 2 x 4 rows, 8 x 1 and
1 x 8 give the same update (see tests/train/test_train_accumulation.py). Steps 2-3 live in
``hizli.train.context``; fitting them into memory in ``hizli.train.step_memory``. Where the loop
counts, logs or saves across processes, it goes through ``self.ranks`` (``hizli.train.ranks``).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from hizli import _log
from hizli.models import warmup
from hizli.models.layer_graphs import BUCKETS_PER_DOUBLING
from hizli.train import checkpoint, memory, metrics, optim, runs
from hizli.train.allocator import cap_allocator, peak_gib
from hizli.train.args import TrainingArguments, _unknown_message
from hizli.train.batches import BatchPlan, Position
from hizli.train.context import NonFiniteLossError, StepContext, autocast_dtype
from hizli.train.evaluate import eval_due
from hizli.train.prepare import DataSettings, check_trainable, choose_collator, prepare_dataset
from hizli.train.ranks import Ranks
from hizli.train.recipe_file import jsonable, recipe_from_objects, write_recipe
from hizli.train.signals import StopSignals, TrainingInterrupted
from hizli.train.step_memory import StepMemory, plan_memory, step_or_replan

__all__ = ["SFTTrainer", "TrainOutput", "NonFiniteLossError", "TrainingInterrupted"]


@dataclass
class TrainOutput:
    """What ``train()`` returns; ``metrics["train_runtime"]`` as in transformers."""

    global_step: int
    training_loss: float
    metrics: dict[str, Any]
    memory: memory.MemoryReport | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)
    start_step: int = 0  # the resumed checkpoint's step (== global_step when nothing was left to train)


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

    def __init__(
        self,
        model=None,
        tokenizer=None,
        train_dataset=None,
        eval_dataset=None,
        *,
        args: TrainingArguments | None = None,
        data_collator: Callable | None = None,
        dataset_text_field: str | None = None,
        max_seq_length: int | None = None,
        dataset_num_proc: int | None = None,
        packing: bool = False,
        formatting_func: Callable | None = None,
        processing_class=None,
        callbacks: list | None = None,
        train_on: str = "all",
        **unknown: Any,
    ) -> None:
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
                raise TypeError(
                    f"callbacks: {type(cb).__name__} is not callable. hizli calls each callback "
                    "with every optimizer step's metrics (a dict: step, loss, lr, tokens, ...)"
                )
        self.recipe: dict[str, Any] | None = None  # set by `hizli train` to save beside outputs
        self.memory_plan: dict[str, Any] | None = None  # the plan of the last train() call, as a dict
        self._ce_chunk_rows: int | None = None
        self.ranks = Ranks.current()
        self.stop_signals = StopSignals()
        self.keep_lora_copies = True  # False: cast the LoRA weights at every use (a benchmark lever)
        # padding-free micro-batches padded to repeating lengths: None on a GPU under a memory plan,
        # True / False always / never (a benchmark lever; see hizli.data.collate)
        self.token_buckets: bool | None = None
        # offloaded layers' MLP in slices, and only in backward when recomputed (hizli.models.record)
        self.defer_offloaded_mlp = False
        # offloaded layers' first pass and backward replayed as CUDA graphs (hizli.models.layer_graphs)
        self.graph_offloaded_layers = False
        # of the last train() with graphs: graphs, replays, eager calls, why they failed, the pool's GiB
        self.layer_graph_counts: dict[str, Any] | None = None
        self.train_dataset = self._prepare(train_dataset, "train") if train_dataset is not None else None
        self.eval_dataset = self._prepare(eval_dataset, "eval") if eval_dataset is not None else None
        self.state: dict[str, Any] = {"global_step": 0, "log_history": []}
        self._run: dict[str, Any] | None = None  # the run being trained (hizli.train.runs)

    # ---------------------------------------------------------------- data
    def _prepare(self, dataset, split: str):
        settings = DataSettings(
            max_seq_length=self.max_seq_length,
            num_proc=self.dataset_num_proc,
            text_field=self.dataset_text_field,
            formatting_func=self.formatting_func,
            train_on=self.train_on,
            bad_rows=self.args.bad_rows,
        )
        return prepare_dataset(dataset, self.tokenizer, settings, split)

    def _collator(self) -> Callable:
        return choose_collator(
            self.data_collator, self.tokenizer, packing=self.packing, padding_free=self.args.padding_free
        )

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
                graphs = record.layer_graphs
                if graphs is not None:  # nor do the graphs and their memory
                    from hizli.models.checkpointing import apply_layer_modes

                    self.layer_graph_counts = {
                        "graphs": len(graphs.graphs),
                        "replays": graphs.replays,
                        "eager": graphs.eager,
                        "failed": graphs.failed,
                        "pool_gib": graphs.pool_gib(),
                    }
                    record.layer_graphs = None
                    if record.layer_modes:  # the layers' checkpoint functions hold the graphs too
                        apply_layer_modes(self.model, record.layer_modes)

    def _train(self, resume_from_checkpoint: str | bool | None, record: Any) -> TrainOutput:
        args = self.args
        check_trainable(self.model, self.train_dataset, self.eval_dataset)
        ctx, plan, total_steps = self._start(record)
        step_memory = self._plan_memory(ctx, plan, total_steps)

        position, start_step = Position(), 0
        recipe = self.recipe or self._recipe_from_objects()
        self._run = runs.new_run(recipe)  # recorded in every checkpoint of this run
        resume = checkpoint.resolve(
            resume_from_checkpoint if resume_from_checkpoint is not None else args.resume_from_checkpoint,
            args.output_dir,
        )
        if resume is not None:
            saved = checkpoint.load(
                resume,
                self.model,
                ctx.optimizer,  # refuses another recipe's checkpoint
                check_state=partial(self._check_resumable, recipe=recipe, path=resume),
            )
            _log.info(runs.resume_message(resume, saved, total_steps))
            self._run = saved["run"]
            ctx.scheduler.load_state_dict(saved["scheduler"])
            if ctx.scaler is not None and saved.get("scaler"):
                ctx.scaler.load_state_dict(saved["scaler"])
            position = Position(**saved["position"])
            start_step = saved["global_step"]
            self.state["log_history"] = saved.get("log_history", [])
        elif self.ranks.is_main:
            runs.set_aside_earlier_run(args.output_dir)
        self.ranks.barrier()  # no rank looks at output_dir while rank 0 sets an earlier run aside
        self.state["global_step"] = start_step
        if self.ranks.is_main:
            write_recipe(args.output_dir, recipe)

        start_mem = memory.snapshot(ctx.device)  # memory_report() prints it; `hizli train` too
        memory.reset_peak(ctx.device)
        log = metrics.RunLog(
            args.output_dir,
            total_steps,
            start_step,
            args.logging_steps,
            args.disable_tqdm,
            history=self.state["log_history"] if resume is not None else None,
            writes=self.ranks.is_main,
        )
        log.note(
            metrics.run_summary(
                rows=len(self.train_dataset),
                total_steps=total_steps,
                batch=(args.per_device_train_batch_size, args.accumulation(self.ranks.world_size)),
                world_size=self.ranks.world_size,
                layout=getattr(ctx.collate, "layout", type(ctx.collate).__name__),
                parts=step_memory.parts,
                amp_dtype=ctx.amp_dtype,
                device=ctx.device,
            )
        )
        t_start = time.perf_counter()
        losses: list[float] = []
        trained_tokens = 0
        eval_points: list[tuple[int, float]] = []
        step_no = start_step
        restore_cap = cap_allocator(ctx.device, args.max_memory_gib)
        replan = partial(self._plan_memory, ctx, plan, total_steps)
        try:
            with self.stop_signals:
                for micro, _before, after in plan.steps(position):
                    if step_no >= total_steps:
                        break
                    t0 = time.perf_counter()
                    result, step_memory = step_or_replan(ctx, step_memory, micro, step_no + 1, replan)
                    step_no += 1
                    self.state["global_step"] = step_no
                    elapsed = time.perf_counter() - t0
                    if result is not None:
                        losses.append(result.loss)
                        trained_tokens += result.tokens
                        self._log_step(
                            log, ctx, plan=plan, step_no=step_no, after=after, result=result, elapsed=elapsed
                        )
                    epoch_end = after.micro >= len(plan.micro_batches(after.epoch))
                    if self.eval_dataset is not None and eval_due(args, step_no, total_steps, epoch_end):
                        ev = {"step": step_no, **self.evaluate()}
                        eval_points.append((step_no, ev["eval_loss"]))
                        log.eval(ev)
                        self.state["log_history"].append(ev)
                    if checkpoint.save_due(args, step_no, total_steps) or self.stop_signals.requested:
                        path = self._save_checkpoint(ctx, step_no, after)
                        if self.stop_signals.requested:
                            raise TrainingInterrupted(
                                f"{self.stop_signals.requested} at step {step_no}: checkpoint saved to {path}. "
                                "Resume with `hizli train RECIPE --resume` or "
                                "trainer.train(resume_from_checkpoint=True)",
                                path,
                            )
        finally:
            restore_cap()
            log.close()
        runtime = time.perf_counter() - t_start
        report = memory.finish(start_mem, runtime)
        if self.ranks.grouped:
            report.rank_peaks_gib = self.ranks.gather(round(report.peak_gib, 3))
        if self.ranks.is_main:
            metrics.plot_loss(args.output_dir, eval_points)
        out = metrics.train_metrics(
            losses=losses,
            trained_tokens=trained_tokens,
            runtime=runtime,
            rows_per_step=plan.batch_size * plan.grad_accum,
            peak_reserved_gib=report.figures()["peak_reserved_gib"],
            total_steps=step_no,
            epoch=step_no / max(1, plan.steps_per_epoch()),
            history=self.state["log_history"],
        )
        return TrainOutput(step_no, out["train_loss"], out, report, self.state["log_history"], start_step)

    def _start(self, record: Any) -> tuple[StepContext, BatchPlan, int]:
        """The step context, the batch plan and the number of steps of this ``train()`` call; the
        model's record (``hizli.models.record``) gets this run's LoRA compute copies."""
        args, model = self.args, self.model
        device = next(model.parameters()).device
        amp_dtype = autocast_dtype(args, device)
        torch.manual_seed(args.seed)
        model.train()
        world = self.ranks.world_size
        if self.ranks.grouped:
            self.ranks.same_everywhere(len(self.train_dataset), "the number of training rows")
            if args.parallel == "fsdp":
                from hizli.models.sharding import shard_base_weights

                shard_base_weights(model)
        plan = BatchPlan(  # a step's micro-batches over all ranks (hizli.train.ranks deals them out)
            self.train_dataset.lengths,
            args.per_device_train_batch_size,
            args.accumulation(world) * world,
            args.data_seed or args.seed,
            packing=self.packing,
            max_seq_length=self.max_seq_length,
        )
        total_steps = plan.total_steps(args.max_steps, args.num_train_epochs)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = optim.build_optimizer(params, args)
        if record is not None:
            record.defer_offloaded_mlp = self.defer_offloaded_mlp
            if self.graph_offloaded_layers and device.type == "cuda":
                from hizli.models.layer_graphs import LayerGraphs

                record.layer_graphs = LayerGraphs()
        if record is not None and self.keep_lora_copies:
            from hizli.kernels.lora_casts import ComputeCopies

            record.compute_copies = ComputeCopies()
            optimizer.register_step_post_hook(record.compute_copies.step_taken)
        scheduler = optim.build_scheduler(optimizer, args, total_steps)
        scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        ctx = StepContext(
            model=model,
            args=args,
            dataset=self.train_dataset,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            params=params,
            device=device,
            amp_dtype=amp_dtype,
            collate=self._collator(),
            ranks=self.ranks,
            fused_ce=args.fused_cross_entropy,
            token_buckets=self.token_buckets,
            bucket_per_doubling=BUCKETS_PER_DOUBLING
            if record is not None and record.layer_graphs is not None
            else None,
        )
        warmup.wait()  # the background kernel compile holds some GPU memory: let it finish before planning
        return ctx, plan, total_steps

    def _plan_memory(
        self, ctx: StepContext, plan: BatchPlan, total_steps: int, budget_gib: float | None = None
    ) -> StepMemory:
        step_memory = plan_memory(ctx, plan, total_steps, budget_gib)
        self._ce_chunk_rows = ctx.ce_chunk_rows  # evaluation uses the plan's loss chunks too
        self.memory_plan = step_memory.plan.to_dict() if step_memory.plan is not None else None
        return step_memory

    def _log_step(
        self,
        log: metrics.RunLog,
        ctx: StepContext,
        *,
        plan: BatchPlan,
        step_no: int,
        after: Position,
        result: Any,
        elapsed: float,
    ) -> None:
        epoch = after.epoch + after.micro / max(1, len(plan.micro_batches(after.epoch)))
        entry = metrics.step_entry(step_no, result, elapsed, epoch, peak_gib(ctx.device))
        if self.ranks.is_main:
            log.step(entry)
        self.state["log_history"].append(entry)
        for callback in self.callbacks:
            callback(entry)

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float]:
        """Loss per trained token over the eval set, with the training loss itself, and its perplexity:
        ``{"eval_loss", "eval_perplexity", "eval_tokens" (trained tokens), "eval_rows"}``."""
        from hizli.train.evaluate import evaluate_loss

        if self.eval_dataset is None:
            raise ValueError("evaluate() needs eval_dataset=...")
        device = next(self.model.parameters()).device
        result = evaluate_loss(
            self.model,
            self.eval_dataset,
            self._collator(),
            batch_size=self.args.per_device_eval_batch_size,
            amp_dtype=autocast_dtype(self.args, device, quiet=True),
            ce_chunk_rows=self._ce_chunk_rows,
        )
        return result.metrics()

    # ---------------------------------------------------------------- helpers
    def _save_checkpoint(self, ctx: StepContext, step_no: int, after: Position) -> Path:
        state = {
            "global_step": step_no,
            "position": {"epoch": after.epoch, "micro": after.micro},
            "scheduler": ctx.scheduler.state_dict(),
            "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else None,
            "log_history": self.state["log_history"],
            "run": self._run,
            "world_size": self.ranks.world_size,
            "args": jsonable(self.args.to_dict()),
        }
        path = checkpoint.path_for(self.args.output_dir, step_no)
        if self.ranks.is_main:
            path = checkpoint.save(
                self.args.output_dir, step_no, self.model, ctx.optimizer, state, self.args.save_total_limit
            )
        self.ranks.barrier()
        return path

    def _check_resumable(self, state: dict[str, Any], recipe: dict[str, Any], path: Path) -> None:
        """A checkpoint resumes only in its own run, and on another number of ranks only when asked."""
        runs.check_same_recipe(state, recipe=recipe, path=path)
        checkpoint.check_world_size(state, self.ranks.world_size, self.args.reshard, path)

    def _recipe_from_objects(self) -> dict[str, Any]:
        return recipe_from_objects(
            self.model,
            self.args,
            max_seq_length=self.max_seq_length,
            dataset_text_field=self.dataset_text_field,
            packing=self.packing,
            train_on=self.train_on,
            rows=len(self.train_dataset) if self.train_dataset else 0,
        )

    def save_model(self, output_dir: str | None = None) -> None:
        out = output_dir or self.args.output_dir
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)


# the keywords SFTTrainer takes, named when an unknown one is passed
_SFT_ARGS = tuple(p for p in inspect.signature(SFTTrainer.__init__).parameters if p not in ("self", "unknown"))
