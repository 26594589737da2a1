"""Safe loading: no pickle unless asked, no remote code unless asked, no path out of its folder, no
corrupted checkpoint resumed."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import textwrap

import pytest
import torch

from hizli.models import loader
from hizli.train import checkpoint
from hizli.train.args import TrainingArguments
from hizli.train.trainer import SFTTrainer

from helpers import FakeTokenizer, tiny_lora_model, token_rows

pytestmark = pytest.mark.reliability("safe-loading")


class Evil:
    """Unpickling this creates a file: the proof that pickled code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------- pickle and remote code
def test_pickle_model_weights_are_refused_unless_allowed(tiny_model_dir, tmp_path, figures):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    m.config.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)
    marker = tmp_path / "pickle-ran"
    torch.save({**m.state_dict(), "x": Evil(str(marker))}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"only safetensors or GGUF by default.*allow_pickle=True"):
        loader.load(str(tmp_path), load_in_4bit=False)
    assert not marker.exists()
    figures.add(cases=1, refused=1)


def test_pickle_adapter_weights_are_refused_unless_allowed(tiny_model_dir, tmp_path, figures):
    from hizli.models import lora
    from transformers import AutoModelForCausalLM

    peft_model = lora.add_lora(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), r=4, lora_alpha=8, use_gradient_checkpointing=False
    )
    peft_model.save_pretrained(tmp_path / "adapter", safe_serialization=False)  # adapter_model.bin
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = tiny_model_dir
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="allow_pickle=True"):
        loader.load(str(tmp_path / "adapter"), load_in_4bit=False)
    model, _ = loader.load(str(tmp_path / "adapter"), load_in_4bit=False, allow_pickle=True)
    assert model.hizli.info.adapter == str((tmp_path / "adapter").resolve())
    figures.add(cases=1, refused=1)


def test_remote_code_does_not_run_unless_asked(tiny_model_dir, tmp_path, figures):
    """A folder whose config asks for its own Python classes: refused, and its code never imported."""
    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "remote-code-ran"
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="evil-llama",
        architectures=["EvilForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_evil.EvilConfig",
            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (folder / "configuration_evil.py").write_text(
        code
        + textwrap.dedent("""
        from transformers import LlamaConfig
        class EvilConfig(LlamaConfig):
            model_type = "evil-llama"
    """)
    )
    (folder / "modeling_evil.py").write_text(
        code
        + textwrap.dedent("""
        from transformers import LlamaForCausalLM
        from .configuration_evil import EvilConfig
        class EvilForCausalLM(LlamaForCausalLM):
            config_class = EvilConfig
    """)
    )
    with pytest.raises(Exception, match=r"(?i)trust_remote_code"):
        loader.load(str(folder), load_in_4bit=False)
    assert not marker.exists(), "the folder's own Python code ran without trust_remote_code=True"
    from hizli.config import ModelSettings

    assert ModelSettings().trust_remote_code is False and ModelSettings().allow_pickle is False
    figures.add(cases=1, refused=1)


# ---------------------------------------------------------------- paths
def _trained_checkpoint(tmp_path):
    args = TrainingArguments(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=2,
        save_steps=2,
        output_dir=str(tmp_path / "run"),
        disable_tqdm=True,
        seed=1,
    )
    SFTTrainer(model=tiny_lora_model(), tokenizer=FakeTokenizer(), train_dataset=token_rows(8), args=args).train()
    return tmp_path / "run" / "checkpoint-2", args


def _resume(args):
    return SFTTrainer(
        model=tiny_lora_model(),
        tokenizer=FakeTokenizer(),
        train_dataset=token_rows(8),
        args=TrainingArguments(**{**args.to_dict(), "max_steps": 3}),
    ).train(resume_from_checkpoint=True)


def _rewrite_sums(ckpt, edit):
    sums = json.loads((ckpt / "checksums.json").read_text())
    edit(sums)
    (ckpt / "checksums.json").write_text(json.dumps(sums))


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_paths_cannot_leave_their_folder(tmp_path, monkeypatch, figures):
    ckpt, args = _trained_checkpoint(tmp_path)
    secret = tmp_path / "outside.txt"
    secret.write_text("not part of any checkpoint")
    cases = {
        "dotdot": lambda s: s.__setitem__("../../outside.txt", _sha(secret)),
        "absolute": lambda s: s.__setitem__(str(secret), _sha(secret)),
        "link": None,
    }
    refused = 0
    for name, edit in cases.items():
        shutil.copytree(ckpt, tmp_path / name / "checkpoint-2")
        c = tmp_path / name / "checkpoint-2"
        if edit is not None:
            _rewrite_sums(c, edit)
            match = "names a file outside the checkpoint"
        else:  # a checkpoint file replaced by a link to a file elsewhere, with a matching checksum
            (c / "rng_state.pt").unlink()
            (c / "rng_state.pt").symlink_to(secret)
            _rewrite_sums(c, lambda s: s.__setitem__("rng_state.pt", _sha(secret)))
            match = "link to a file outside"
        with pytest.raises(checkpoint.CheckpointError, match=match):
            checkpoint.verify(c)
        refused += 1
    # recipes: '..' in the output folders is refused before anything runs (see also the recipes section)
    from hizli.config import RecipeError, recipe_from_dict

    for key in ("train.output_dir", "output.adapter_dir"):
        section, field = key.split(".")
        with pytest.raises(RecipeError, match=rf"{key}='\.\./x' climbs out"):
            recipe_from_dict({section: {field: "../x"}})
        refused += 1
    figures.add(cases=refused, refused=refused)


def test_corrupted_or_forged_checkpoints_are_refused(tmp_path, figures):
    ckpt, args = _trained_checkpoint(tmp_path)
    pristine = tmp_path / "pristine"
    shutil.copytree(ckpt, pristine)
    marker = tmp_path / "pickle-ran"

    def flip_byte(c):
        data = bytearray((c / "optimizer.pt").read_bytes())
        data[len(data) // 2] ^= 0x01
        (c / "optimizer.pt").write_bytes(bytes(data))

    def forge_pickle(c):  # a pickle that runs code, with a checksum that matches it
        with open(c / "optimizer.pt", "wb") as f:
            pickle.dump({"state": Evil(str(marker))}, f, protocol=2)
        _rewrite_sums(c, lambda s: s.__setitem__("optimizer.pt", _sha(c / "optimizer.pt")))

    def forge_state(c):  # a step that is not a number, with a matching checksum
        state = json.loads((c / "trainer_state.json").read_text())
        state["global_step"] = "../../evil"
        (c / "trainer_state.json").write_text(json.dumps(state))
        _rewrite_sums(c, lambda s: s.__setitem__("trainer_state.json", _sha(c / "trainer_state.json")))

    cases = {
        "flipped byte": (flip_byte, "corrupted: optimizer.pt does not match its checksum"),
        "missing file": (lambda c: (c / "rng_state.pt").unlink(), "is missing rng_state.pt"),
        "no checksums": (lambda c: (c / "checksums.json").unlink(), "no checksums.json"),
        "cut checksums": (
            lambda c: (c / "checksums.json").write_text('{"adapter_model.safetensors": "ab'),
            "checksums.json is corrupted",
        ),
        "checksums not a mapping": (lambda c: (c / "checksums.json").write_text("[1, 2]"), "is corrupted"),
        "unlisted file": (lambda c: _rewrite_sums(c, lambda s: s.pop("optimizer.pt")), "does not list optimizer.pt"),
        "pickled code": (forge_pickle, "hold objects other than tensors; refused"),
        "forged state": (forge_state, "does not hold a valid training state"),
    }
    for name, (damage, match) in cases.items():
        shutil.rmtree(ckpt)
        shutil.copytree(pristine, ckpt)
        damage(ckpt)
        with pytest.raises(checkpoint.CheckpointError, match=match):
            _resume(args)
        assert not marker.exists(), name
        assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()
    # the untouched copy still resumes: the refusals above are about the damage, not the checkpoint
    shutil.rmtree(ckpt)
    shutil.copytree(pristine, ckpt)
    assert _resume(args).global_step == 3
    figures.add(cases=len(cases) + 1, refused=len(cases))
