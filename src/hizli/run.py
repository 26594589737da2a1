"""``hizli train RECIPE``: the whole recipe, end to end, with where the time went.

load model (4-bit) -> LoRA -> chat template -> data (standardise, render, tokenise, check) ->
memory report -> train -> memory report -> save adapter + tokenizer -> one chat answer.
"""

from __future__ import annotations

import io
import sys
from dataclasses import asdict
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hizli import _log
from hizli.config import Recipe, load_recipe


class Timings:
    def __init__(self) -> None:
        self.parts: list[tuple[str, float]] = []

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.parts.append((name, time.perf_counter() - t0))

    def lines(self) -> list[str]:
        total = sum(t for _, t in self.parts) or 1.0
        rows = [f"  {name:<22} {t:8.1f} s  {100 * t / total:5.1f} %" for name, t in self.parts]
        return ["where the time went:"] + rows + [f"  {'total':<22} {total:8.1f} s"]


def _existing_run(recipe: Recipe) -> list[str]:
    from hizli.train.checkpoint import list_checkpoints

    found = [p.name for p in list_checkpoints(recipe.train.output_dir)]
    adapter = Path(recipe.output.adapter_dir)
    if adapter.is_dir() and any(adapter.iterdir()):
        found.append(str(adapter))
    return found


def _check_resume(recipe: Recipe, resume: str | bool, world_size: int) -> str | None:
    """Before anything loads: refuse a checkpoint of another recipe or, without ``train.reshard``, of
    another number of ranks (CheckpointError), and return the "nothing left to train" message when the
    checkpoint has already reached ``train.max_steps``."""
    import json

    from hizli.train import checkpoint, runs

    path = checkpoint.resolve(resume, recipe.train.output_dir)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None  # resuming reads and checks it again, and says what is wrong with it
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return None
    runs.check_same_recipe(state, recipe.to_dict(), path)
    checkpoint.check_world_size(state, world_size, recipe.train.reshard, path)
    if recipe.train.max_steps > 0 and state["global_step"] >= recipe.train.max_steps:
        return runs.resume_message(path, state, recipe.train.max_steps)
    return None


def run_recipe(recipe: Recipe, resume: str | bool | None = None, out=None) -> dict[str, Any]:
    """Run ``recipe``; returns the train metrics, memory figures, adapter path, answer and timings.
    ``out``: where the report goes (``sys.stdout`` as it is at the call, when None)."""
    from hizli.api import FastLanguageModel, SFTTrainer, get_chat_template, memory_report
    from hizli.data.load import load_conversations
    from hizli.data.sample import dataset_source
    from hizli.data.templates import stop_token_ids
    from hizli.models.inference import generate_reply
    from hizli.train.memory import MemorySnapshot
    from hizli.train.ranks import Ranks

    out = out if out is not None else sys.stdout
    ranks = Ranks.current()  # joins the process group when torchrun / accelerate started this process
    if not ranks.is_main:  # every rank runs the recipe; the first one alone prints and writes
        out = io.StringIO()
    if resume in (None, False) and not recipe.output.overwrite:
        found = _existing_run(recipe)
        if found:
            raise ValueError(
                f"{recipe.train.output_dir} / {recipe.output.adapter_dir} already hold an earlier run "
                f"({', '.join(found[:4])}). Continue it with --resume, or replace it with "
                "--set output.overwrite=true"
            )
    if resume not in (None, False):
        left = _check_resume(recipe, resume, ranks.world_size)
        if left is not None:  # nothing left to train: the adapter folder stays as it is
            print(f"{left}\n{recipe.output.adapter_dir}/ is left as it was", file=out)
            return {
                "metrics": None,
                "memory_before": None,
                "memory": None,
                "adapter_dir": None,
                "answer": None,
                "timings": {},
            }
    timings = Timings()
    m, lo, d = recipe.model, recipe.lora, recipe.data
    lora = asdict(lo)  # LoraSettings mirrors get_peft_model's arguments one to one
    with timings.part("load model"):
        if ranks.grouped and recipe.train.parallel == "fsdp" and m.load_in_4bit:
            from hizli.models.sharding import load_sharded

            # no GPU holds the whole base: each rank reads and quantizes its own rows
            model, tokenizer = load_sharded(m.name, max_seq_length=m.max_seq_length, dtype=m.dtype, lora=lora)
        else:
            model, tokenizer = FastLanguageModel.from_pretrained(
                m.name,
                max_seq_length=m.max_seq_length,
                dtype=m.dtype,
                load_in_4bit=m.load_in_4bit,
                trust_remote_code=m.trust_remote_code,
                allow_pickle=m.allow_pickle,
            )
            model = FastLanguageModel.get_peft_model(model, **lora)
        tokenizer = get_chat_template(tokenizer, chat_template=d.chat_template)
    with timings.part("prepare data"):
        rows = load_conversations(
            dataset_source(d.dataset),
            split=d.split,
            schema=d.schema,
            max_rows=d.max_rows,
            unknown_roles=d.unknown_roles,
            bad_rows=recipe.train.bad_rows,
        )
        eval_rows = rows[len(rows) - d.eval_rows :] if d.eval_rows else None
        train_rows = rows[: len(rows) - d.eval_rows] if d.eval_rows else rows
        trainer = SFTTrainer(
            model=model,
            tokenizer=tokenizer,
            train_dataset=train_rows,
            eval_dataset=eval_rows,
            max_seq_length=m.max_seq_length,
            dataset_num_proc=d.dataset_num_proc,
            packing=d.packing,
            args=recipe.train,
            train_on="assistant" if d.train_on_responses_only else "all",
        )
        trainer.recipe = recipe.to_dict()  # the data summary was logged by the tokenizer step
    before = memory_report(printed=False)
    print("\n".join(MemorySnapshot(**before).lines()), file=out)
    if resume in (None, False) and recipe.output.overwrite and ranks.is_main:
        from hizli.train.runs import remove_earlier_run

        remove_earlier_run(recipe.train.output_dir)
    ranks.barrier()  # every rank has read output_dir before the first one writes to it
    with timings.part("train"):
        stats = trainer.train(resume_from_checkpoint=resume)
    if stats.global_step == stats.start_step and resume not in (None, False):
        print(f"nothing was trained (see above): {recipe.output.adapter_dir}/ is left as it was", file=out)
        return {
            "metrics": stats.metrics,
            "memory_before": before,
            "memory": None,
            "adapter_dir": None,
            "answer": None,
            "timings": dict(timings.parts),
        }
    print("\n".join(stats.memory.lines()), file=out)
    with timings.part("save adapter"):
        if ranks.is_main:
            model.save_pretrained(recipe.output.adapter_dir)
            tokenizer.save_pretrained(recipe.output.adapter_dir)
        print(
            f"adapter saved to {recipe.output.adapter_dir}/ (load it with FastLanguageModel.from_pretrained"
            f"('{recipe.output.adapter_dir}') or peft.PeftModel.from_pretrained)",
            file=out,
        )
        if recipe.output.push_to_hub and ranks.is_main:
            from hizli.export import hub

            hub.push_adapter(model, recipe.output.push_to_hub, tokenizer)
    answer = None
    if recipe.chat.prompt:
        with timings.part("chat answer"):
            print(f"\n>>> {recipe.chat.prompt}", file=out)
            answer = generate_reply(
                model,
                tokenizer,
                [{"role": "user", "content": recipe.chat.prompt}],
                max_new_tokens=recipe.chat.max_new_tokens,
                temperature=recipe.chat.temperature,
                min_p=recipe.chat.min_p,
                stream=ranks.is_main,  # a sharded model answers on every rank at once, in step
                seed=recipe.train.seed,
                stop_ids=stop_token_ids(tokenizer),
            )
    print("\n" + "\n".join(timings.lines()), file=out)
    print("\n" + outputs_note(recipe), file=out)
    return {
        "metrics": stats.metrics,
        "memory_before": before,
        "memory": stats.memory.figures(),
        "adapter_dir": recipe.output.adapter_dir,
        "answer": answer,
        "timings": dict(timings.parts),
    }


def outputs_note(recipe: Recipe) -> str:
    """Where the run's files are and what each is for (printed at the end of ``hizli train``)."""
    from hizli.train.checkpoint import latest

    out = Path(recipe.train.output_dir)
    lines = [f"in {out}/:"]
    for name, what in (
        ("metrics.jsonl", "one JSON line per optimizer step (loss, lr, tokens/s, ...)"),
        ("loss.png", "the loss curve"),
        ("recipe.yaml", "the resolved recipe: every setting this run used"),
    ):
        if (out / name).is_file():
            lines.append(f"  {name:<14} {what}")
    last = latest(out)
    if last is not None:
        lines.append(f"  {last.name:<14} the last checkpoint: raise train.max_steps and add --resume to train further")
    lines.append(f"talk to the model: hizli chat {recipe.output.adapter_dir}")
    return "\n".join(lines)


def run_recipe_cli(path: str | None, overrides: list[str], resume: str | None = None, dry_run: bool = False) -> int:
    from hizli.train.signals import TrainingInterrupted

    if path is None:
        raise ValueError(
            "pass a recipe file, e.g. `hizli train configs/demo-cpu.yaml` (CPU demo) or "
            "`hizli train configs/reference.yaml` (the reference recipe, needs a GPU and the hub)"
        )
    recipe = load_recipe(path, overrides)
    if dry_run:
        import yaml

        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        return 0
    resume_arg: str | bool | None = True if resume == "true" else resume
    try:
        run_recipe(recipe, resume=resume_arg)
    except TrainingInterrupted as e:
        _log.info(str(e))
        return 130
    return 0
