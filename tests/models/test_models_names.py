"""Local-first model names: a near miss of a local or embedded name gets "did you mean", a hub id
with no way to reach the Hub fails at once; a chat answer cut by max_new_tokens says so, and a chat
prompt longer than the training max_seq_length draws no warning of indexing errors."""

from __future__ import annotations

import pytest

from hizli.models import loader


def test_a_near_miss_of_an_embedded_or_local_name_suggests_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "demo-cpu" / "lora_model").mkdir(parents=True)
    (tmp_path / "lora_model").mkdir()
    cases = {
        "smollm2-135m": "smollm2-135m-instruct",
        "SmolLM2-135M-Instruct-typo": "smollm2-135m-instruct",
        "lora_modle": "lora_model",
        "outputs/demo-cpu/lora_modle": "outputs/demo-cpu/lora_model",
    }
    for name, near in cases.items():
        with pytest.raises(FileNotFoundError, match=f"did you mean '{near}'"):
            loader.resolve_source(name)
    assert loader.resolve_source("someone/llama").kind == "hub"  # a hub id stays a hub id


def test_a_hub_id_fails_at_once_when_the_hub_cannot_be_reached(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="HF_HUB_OFFLINE=1 is set"):  # said before any request is tried
        loader.load("someone/not-downloaded", load_in_4bit=False)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 2606)
    with pytest.raises(OSError, match=r"cannot be reached from here"):
        loader.load("someone/not-downloaded", load_in_4bit=False)


def test_an_answer_cut_by_max_new_tokens_says_so(tiny_model_dir, capsys):
    from hizli.models.inference import generate_reply

    model, tokenizer = loader.load(tiny_model_dir, load_in_4bit=False, fast_path=False)
    generate_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], max_new_tokens=3, stream=True)
    assert capsys.readouterr().out.rstrip().endswith("[cut at max_new_tokens=3]")
    generate_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], max_new_tokens=3, stream=False)
    assert "cut at" not in capsys.readouterr().out


def test_a_chat_prompt_longer_than_max_seq_length_is_answered_without_a_length_warning(tiny_model_dir, caplog):
    from hizli.models.inference import generate_reply

    model, tokenizer = loader.load(tiny_model_dir, load_in_4bit=False, fast_path=False, max_seq_length=16)
    assert tokenizer.model_max_length == 16
    question = "Tell me about the sea, the sky and the long road between them, in a few words."
    with caplog.at_level("WARNING"):
        generate_reply(model, tokenizer, [{"role": "user", "content": question}], max_new_tokens=3, stream=False)
    assert "longer than the specified maximum" not in caplog.text
