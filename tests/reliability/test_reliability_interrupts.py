"""Interruptions: Ctrl-C / SIGTERM at any point, kill -9 at random moments, a full disk during a save.

What "any point" guarantees (the claim the tests hold the trainer to):
- before the first optimizer step (loading the model, preparing data, loading a checkpoint to
  resume from): nothing has been written yet, so a signal simply stops the process (Ctrl-C raises
  KeyboardInterrupt, SIGTERM terminates); every existing checkpoint is untouched;
- during a step or a checkpoint write: the trainer finishes the step (and the write), saves a
  checkpoint of that step and stops with ``TrainingInterrupted``; a second signal stops at once,
  and a write it cuts short is removed, leaving the previous checkpoint;
- ``kill -9`` at any moment: the checkpoints that were complete stay complete (a checkpoint is
  renamed into place only when fully written and synced), so at most the steps since the last one
  are lost, and the resumed run logs the same losses as an uninterrupted one.

Training runs in processes forked from a small server that has imported torch and hizli once
(~5 s), so each interrupted run starts in a fraction of a second. Every run is the same: a tiny
Llama with LoRA, 8-bit AdamW, 32 steps of 2 x 2 rows over 3.2 epochs, a checkpoint every 4 steps,
two kept; its losses are compared with an uninterrupted run of the same server.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from hizli.train import checkpoint

pytestmark = pytest.mark.reliability("kill9")  # per-test marks below override this for other sections

TESTS = str(Path(__file__).resolve().parents[1])
STEPS, SAVE_STEPS, KEEP = 32, 4, 2
ARGS = dict(
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    max_steps=STEPS,
    learning_rate=5e-3,
    warmup_steps=2,
    lr_scheduler_type="linear",
    optim="adamw_8bit",
    weight_decay=0.01,
    seed=3407,
    save_steps=SAVE_STEPS,
    save_total_limit=KEEP,
    logging_steps=1000,
    disable_tqdm=True,
)
TOLERANCE = 1e-6
KILLS = 40
PHASES = ("adapter", "optimizer", "checksums", "rename", "renamed")  # where inside a write to stop

SERVER = textwrap.dedent(r"""
    import json, os, signal, sys, time, traceback
    os.environ["OMP_NUM_THREADS"] = "1"
    # Ctrl-C as a terminal delivers it, even when the suite runs as a background job (which starts
    # with SIGINT ignored, so that Python would never raise KeyboardInterrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, TESTS)
    import torch
    torch.set_num_threads(1)  # the same arithmetic in every child: losses compare exactly
    from helpers import FakeTokenizer, tiny_lora_model, token_rows
    from hizli.train import checkpoint, step as step_mod
    from hizli.train.args import TrainingArguments
    from hizli.train.trainer import SFTTrainer, TrainingInterrupted
    # what a run imports lazily, imported once here (each child would pay ~3 s for it); no torch op
    # runs before the fork, so no thread pool is inherited half-made
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot, bitsandbytes.optim, peft, safetensors.torch, transformers.models.llama.modeling_llama
    import hizli.models.lora, hizli.models.patch, hizli.kernels.cross_entropy

    def run(job):
        log = open(job["log"], "a", buffering=1)
        def mark(*parts):
            log.write(" ".join(str(p) for p in parts) + "\n")
            log.flush()
        holder = {"saves": 0, "step": None, "in_save": False, "sha": 0, "fsync": 0}
        stall = job.get("stall")  # {"phase", "save": n-th save of this run, "until": kill|signal|second}

        def wait(until):
            end = time.time() + 30
            while time.time() < end:
                t = holder.get("trainer")
                got = t is not None and t.stop_signals.requested
                if until == "signal" and got:
                    return
                if until == "second" and got and not holder.get("seen"):
                    holder["seen"] = True
                    mark("first-signal-seen")
                time.sleep(0.002)

        def stall_here(phase):
            if stall and holder["in_save"] and stall["phase"] == phase and holder["saves"] == stall["save"]:
                mark("stall", phase, holder["step"])
                wait(stall["until"])

        model = tiny_lora_model()
        real_sp = model.save_pretrained
        def save_pretrained(*a, **k):
            stall_here("adapter")
            return real_sp(*a, **k)
        model.save_pretrained = save_pretrained
        real_rng, real_sha, real_fsync, real_save = (checkpoint.rng_state, checkpoint._sha256,
                                                     checkpoint._fsync_dir, checkpoint.save)
        def rng_state():
            stall_here("optimizer")
            return real_rng()
        def sha(path):
            holder["sha"] += 1
            if holder["sha"] == 1:
                stall_here("checksums")
            return real_sha(path)
        def fsync_dir(path):
            holder["fsync"] += 1
            stall_here("rename" if holder["fsync"] == 1 else "renamed")
            return real_fsync(path)
        def save(out, step, *a, **k):
            holder.update(saves=holder["saves"] + 1, step=step, sha=0, fsync=0, in_save=True)
            mark("save-start", step)
            try:
                path = real_save(out, step, *a, **k)
            finally:
                holder["in_save"] = False
            mark("save-end", step)
            return path
        checkpoint.rng_state, checkpoint._sha256, checkpoint._fsync_dir, checkpoint.save = (
            rng_state, sha, fsync_dir, save)
        if job.get("prep_stall"):
            real_prepare = SFTTrainer._prepare
            def prepare(self, *a, **k):
                mark("prep")
                time.sleep(job["prep_stall"])
                return real_prepare(self, *a, **k)
            SFTTrainer._prepare = prepare
        if job.get("step_stall"):
            real_loss = step_mod.loss_sum
            def loss_sum(m, batch, **kw):
                t = holder["trainer"]
                if t.state["global_step"] + 1 == job["step_stall"] and not holder.get("stalled"):
                    holder["stalled"] = True
                    mark("in-step", job["step_stall"])
                    wait("signal")
                return real_loss(m, batch, **kw)
            step_mod.loss_sum = loss_sum
        try:
            args = TrainingArguments(**job["args"])
            trainer = SFTTrainer(model=model, tokenizer=FakeTokenizer(), train_dataset=token_rows(40, seed=3),
                                 args=args, callbacks=[lambda e: mark("step", e["step"], repr(e["loss"]))])
            holder["trainer"] = trainer
            last = checkpoint.latest(args.output_dir)
            mark("resume", int(last.name.split("-")[1]) if last else 0)
            out = trainer.train(resume_from_checkpoint=True if last else None)
        except TrainingInterrupted as e:
            mark("interrupted", e.checkpoint.name)
            return 3
        except KeyboardInterrupt:
            mark("keyboard-interrupt")
            return 4
        mark("done", out.global_step)
        return 0

    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "start":
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    fd = os.open(msg["job"]["log"] + ".out", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                    os.dup2(fd, 1)
                    os.dup2(fd, 2)
                    code = run(msg["job"])
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            reply = {"pid": pid}
        elif msg["cmd"] == "poll":  # only the server reaps: a pid it reports running cannot be reused
            pid, status = os.waitpid(msg["pid"], os.WNOHANG)
            if pid == 0:
                reply = {"running": True}
            elif os.WIFSIGNALED(status):
                reply = {"signal": os.WTERMSIG(status)}
            else:
                reply = {"exit": os.WEXITSTATUS(status)}
        print(json.dumps(reply), flush=True)
""").replace("TESTS", repr(TESTS), 1)


class Forker:
    """Client of the fork server: start a training run, poll it, signal it, read its log."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=folder
        )
        ready = self.proc.stdout.readline()
        assert "ready" in ready, "the fork server did not start"
        self.runs = 0

    def _call(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, out: Path, **options) -> "Run":
        self.runs += 1
        log = self.folder / f"run-{self.runs}.log"
        job = {"args": {**ARGS, "output_dir": str(out)}, "log": str(log), **options}
        return Run(self, self._call(cmd="start", job=job)["pid"], log)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class Run:
    def __init__(self, forker: Forker, pid: int, log: Path) -> None:
        self.forker, self.pid, self.log = forker, pid, log
        self.result: dict | None = None

    def poll(self) -> dict | None:
        if self.result is None:
            reply = self.forker._call(cmd="poll", pid=self.pid)
            if not reply.get("running"):
                self.result = reply
        return self.result

    def signal(self, sig: int) -> bool:
        """Send ``sig`` if the run has not ended (it is then alive or an unreaped zombie: safe)."""
        if self.poll() is not None:
            return False
        os.kill(self.pid, sig)
        return True

    def wait(self, timeout: float = 120) -> dict:
        end = time.time() + timeout
        while self.poll() is None:
            if time.time() > end:
                os.kill(self.pid, signal.SIGKILL)
                pytest.fail(f"run {self.pid} did not end in {timeout} s:\n{self.tail()}")
            time.sleep(0.005)
        return self.result

    def wait_for(self, prefix: str, timeout: float = 60) -> str:
        end = time.time() + timeout
        while time.time() < end:
            for line in self.lines():
                if line.startswith(prefix):
                    return line
            if self.poll() is not None:
                pytest.fail(f"the run ended before {prefix!r}: {self.result}\n{self.tail()}")
            time.sleep(0.002)
        pytest.fail(f"no {prefix!r} within {timeout} s\n{self.tail()}")

    def lines(self) -> list[str]:
        if not self.log.exists():
            return []
        text = self.log.read_text()
        return text.split("\n")[:-1]  # the last piece may be a line cut by the kill

    def losses(self) -> dict[int, float]:
        return {int(p[1]): float(p[2]) for p in (line.split() for line in self.lines()) if p[0] == "step"}

    def marks(self, name: str) -> list[int]:
        return [int(p[1]) for p in (line.split() for line in self.lines()) if p[0] == name]

    def tail(self) -> str:
        out = Path(str(self.log) + ".out")
        return "\n".join(self.lines()[-8:]) + "\n--- output ---\n" + (out.read_text()[-3000:] if out.exists() else "")


@pytest.fixture(scope="module")
def forker(tmp_path_factory):
    f = Forker(tmp_path_factory.mktemp("forker"))
    yield f
    f.close()


@pytest.fixture(scope="module")
def reference(forker, tmp_path_factory):
    """An uninterrupted run: its losses per step, its final adapter, and how long it took."""
    out = tmp_path_factory.mktemp("reference")
    t0 = time.perf_counter()
    run = forker.start(out)
    assert run.wait() == {"exit": 0}, run.tail()
    seconds = time.perf_counter() - t0
    losses = run.losses()
    assert sorted(losses) == list(range(1, STEPS + 1))
    return {"losses": losses, "adapter": _adapter(out / f"checkpoint-{STEPS}"), "seconds": seconds}


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _latest(out: Path) -> int:
    last = checkpoint.latest(out)
    if last is None:
        return 0
    checkpoint.verify(last)  # the newest checkpoint is always complete
    return int(last.name.split("-")[1])


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "checkpoint-" in str(p.relative_to(folder))
    }


def _compare(run: Run, reference: dict, start: int) -> float:
    """The run logged steps start+1, start+2, ... with the reference's losses; returns the largest gap."""
    losses = run.losses()
    assert run.marks("resume") == [start], run.tail()
    assert sorted(losses) == list(range(start + 1, start + 1 + len(losses))), run.tail()
    gaps = [abs(loss - reference["losses"][step]) for step, loss in losses.items()]
    assert all(g <= TOLERANCE for g in gaps), f"losses differ from the uninterrupted run by up to {max(gaps)}"
    return max(gaps, default=0.0)


# ---------------------------------------------------------------- kill -9
def test_kill_9_at_random_moments_resumes_with_the_same_losses(forker, reference, tmp_path, figures):
    # the plan is fixed (HIZLI_KILL_SEED picks another); where a timed kill lands varies with the machine
    rng = random.Random(int(os.environ.get("HIZLI_KILL_SEED", "9")))
    chain = 0
    out = tmp_path / f"chain-{chain}"
    kills = in_write = before_first = resumes_matched = max_lost = 0
    max_gap = 0.0
    attempts = 0
    while kills < KILLS:
        attempts += 1
        assert attempts < 3 * KILLS, "too many runs finished before their kill"
        start = _latest(out)
        if start >= STEPS:  # killed after its last checkpoint was in place: that chain is complete
            chain += 1
            out, start = tmp_path / f"chain-{chain}", 0
        timed = kills % 2 == 0
        if timed:
            run = forker.start(out)
            deadline = time.perf_counter() + rng.uniform(0, reference["seconds"])
            while time.perf_counter() < deadline and run.poll() is None:
                time.sleep(0.002)
        else:  # inside a checkpoint write, at a chosen phase of it
            saves_left = (STEPS - start) // SAVE_STEPS
            stall = {
                "phase": PHASES[(kills // 2) % len(PHASES)],
                "save": rng.randint(1, max(1, min(3, saves_left))),
                "until": "kill",
            }
            run = forker.start(out, stall=stall)
            run.wait_for("stall ")
        run.signal(signal.SIGKILL)
        if run.wait() == {"exit": 0}:  # it finished first (or exited just before the kill): a new chain
            max_gap = max(max_gap, _compare(run, reference, start))
            resumes_matched += start > 0
            chain += 1
            out = tmp_path / f"chain-{chain}"
            continue
        assert run.result == {"signal": signal.SIGKILL}, run.tail()
        kills += 1
        lines = run.lines()
        starts, ends = run.marks("save-start"), run.marks("save-end")
        in_write += bool(starts) and (not ends or ends[-1] != starts[-1])
        losses = run.losses()
        if lines and lines[0].startswith("resume"):
            max_gap = max(max_gap, _compare(run, reference, start))
            resumes_matched += start > 0 and bool(losses)
        after = _latest(out)
        progress = max(losses, default=start)
        assert after >= max(ends, default=start), "a checkpoint that was complete is gone"
        assert after <= progress
        max_lost = max(max_lost, progress - after)
        assert progress - after <= SAVE_STEPS
        before_first += after == 0
    # then the run that is not killed: it finishes with the uninterrupted run's losses and adapter
    start = _latest(out)
    if start >= STEPS:  # the last kill came after checkpoint-32 was in place: run one more chain whole
        chain += 1
        out, start = tmp_path / f"chain-{chain}", 0
    run = forker.start(out)
    assert run.wait() == {"exit": 0}, run.tail()
    max_gap = max(max_gap, _compare(run, reference, start))
    resumes_matched += start > 0
    final = _adapter(out / f"checkpoint-{STEPS}")
    assert final.keys() == reference["adapter"].keys()
    assert max((final[k] - reference["adapter"][k]).abs().max().item() for k in final) <= TOLERANCE
    assert len(checkpoint.list_checkpoints(out)) == KEEP and not list(out.glob(".checkpoint-*"))
    assert in_write >= KILLS // 2
    figures.set(
        kills=kills,
        kills_in_write=in_write,
        kills_before_first_checkpoint=before_first,
        resumes_matched=resumes_matched,
        max_loss_diff=max_gap,
        max_steps_lost=max_lost,
        save_steps=SAVE_STEPS,
    )


# ---------------------------------------------------------------- Ctrl-C and SIGTERM
# (signal, where, detail): where = prep | step (detail: the step) | write (detail: phase) | write2 (two signals)
SIGNAL_PLAN = [
    ("SIGINT", "step", 5),
    ("SIGTERM", "prep", None),
    ("SIGINT", "write", "optimizer"),
    ("SIGTERM", "step", 10),
    ("SIGINT", "prep", None),
    ("SIGINT", "write2", "checksums"),
    ("SIGTERM", "write", "renamed"),
    ("SIGTERM", "write2", "adapter"),
    ("SIGINT", "write", "rename"),
    ("SIGTERM", "write2", "renamed"),
]


@pytest.mark.reliability("signals")
def test_ctrl_c_and_sigterm_at_any_point(forker, reference, tmp_path, figures):
    out = tmp_path / "run"
    counts = {"prep": 0, "step": 0, "write": 0}
    matched = 0
    for name, where, detail in SIGNAL_PLAN:
        sig = getattr(signal, name)
        start = _latest(out)
        before = _digest(out) if out.exists() else {}
        if where == "prep":
            run = forker.start(out, prep_stall=30)
            run.wait_for("prep")
            run.signal(sig)
            result = run.wait()
            # SIGINT: KeyboardInterrupt in the main thread; SIGTERM: the default action, terminate
            assert result == ({"exit": 4} if sig == signal.SIGINT else {"signal": signal.SIGTERM}), run.tail()
            assert (_digest(out) if out.exists() else {}) == before, "a checkpoint changed"
            assert not list(out.glob(".checkpoint-*")) and _latest(out) == start
            counts["prep"] += 1
            continue
        if where == "step":
            run = forker.start(out, step_stall=detail)
            run.wait_for("in-step")
            run.signal(sig)
            assert run.wait() == {"exit": 3}, run.tail()
            assert run.lines()[-1] == f"interrupted checkpoint-{detail}"
            assert _latest(out) == detail  # the step finished, then was saved
            counts["step"] += 1
        else:
            stall = {"phase": detail, "save": 1, "until": "second" if where == "write2" else "signal"}
            run = forker.start(out, stall=stall)
            step = int(run.wait_for("stall ").split()[2])
            run.signal(sig)
            if where == "write":
                assert run.wait() == {"exit": 3}, run.tail()
                assert run.lines()[-1] == f"interrupted checkpoint-{step}"
                assert _latest(out) == step  # the write completed, then training stopped
            else:  # a second signal stops at once: the cut write is removed unless already renamed
                run.wait_for("first-signal-seen")
                run.signal(sig)
                assert run.wait() == {"exit": 4}, run.tail()
                previous = [s for s in run.marks("save-end")]
                expect = step if detail == "renamed" else max(previous, default=start)
                assert _latest(out) == expect, run.tail()
            assert not list(out.glob(".checkpoint-*.tmp-*")), "a half-written checkpoint was left"
            counts["write"] += 1 + (where == "write2")
        _compare(run, reference, start)  # the steps it ran match, whether it started afresh or resumed
        matched += start > 0
    start = _latest(out)
    run = forker.start(out)
    assert run.wait() == {"exit": 0}, run.tail()
    _compare(run, reference, start)
    matched += 1
    figures.set(
        signals=sum(1 + (w == "write2") for _, w, _ in SIGNAL_PLAN),
        during_prep=counts["prep"],
        during_step=counts["step"],
        during_write=counts["write"],
        resumed_matched=matched,
    )


# ---------------------------------------------------------------- a full disk
def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


WRITE_POINTS = ("adapter", "optimizer", "rng", "trainer_state", "checksums", "fsync")


@pytest.mark.reliability("disk-full")
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, figures):
    from hizli.train.args import TrainingArguments
    from hizli.train.trainer import SFTTrainer

    from helpers import FakeTokenizer, tiny_lora_model, token_rows

    def trainer(out, **kw):
        args = TrainingArguments(**{**ARGS, "max_steps": 6, "save_steps": 2, "output_dir": str(out), **kw})
        return SFTTrainer(
            model=tiny_lora_model(), tokenizer=FakeTokenizer(), train_dataset=token_rows(40, seed=3), args=args
        )

    expected = [e["loss"] for e in trainer(tmp_path / "reference", save_strategy="no").train().log_history]
    intact = 0
    for point in WRITE_POINTS:
        out = tmp_path / point
        t = trainer(out)
        real = {"torch.save": torch.save, "write_text": Path.write_text, "dump": json.dump, "fsync": os.fsync}

        def armed() -> bool:
            return t.state["global_step"] == 4  # the save after step 4; the one after step 2 is complete

        def torch_save(obj, f, *a, **k):
            if armed() and Path(f).name == {"optimizer": "optimizer.pt", "rng": "rng_state.pt"}.get(point):
                Path(f).write_bytes(b"\0" * 100)  # part of it made it to disk
                _enospc()
            return real["torch.save"](obj, f, *a, **k)

        def write_text(self, data, *a, **k):
            if armed() and point == "trainer_state" and self.name == "trainer_state.json":
                _enospc()
            return real["write_text"](self, data, *a, **k)

        def dump(obj, fp, *a, **k):
            if armed() and point == "checksums" and getattr(fp, "name", "").endswith("checksums.json"):
                _enospc()
            return real["dump"](obj, fp, *a, **k)

        def fsync(fd):
            if armed() and point == "fsync":
                _enospc()
            return real["fsync"](fd)

        def save_pretrained(*a, **k):
            if armed() and point == "adapter":
                _enospc()
            return real_sp(*a, **k)

        real_sp = t.model.save_pretrained
        t.model.save_pretrained = save_pretrained
        monkeypatch.setattr(torch, "save", torch_save)
        monkeypatch.setattr(Path, "write_text", write_text)
        monkeypatch.setattr(json, "dump", dump)
        monkeypatch.setattr(os, "fsync", fsync)
        before = {}

        def remember(entry):
            if entry["step"] == 4:
                before.update(_digest(out))

        t.callbacks.append(remember)
        with pytest.raises(OSError) as e:
            t.train()
        monkeypatch.undo()
        assert e.value.errno == errno.ENOSPC
        assert "disk full while saving checkpoint-4; the previous checkpoint (checkpoint-2) is intact" in str(e.value)
        assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-2"]
        assert _digest(out) == before and not list(out.glob(".checkpoint-*"))
        checkpoint.verify(out / "checkpoint-2")
        resumed = trainer(out).train(resume_from_checkpoint=True)
        assert [e["loss"] for e in resumed.log_history] == pytest.approx(expected, abs=TOLERANCE)
        intact += 1
    figures.set(write_points=len(WRITE_POINTS), previous_intact=intact)
