"""``hizli export`` and ``hizli chat`` on exports, the way a user runs them.

The export mechanics (refusals, staging, crashes) run on the tiny random Llama with the real
tokenizer, so they take seconds; the chat checks run the real exported SmolLM2 in a subprocess.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hizli.api import FastLanguageModel
from hizli.cli import main


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    from hizli.models import loader, lora

    model, tokenizer = loader.load(tiny_model_dir, load_in_4bit=False)
    peft_model = lora.add_lora(model, r=4, init_lora_weights=False)
    out = tmp_path_factory.mktemp("tiny") / "lora_model"
    peft_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".hizli-partial")]


def test_gguf_export_summary_and_refusal_without_force(tiny_adapter, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(tiny_adapter), "--to", "gguf", "--quant", "f16", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "exported.F16.gguf"]
    assert "exported.F16.gguf" in printed.out and "total" in printed.out and " MB" in printed.out
    assert "exported to" in printed.out and "load" in printed.out
    before = _digest(out)

    assert main(["export", str(tiny_adapter), "--to", "gguf", "--quant", "q8_0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--force" in err and "exported.F16.gguf" in err
    assert _digest(out) == before  # refused before anything was written

    assert main(["export", str(tiny_adapter), "--to", "gguf", "--quant", "q8_0", "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "exported.F16.gguf", "exported.Q8_0.gguf"]
    assert _leftovers(tmp_path) == []


def test_merged_export_loads_back(tiny_adapter, tmp_path, capsys):
    from hizli.models import loader

    out = tmp_path / "merged"
    assert main(["export", str(tiny_adapter), "--to", "merged", "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }
    model, tokenizer = loader.load(str(out), load_in_4bit=False)
    assert model.hizli.info.kind == "folder" and tokenizer.chat_template


@pytest.mark.parametrize("to", ["gguf", "merged"])
def test_crash_mid_export_leaves_no_partial_file(tiny_adapter, tmp_path, monkeypatch, to):
    """A writer that dies halfway: the target keeps its old files and no half-written file appears."""
    import safetensors.torch

    from hizli.export import gguf

    out = tmp_path / "out"
    args = ["export", str(tiny_adapter), "--to", to, "--quant", "f16", "--out", str(out)]
    assert main(args) == 0
    before = _digest(out)

    calls = {"n": 0}
    real_write, real_save = gguf.write_tensor, safetensors.torch.save_file

    def dying_write(writer, array):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        real_write(writer, array)

    def dying_save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # leave a truncated file behind, as a crash would
            f.truncate(100)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(gguf, "write_tensor", dying_write)
    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(args + ["--force"])
    assert _digest(out) == before
    assert _leftovers(tmp_path) == []

    fresh = tmp_path / "fresh"
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(["export", str(tiny_adapter), "--to", to, "--quant", "f16", "--out", str(fresh)])
    assert not fresh.exists()
    assert _leftovers(tmp_path) == []


def test_ctrl_c_mid_export_cleans_up(tiny_adapter, tmp_path, monkeypatch):
    from hizli.export import gguf

    def interrupted(writer, array):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf, "write_tensor", interrupted)
    out = tmp_path / "out"
    assert main(["export", str(tiny_adapter), "--to", "gguf", "--quant", "q8_0", "--out", str(out)]) == 130
    assert not out.exists() and _leftovers(tmp_path) == []


def test_mistakes_are_caught_before_loading(tiny_adapter, tmp_path, monkeypatch, capsys):
    from hizli.export import gguf

    monkeypatch.delenv(gguf.QUANTIZE_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored login either
    out = tmp_path / "out"
    cases = [
        (["--to", "gguf", "--quant", "q4_k_m"], "llama-quantize"),
        (["--to", "gguf", "--quant", "q3"], "not a GGUF type"),
        (["--to", "merged", "--push", "org/name"], "Hugging Face token"),
        (["--to", "merged", "--push", "not a repo"], "not a Hub repository name"),
    ]
    for extra, message in cases:
        assert main(["export", str(tiny_adapter), "--out", str(out), *extra]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_push_uploads_privately(tiny_adapter, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, repo_type, private, exist_ok):
            calls.append(("create_repo", repo_id, repo_type, private, exist_ok))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, repo_type, commit_message):
            calls.append(("upload_folder", sorted(os.listdir(folder_path)), repo_id))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    out = tmp_path / "out"
    assert (
        main(
            ["export", str(tiny_adapter), "--to", "gguf", "--quant", "f16", "--out", str(out), "--push", "me/tiny-gguf"]
        )
        == 0
    )
    assert calls == [
        ("init", "hf_from_env"),
        ("create_repo", "me/tiny-gguf", "model", True, True),
        ("upload_folder", ["Modelfile", "out.F16.gguf"], "me/tiny-gguf"),
    ]
    assert "uploaded: https://huggingface.co/me/tiny-gguf" in capsys.readouterr().out

    calls.clear()  # the Python API: token argument wins over the environment, private unless asked
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_adapter), load_in_4bit=False)
    model.push_to_hub_merged("me/tiny-merged", tokenizer, token="hf_arg")
    assert calls[0] == ("init", "hf_arg") and calls[1][3] is True
    assert "model.safetensors" in calls[2][1] and "config.json" in calls[2][1]
    calls.clear()
    model.push_to_hub_gguf("me/tiny-gguf", tokenizer, quantization_method="f16", private=False)
    assert calls[1][3] is False and calls[2][1] == ["Modelfile", "tiny-gguf.F16.gguf"]


def _chat(path: Path, env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "hizli.cli",
            "chat",
            str(path),
            "--prompt",
            "What is the capital of France?",
            "--max-new-tokens",
            "12",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_hizli_chat_on_merged_folder_and_gguf_file(merged_dir, gguf_dir, export_cache):
    folder = _chat(merged_dir, {})
    assert folder.returncode == 0, folder.stderr[-2000:]
    gguf = _chat(gguf_dir / "smol-ft.Q8_0.gguf", {"HIZLI_CACHE": str(export_cache)})
    assert gguf.returncode == 0, gguf.stderr[-2000:]
    for result in (folder, gguf):
        assert "Paris" in result.stdout, result.stdout
