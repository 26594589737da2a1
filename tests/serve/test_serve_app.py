"""What ``hizli serve`` loads and how it refuses bad settings."""

from __future__ import annotations

import pytest
import torch

from hizli.cli import main
from hizli.serve.app import load_models, parse_adapters
from hizli.serve.engine import Request
from hizli.serve.sampling import SamplingParams


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir, tmp_path_factory):
    """Two LoRA adapters (random, different) trained on the tiny model, saved as adapter folders."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    out = {}
    for seed, name in ((5, "one"), (6, "two")):
        torch.manual_seed(seed)
        base = LlamaForCausalLM.from_pretrained(tiny_model_dir)
        peft = get_peft_model(
            base,
            LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
        )
        folder = tmp_path_factory.mktemp(f"adapter-{name}")
        peft.save_pretrained(folder)
        out[name] = str(folder)
    return out


def _greedy(served, prompt: list[int], n: int) -> list[int]:
    r = served.engine.submit(Request(prompt, SamplingParams(max_tokens=n, temperature=0), adapter=served.adapter))
    while r.events.get(timeout=120).finish_reason is None:
        pass
    return r.generated


def test_several_adapters_on_one_base_each_answer_as_their_own(tiny_model_dir, two_adapters):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    models = load_models(tiny_model_dir, two_adapters, load_in_4bit=False, context=64, max_batch=4)
    try:
        base_name = next(iter(models))
        assert list(models) == [base_name, "one", "two"]
        prompt = list(range(10, 22))
        got = {name: _greedy(m, prompt, 6) for name, m in models.items()}
        for name in ("one", "two"):
            ref = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model_dir), two_adapters[name])
            with torch.no_grad():
                want = ref.generate(
                    torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0
                )[0, len(prompt) :].tolist()
            assert got[name] == want, name
        assert got["one"] != got["two"] or got["one"] != got[base_name]
    finally:
        next(iter(models.values())).engine.close()


def test_adapter_specs_are_checked(tmp_path, two_adapters):
    assert parse_adapters([f"a={two_adapters['one']}"]) == {"a": two_adapters["one"]}
    for spec, words in (("noequals", "NAME=PATH"), ("=x", "NAME=PATH"), (f"a={tmp_path}", "not an adapter folder")):
        with pytest.raises(ValueError, match=words):
            parse_adapters([spec])
    with pytest.raises(ValueError, match="given twice"):
        parse_adapters([f"a={two_adapters['one']}", f"a={two_adapters['two']}"])


def test_cli_refuses_bad_settings_before_loading(capsys):
    assert main(["serve", "smollm2-135m-instruct", "--max-batch", "0"]) == 2
    assert "--max-batch 0" in capsys.readouterr().err
    assert main(["serve", "smollm2-135m-instruct", "--adapter", "nonsense"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err


def test_import_hizli_does_not_import_the_server():
    import subprocess
    import sys

    code = "import hizli, sys; print(any(m.startswith('hizli.serve') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_adapter_folder_is_served_hot_on_its_4bit_base(two_adapters):
    from hizli.models import loader

    models = load_models(two_adapters["one"], context=64, max_batch=2)
    try:
        served = next(iter(models.values()))
        model = served.engine.slots.model
        assert hasattr(model, "peft_config") and model.hizli.info.quantization == "nf4"  # not merged, NF4 base
        prompt = list(range(30, 40))
        ref, _ = loader.load(two_adapters["one"], load_in_4bit=True, adapter_trainable=False)
        with torch.no_grad():
            want = (
                ref.eval()
                .generate(torch.tensor([prompt]), max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)[
                    0, len(prompt) :
                ]
                .tolist()
            )
        assert _greedy(served, prompt, 5) == want
    finally:
        next(iter(models.values())).engine.close()
