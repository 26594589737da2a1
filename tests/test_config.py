"""Recipe values are read as written: every value a message or the docs recommend is accepted, in a
recipe file and in ``--set``."""

from __future__ import annotations

import re

import pytest

from hizli.config import RecipeError, load_recipe

# Settings with a fixed set of values; each one's error message lists them.
CHOICES = [
    "train.save_strategy",
    "train.eval_strategy",
    "train.lr_scheduler_type",
    "train.optim",
    "train.nan_policy",
    "train.bad_rows",
    "train.report_to",
    "lora.bias",
    "lora.use_gradient_checkpointing",
    "model.dtype",
    "data.schema",
    "data.unknown_roles",
]
NEEDS = ["data.eval_rows=2"]  # eval_strategy steps/epoch need rows to evaluate on


def _recommended(setting: str) -> list[str]:
    """The values the error for a bad value of ``setting`` tells the user to use."""
    with pytest.raises(RecipeError) as e:
        load_recipe(None, [*NEEDS, f"{setting}=bogus"])
    (message,) = [p for p in e.value.problems if p.startswith(setting)]
    options = re.split(r"\buse (?:one of )?", message, maxsplit=1)[1].split(";")[0]
    words = re.split(r",\s*|\s+or\s+", options)
    return [re.sub(r"\(.*?\)|^\w+=", "", w).strip().strip("'\"") for w in words if w.strip()]


def _value(recipe, setting: str):
    section, key = setting.split(".")
    return getattr(getattr(recipe, section), key)


@pytest.mark.parametrize("setting", CHOICES)
def test_every_value_an_error_recommends_is_accepted_in_set_and_in_a_file(setting, tmp_path):
    values = _recommended(setting)
    assert len(values) >= 1, setting
    section, key = setting.split(".")
    for value in values:
        from_set = load_recipe(None, [*NEEDS, f"{setting}={value}"])
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"data:\n  eval_rows: 2\n{section}:\n  {key}: {value}\n")  # unquoted, as people write it
        from_file = load_recipe(recipe)
        assert _value(from_set, setting) == _value(from_file, setting), (setting, value)
        assert str(_value(from_set, setting)).lower() in (value.lower(), "none", "true", "false"), (setting, value)


def test_the_words_no_and_none_are_values_not_booleans():
    recipe = load_recipe(
        None, ["train.save_strategy=no", "train.eval_strategy=no", "lora.bias=none", "train.report_to=none"]
    )
    assert recipe.train.save_strategy == "no" and recipe.train.eval_strategy == "no"
    assert recipe.lora.bias == "none" and recipe.train.report_to == "none"


@pytest.mark.parametrize(
    "word,expected", [("no", False), ("off", False), ("false", False), ("yes", True), ("on", True), ("True", True)]
)
def test_yes_no_on_off_set_a_boolean_setting(word, expected, tmp_path):
    assert load_recipe(None, [f"model.load_in_4bit={word}"]).model.load_in_4bit is expected
    assert load_recipe(None, [f"train.fp16={word}"]).train.fp16 is expected
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  load_in_4bit: {word}\ndata:\n  packing: {word}\n")
    loaded = load_recipe(recipe)
    assert loaded.model.load_in_4bit is expected and loaded.data.packing is expected


@pytest.mark.parametrize("word", ["null", "None", "none", "~"])
def test_a_setting_that_may_be_empty_takes_null_and_none(word):
    recipe = load_recipe(
        None,
        [
            f"train.save_total_limit={word}",
            f"train.eval_steps={word}",
            f"train.max_memory_gib={word}",
            f"data.max_rows={word}",
            f"model.dtype={word}",
        ],
    )
    assert (
        recipe.train.save_total_limit,
        recipe.train.eval_steps,
        recipe.train.max_memory_gib,
        recipe.data.max_rows,
        recipe.model.dtype,
    ) == (None, None, None, None, None)


def test_a_word_that_is_no_value_of_the_setting_is_still_refused():
    with pytest.raises(RecipeError) as e:
        load_recipe(None, ["model.load_in_4bit=nope", "train.save_strategy=off", "lora.bias=no"])
    problems = "\n".join(e.value.problems)
    assert "model.load_in_4bit='nope'" in problems and "save_strategy='off'" in problems and "bias='no'" in problems


def test_quoted_text_stays_text_and_a_resolved_recipe_reads_back_the_same(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text('model:\n  load_in_4bit: "yes"\n')
    with pytest.raises(RecipeError, match="load_in_4bit='yes': expected"):
        load_recipe(recipe)
    recipe.write_text("train:\n  save_strategy: no\n  fp16: off\nlora:\n  target_modules: [q_proj, on]\n")
    loaded = load_recipe(recipe)
    assert loaded.lora.target_modules == ["q_proj", "on"] and type(loaded.lora.target_modules[1]) is str
    loaded.dump(tmp_path / "resolved.yaml")  # the recipe saved beside every output
    again = load_recipe(tmp_path / "resolved.yaml")
    assert again.to_dict() == loaded.to_dict() and again.train.save_strategy == "no" and again.train.fp16 is False


@pytest.mark.parametrize("written", ["1e-3", "1E-3", "+1e-3", "1.0e-3", "0.001"])
def test_a_learning_rate_in_exponent_form_is_a_number(written, tmp_path):
    """YAML 1.1 reads 1e-3 (no dot) as text; a recipe means the number, in --set and in a file."""
    assert load_recipe(None, [f"train.learning_rate={written}"]).train.learning_rate == pytest.approx(1e-3)
    path = tmp_path / "r.yaml"
    path.write_text(f"train:\n  learning_rate: {written}\n")
    assert load_recipe(path).train.learning_rate == pytest.approx(1e-3)
