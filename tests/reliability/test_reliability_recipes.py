"""Bad recipes: every problem of a recipe is reported in one message, before any model is loaded.

The model loaders are replaced by a tripwire that counts calls and raises; a valid recipe trips it
(so the wire is connected), the bad ones must not.
"""

from __future__ import annotations

import re
import textwrap

import pytest

from hizli import cli
from hizli.config import RecipeError, load_recipe

pytestmark = pytest.mark.reliability("recipes")

# One recipe holding every kind of mistake; each pattern must appear in the one error message.
BAD = textwrap.dedent("""
    trian: {max_steps: 5}
    model:
      nmae: smollm2-135m-instruct
      max_seq_length: 4
      load_in_4bit: "yes"
      dtype: float64
    lora:
      r: sixteen
      lora_dropout: 1.5
      bias: some
      target_modules: [q_proj, 7]
    data:
      dataset: ./no-such-file.jsonl
      chat_template: lama-3.1
    train:
      lerning_rate: 2.0e-4
      learning_rate: -1
      max_steps: 0
      fp16: true
      bf16: true
      optim: adam
      eval_strategy: steps
      output_dir: ../../outside
    output:
      adapter_dir: ../adapter
    chat:
      temperature: -1
""")
EXPECTED = [
    r"trian: unknown section \(did you mean 'train'\?\)",
    r"model\.nmae: unknown key \(did you mean 'name'\?\)",
    r"model\.max_seq_length=4 must be >= 8",
    r"model\.load_in_4bit='yes': expected",
    r"model\.dtype='float64'",
    r"lora\.r='sixteen': expected",
    r"lora\.lora_dropout=1\.5 must be in \[0, 1\)",
    r"lora\.bias='some'",
    r"lora\.target_modules=\['q_proj', 7\]",
    r"data\.dataset='\./no-such-file\.jsonl': no such file",
    r"data\.chat_template='lama-3\.1' is not a known template; did you mean 'llama-3\.1'",
    r"train\.lerning_rate: unknown key \(did you mean 'learning_rate'\?\)",
    r"train\.learning_rate=-1 must be a number > 0",
    r"train\.max_steps=0 must be a positive integer",
    r"fp16=True and bf16=True together: choose one",
    r"train\.optim='adam': use one of",
    r"train\.eval_strategy='steps' needs rows to evaluate on",
    r"train\.output_dir='\.\./\.\./outside' climbs out of the working folder",
    r"output\.adapter_dir='\.\./adapter' climbs out of the working folder",
    r"chat\.temperature=-1 must be >= 0",
]


class Tripwire(Exception):
    pass


@pytest.fixture
def loads(monkeypatch):
    """Replace every way a model gets loaded with a counter that raises."""
    import transformers

    from hizli import api
    from hizli.models import loader

    calls = []

    def trip(*args, **kwargs):
        calls.append(args[:1])
        raise Tripwire("a model load was attempted")

    monkeypatch.setattr(loader, "load", trip)
    monkeypatch.setattr(api.FastLanguageModel, "from_pretrained", staticmethod(trip))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", trip)
    return calls


def _hizli_train(argv, capsys) -> tuple[int, str]:
    code = cli.main(["train", *argv])
    return code, capsys.readouterr().err


def test_the_tripwire_is_connected(tmp_path, loads, capsys, monkeypatch):
    """Control: a valid recipe reaches the model loader (so the tests below can fail)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "good.yaml").write_text(
        "model: {name: smollm2-135m-instruct}\ndata: {dataset: 'hizli:sharegpt', "
        "chat_template: smollm2}\ntrain: {max_steps: 1}\n"
    )
    with pytest.raises(Tripwire):
        cli.main(["train", "good.yaml"])
    assert len(loads) == 1


def test_every_problem_reported_together_before_any_model_loads(tmp_path, loads, capsys, monkeypatch, figures):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(BAD)
    with pytest.raises(RecipeError) as e:
        load_recipe("bad.yaml")
    message = str(e.value)
    missing = [p for p in EXPECTED if not re.search(p, message)]
    assert not missing, f"not reported: {missing}\n\n{message}"
    assert len(e.value.problems) == len(EXPECTED), message
    # the CLI: one error, exit code 2, no model loaded
    code, err = _hizli_train(["bad.yaml"], capsys)
    assert code == 2 and f"{len(EXPECTED)} problem(s)" in err
    assert all(re.search(p, err) for p in EXPECTED)
    assert loads == []
    figures.add(recipes=1, problems=len(EXPECTED))
    figures.set(max_per_recipe=len(EXPECTED))


CASES = {
    # name: (recipe text or None for a missing file, --set items, patterns that must all be reported)
    "yaml-syntax": ("train: {max_steps: 5\n", [], [r"not valid YAML"]),
    "top-level-list": ("- model\n- train\n", [], [r"the top level must be a mapping"]),
    "not-utf8": (b"\xff\xfe\x00m\x00o\x00d\x00e\x00l", [], [r"not UTF-8 text"]),
    "missing-file": (None, [], [r"recipe file 'missing\.yaml' not found"]),
    "section-not-mapping": (
        "train: 5\nlora: [r, 16]\n",
        [],
        [r"train: expected a mapping", r"lora: expected a mapping"],
    ),
    "overrides": (
        "train: {max_steps: 5}\n",
        ["train.max_step=3", "nodot=1", "train.warmup_steps=[", "lora.r=-2"],
        [
            r"train\.max_step: unknown key \(did you mean 'max_steps'\?\)",
            r"--set 'nodot=1': expected",
            r"--set 'train\.warmup_steps=\[': the value is not valid YAML",
            r"lora\.r=-2 must be > 0",
        ],
    ),
    "resume-path": (
        "train: {resume_from_checkpoint: ./outputs/checkpoint-99}\n",
        [],
        [r"resume_from_checkpoint='\./outputs/checkpoint-99': no such checkpoint folder"],
    ),
    "unknown-sample": (
        "data: {dataset: 'hizli:finetome', chat_template: llama-3.1}\n",
        [],
        [r"hizli's packaged samples are"],
    ),
    "types": (
        "train: {per_device_train_batch_size: 2.5, save_total_limit: 0, warmup_ratio: 2, nan_policy: retry}\n"
        "data: {eval_rows: -1, max_rows: 0}\nchat: {max_new_tokens: 0, min_p: 3}\n",
        [],
        [
            r"per_device_train_batch_size=2\.5 must be an integer",
            r"save_total_limit=0",
            r"warmup_ratio=2 must be in",
            r"nan_policy='retry'",
            r"data\.eval_rows=-1",
            r"data\.max_rows=0",
            r"chat\.max_new_tokens=0",
            r"chat\.min_p=3",
        ],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_kind_of_bad_recipe(name, tmp_path, loads, capsys, monkeypatch, figures):
    monkeypatch.chdir(tmp_path)
    text, overrides, patterns = CASES[name]
    path = tmp_path / ("missing.yaml" if text is None else "recipe.yaml")
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    argv = [path.name] + [x for o in overrides for x in ("--set", o)]
    code, err = _hizli_train(argv, capsys)
    assert code == 2, err
    missing = [p for p in patterns if not re.search(p, err)]
    assert not missing, f"not reported: {missing}\n\n{err}"
    assert "Traceback" not in err
    assert loads == []
    figures.add(recipes=1, problems=len(patterns), model_loads=len(loads))
