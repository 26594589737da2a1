"""Several processes on the CPU (gloo), the way a user starts them: ``torchrun --nproc-per-node 2 -m
hizli.cli train RECIPE``. The embedded model, fp32.

At the same global batch (``--keep-global-batch``: 2 x 4 on one process, 2 x 2 on each of two),
data parallel and sharded (FSDP2) runs give the single process's per-step losses; a checkpoint
written by 2 ranks resumes on 1 and one written by 1 resumes on 2 with the uninterrupted run's
losses; only rank 0 writes files (every other rank runs under an audit hook that records any file
it opens for writing, creates, renames or removes under the output folder). In 4-bit, a sharded
run loads its base rank by rank (each reads and quantizes its own rows) and trains as one rank does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on Linux/macOS")

STEPS = 5
RECIPE = Path(__file__).resolve().parents[2] / "configs" / "demo-cpu.yaml"

# Runs the `hizli` command; on ranks other than 0, records every write under OUTPUT (argv[1]) to
# WRITES (argv[2]) at exit.
WATCHED_CLI = """
import atexit, json, os, sys
out, record = os.path.realpath(sys.argv[1]), sys.argv[2]
del sys.argv[1:3]
writes = []
if os.environ.get("RANK", "0") != "0":
    def under(p):
        try:
            path = os.path.realpath(os.fsdecode(p))
            return path == out or path.startswith(out + os.sep)
        except (TypeError, ValueError):
            return False
    def hook(event, args):
        if event == "open" and args[0] is not None and under(args[0]):
            mode, flags = args[1] or "r", args[2] or 0
            if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                writes.append([event, os.fsdecode(args[0])])
        elif event in ("os.rename", "os.replace", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree"):
            if args and isinstance(args[0], (str, bytes, os.PathLike)) and under(args[0]):
                writes.append([event, os.fsdecode(args[0])])
    sys.addaudithook(hook)
    atexit.register(lambda: open(record, "w").write(json.dumps(writes)))
from hizli.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def _train(
    tmp: Path, name: str, ranks: int | None, *extra: str, output: Path | None = None
) -> subprocess.CompletedProcess:
    """``hizli train`` as ``ranks`` processes under torchrun, or as a plain process (``ranks=None``)."""
    out = output or tmp / name
    script = tmp / "watched_cli.py"
    script.write_text(WATCHED_CLI)
    sets = {
        "model.load_in_4bit": False,  # fp32 base: exact comparisons (4-bit: see the last CPU test)
        "model.max_seq_length": 32,  # every row cut to 32 tokens: a step trains 256, quickly on 2 cores
        "data.max_rows": 40,
        "data.dataset_num_proc": 1,
        "train.max_steps": STEPS,
        "train.warmup_steps": 1,
        "train.save_steps": 3,
        "train.save_total_limit": None,
        "train.output_dir": out,
        "output.adapter_dir": out / "lora_model",
        "chat.max_new_tokens": 2,
    }
    args = [str(RECIPE), "--keep-global-batch"]
    for k, v in sets.items():
        args += ["--set", f"{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"]
    args += extra  # after the defaults: a later --set wins
    launcher = [sys.executable]
    if ranks is not None:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    threads = max(1, (os.cpu_count() or 1) // (ranks or 1))  # the machine's cores, shared by the ranks
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [*launcher, str(script), str(out), str(tmp / f"{name}-writes.json"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def _losses(folder: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in lines if "loss" in e}


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def _same(got: dict[int, float], want: dict[int, float], steps) -> None:
    for s in steps:
        assert got[s] == pytest.approx(want[s], rel=1e-5), (s, got, want)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smol_folder):
    """The single-process run and the two-rank runs, each once for the module."""
    tmp = tmp_path_factory.mktemp("ranks")
    single = _train(tmp, "single", None)
    _ok(single)
    ddp = _train(tmp, "ddp", 2)
    _ok(ddp)
    fsdp = _train(tmp, "fsdp", 2, "--parallel", "fsdp")
    _ok(fsdp)
    return tmp, {"single": single, "ddp": ddp, "fsdp": fsdp}


def test_data_parallel_and_sharded_runs_match_one_process(runs):
    tmp, results = runs
    want = _losses(tmp / "single")
    assert sorted(want) == list(range(1, STEPS + 1))
    for name in ("ddp", "fsdp"):
        _same(_losses(tmp / name), want, range(1, STEPS + 1))
        # rank 0 prints the memory report with every rank's peak
        assert "per rank = rank 0:" in results[name].stdout and "rank 1:" in results[name].stdout
    # steps 2-5 start from the weights the earlier steps' summed updates made (with the recipe's
    # 8-bit AdamW), so equal losses there check the update too


def test_only_rank_zero_writes_files(runs):
    tmp, _ = runs
    for name in ("ddp", "fsdp"):
        record = tmp / f"{name}-writes.json"
        assert record.is_file(), "the audit hook of rank 1 did not report"
        assert json.loads(record.read_text()) == [], name
        files = sorted(str(p.relative_to(tmp / name)) for p in (tmp / name).rglob("*") if p.is_file())
        single = sorted(str(p.relative_to(tmp / "single")) for p in (tmp / "single").rglob("*") if p.is_file())
        assert files == single  # the same outputs as one process, nothing per rank


def test_checkpoints_resume_on_another_number_of_ranks(runs):
    tmp, _ = runs
    want = _losses(tmp / "single")
    # written by 2 ranks (data parallel), resumed on 1
    two_to_one = tmp / "two-to-one"
    shutil.copytree(tmp / "ddp" / "checkpoint-3", two_to_one / "checkpoint-3")
    refused = _train(tmp, "refused", None, "--resume", output=two_to_one)
    assert refused.returncode == 2
    assert "written by 2 rank(s)" in refused.stderr and "--reshard" in refused.stderr
    _ok(_train(tmp, "two-to-one", None, "--resume", "--reshard", output=two_to_one))
    _same(_losses(two_to_one), want, range(4, STEPS + 1))
    # written by 1 rank, resumed on 2 (sharded)
    one_to_two = tmp / "one-to-two"
    shutil.copytree(tmp / "single" / "checkpoint-3", one_to_two / "checkpoint-3")
    _ok(_train(tmp, "one-to-two", 2, "--parallel", "fsdp", "--resume", "--reshard", output=one_to_two))
    _same(_losses(one_to_two), want, range(4, STEPS + 1))


def test_a_sharded_4bit_base_loads_rank_by_rank_and_trains_as_one_rank(tmp_path, smol_folder):
    four_bit = ("--parallel", "fsdp", "--set", "model.load_in_4bit=true", "--set", "train.max_steps=3")
    _ok(_train(tmp_path, "one", 1, *four_bit))
    two = _train(tmp_path, "two", 2, *four_bit)
    _ok(two)
    _same(_losses(tmp_path / "two"), _losses(tmp_path / "one"), range(1, 4))
    assert json.loads((tmp_path / "two-writes.json").read_text()) == []
    from peft import PeftConfig

    # the adapter names its base as the recipe did, for `hizli chat` and PEFT
    assert PeftConfig.from_pretrained(str(tmp_path / "two" / "lora_model")).base_model_name_or_path == (
        "smollm2-135m-instruct"
    )


# The recipe's Python as a user writes it; `accelerate launch` starts it on 2 processes.
API_SCRIPT = """
import json, sys
from hizli import FastLanguageModel, SFTTrainer, TrainingArguments, get_chat_template
from hizli.data.load import load_conversations
from hizli.data.sample import dataset_source

model, tokenizer = FastLanguageModel.from_pretrained("smollm2-135m-instruct", max_seq_length=48, load_in_4bit=True)
model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, random_state=3407)
tokenizer = get_chat_template(tokenizer, chat_template="smollm2")
args = TrainingArguments(
    per_device_train_batch_size=2, gradient_accumulation_steps=4, keep_global_batch=True, max_steps=3,
    learning_rate=2e-4, optim="adamw_8bit", seed=3407, output_dir=sys.argv[1], save_strategy="no",
)
rows = load_conversations(dataset_source("hizli:sharegpt"), max_rows=32)
trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=rows, max_seq_length=48, args=args)
stats = trainer.train()
if trainer.ranks.is_main:
    print("LOSSES", json.dumps([trainer.ranks.world_size, [e["loss"] for e in stats.log_history]]))
"""


def test_accelerate_launch_of_a_recipe_script_trains_data_parallel(tmp_path, smol_folder):
    pytest.importorskip("accelerate")
    script = tmp_path / "recipe.py"
    script.write_text(API_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def losses(command: list[str]) -> tuple[int, list[float]]:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-4000:]
        return json.loads(next(x for x in result.stdout.splitlines() if x.startswith("LOSSES"))[7:])

    world, one = losses([sys.executable, str(script), str(tmp_path / "one")])
    assert world == 1
    # accelerate's multi-process launcher (torch.distributed's elastic agent); gloo where there is no GPU
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    world, two = losses([*launch, str(script), str(tmp_path / "two")])
    assert world == 2
    assert two == pytest.approx(one, rel=1e-5)


@pytest.mark.gpu
def test_nccl_at_world_size_one_matches_one_process(tmp_path):
    """On one GPU (bf16, hizli's kernels, a 4-layer random Llama): the same code as N GPUs, NCCL process
    group included, at a world size of 1. Data parallel and sharded losses track the plain process
    within bf16 noise."""
    from helpers import gpu_llama_folder

    folder = gpu_llama_folder(tmp_path / "model")
    template = "llama-3.1" if "begin_of_text" in (Path(folder) / "tokenizer_config.json").read_text() else "smollm2"
    model = ("--set", f"model.name={folder}", "--set", f"data.chat_template={template}", "--set", "train.bf16=true")
    model += ("--set", "model.load_in_4bit=true")  # fsdp: the base loaded rank by rank, NF4 rows, fused kernels
    _ok(_train(tmp_path, "single", None, *model))
    want = _losses(tmp_path / "single")
    for mode in ("ddp", "fsdp"):
        result = _train(tmp_path, mode, 1, "--parallel", mode, *model)
        _ok(result)
        got = _losses(tmp_path / mode)
        assert max(abs(got[s] - want[s]) / want[s] for s in want) <= 0.02, (mode, got, want)
        assert "per rank = rank 0:" in result.stdout
