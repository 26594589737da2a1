"""Recipes: YAML files that mirror typed dataclasses one to one.

Sections: ``model`` (FastLanguageModel.from_pretrained), ``lora`` (get_peft_model), ``data``
(dataset, template, what to train on), ``train`` (TrainingArguments, same field names), ``output``
(where the adapter goes), ``chat`` (the answer printed after training). Defaults are the reference
recipe's values. Every problem in a file (unknown key with the nearest valid one, wrong type,
out-of-range value, missing local file, incompatible combination) is reported together, before any
model is loaded.

Values are read as they are written, in files and in ``--set``: an unquoted yes/no/on/off is a
boolean only for a boolean setting (``load_in_4bit: no``) and the word elsewhere (``save_strategy: no``;
YAML 1.1 alone would read it as False); a setting that may be empty takes ``null``, ``none`` or ``None``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from hizli.models.lora import RECIPE_TARGETS
from hizli.train.args import TrainingArguments, validate_fields


class RecipeError(ValueError):
    """One or more problems in a recipe; ``problems`` lists them all."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))


@dataclass
class ModelSettings:
    name: str = "unsloth/Llama-3.2-3B-Instruct"
    max_seq_length: int = 2048
    dtype: Union[str, None] = None
    load_in_4bit: bool = True
    trust_remote_code: bool = False
    allow_pickle: bool = False


@dataclass
class LoraSettings:
    r: int = 16
    target_modules: list = field(default_factory=lambda: list(RECIPE_TARGETS))
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    bias: str = "none"
    use_gradient_checkpointing: Union[bool, str] = "unsloth"
    random_state: int = 3407
    use_rslora: bool = False
    loftq_config: Union[dict, None] = None


@dataclass
class DataSettings:
    dataset: str = "mlabonne/FineTome-100k"
    split: str = "train"
    schema: str = "auto"  # auto | sharegpt | messages | alpaca
    chat_template: str = "llama-3.1"
    train_on_responses_only: bool = False
    unknown_roles: str = "assistant"  # what odd ShareGPT roles (chatgpt, bing, ...) become
    max_rows: Union[int, None] = None
    eval_rows: int = 0  # rows held out for eval loss (taken from the end after shuffling)
    dataset_num_proc: int = 2
    packing: bool = False


@dataclass
class OutputSettings:
    adapter_dir: str = "lora_model"
    overwrite: bool = False  # replace an earlier run's checkpoints and adapter folder
    push_to_hub: Union[str, None] = None


@dataclass
class ChatSettings:
    prompt: Union[str, None] = "Continue the fibonnaci sequence: 1, 1, 2, 3, 5, 8,"
    max_new_tokens: int = 64
    temperature: float = 1.5
    min_p: float = 0.1


def _reference_train() -> dict[str, Any]:
    return dict(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        warmup_steps=5,
        max_steps=60,
        learning_rate=2e-4,
        logging_steps=1,
        optim="adamw_8bit",
        weight_decay=0.01,
        lr_scheduler_type="linear",
        seed=3407,
        output_dir="outputs",
        report_to="none",
        save_strategy="no",
    )


SECTIONS = {
    "model": ModelSettings,
    "lora": LoraSettings,
    "data": DataSettings,
    "output": OutputSettings,
    "chat": ChatSettings,
}


@dataclass
class Recipe:
    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainingArguments = field(default_factory=lambda: TrainingArguments(**_reference_train()))
    output: OutputSettings = field(default_factory=OutputSettings)
    chat: ChatSettings = field(default_factory=ChatSettings)

    def to_dict(self) -> dict[str, Any]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["train"] = self.train.to_dict()
        return {k: out[k] for k in ("model", "lora", "data", "train", "output", "chat")}

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that an unquoted yes/no/on/off stays the word as written (a
    :class:`_Word`) until the setting it is given to is known. YAML 1.1 reads those words as booleans,
    which turned ``save_strategy: no`` (a documented value) into False."""


class _Word(str):
    """An unquoted yes/no/on/off: a boolean for a boolean setting, the word itself for any other."""


_BOOL_TAG, _WORD_TAG = "tag:yaml.org,2002:bool", "tag:hizli,2024:word"
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_RecipeLoader.add_implicit_resolver(
    _WORD_TAG, re.compile(r"^(?:yes|Yes|YES|no|No|NO|on|On|ON|off|Off|OFF)$"), list("yYnNoO")
)
# YAML 1.1 wants a dot in a float, so 1e-3 (how learning rates are written) would stay a string
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"), list("-+0123456789")
)
_RecipeLoader.add_constructor(_WORD_TAG, lambda loader, node: _Word(loader.construct_scalar(node)))
_BOOL_WORDS = {"yes": True, "on": True, "no": False, "off": False}


def _read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: no arbitrary objects


def _annotation(annotation: Any) -> Any:
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {"Union": Union})  # our own annotations only
    return annotation


def _accepts(annotation: Any, kind: type) -> bool:
    """Whether a field's annotation names ``kind`` itself (``Any`` does not count)."""
    annotation = _annotation(annotation)
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return any(_accepts(a, kind) for a in typing.get_args(annotation))
    return annotation is kind


def _plain(value: Any) -> Any:
    if isinstance(value, _Word):
        return str(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def _word_value(value: Any, annotation: Any) -> Any:
    """The value a setting gets: an unquoted yes/no/on/off is a boolean for a boolean setting and the
    word otherwise; none/null is None for a setting that may be empty (``must be ... or None``)."""
    if isinstance(value, _Word) and _accepts(annotation, bool):
        return _BOOL_WORDS[value.lower()]
    if isinstance(value, str) and value.strip().lower() in ("none", "null") and _accepts(annotation, type(None)):
        return None
    return _plain(value)


def _type_ok(value: Any, annotation: Any) -> bool:
    if annotation is Any:
        return True
    annotation = _annotation(annotation)
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation in (list, dict, str):
        return isinstance(value, annotation)
    return True


def _near(key: str, valid: typing.Iterable[str]) -> str:
    m = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{m[0]}'?)" if m else ""


def _section(cls, values: dict[str, Any], where: str, problems: list[str]):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            problems.append(f"{where}.{key}: unknown key{_near(key, fields)}")
            continue
        value = _word_value(value, fields[key].type)
        if not _type_ok(value, fields[key].type):
            problems.append(f"{where}.{key}={value!r}: expected {fields[key].type}")
            continue
        kwargs[key] = value
    return cls(**kwargs)


def _train_section(values: dict[str, Any], problems: list[str]) -> TrainingArguments:
    merged = {**_reference_train(), **values}
    annotations = {f.name: f.type for f in dataclasses.fields(TrainingArguments) if f.name != "extra"}
    for key in [k for k in merged if k not in annotations]:
        problems.append(f"train.{key}: unknown key{_near(key, annotations)}")
        merged.pop(key)
    merged = {key: _word_value(value, annotations[key]) for key, value in merged.items()}
    args = TrainingArguments.__new__(TrainingArguments)  # filled below without raising: problems are collected
    defaults = {
        f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
        for f in dataclasses.fields(TrainingArguments)
    }
    for name, value in defaults.items():
        setattr(args, name, merged.get(name, value))
    problems.extend(f"train.{p}" for p in validate_fields(args))
    return args


def recipe_from_dict(raw: dict[str, Any] | None, source: str = "recipe") -> Recipe:
    raw = raw or {}
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise RecipeError(source, [f"the top level must be a mapping of sections, got {type(raw).__name__}"])
    valid = list(SECTIONS) + ["train"]
    for key in raw:
        if key not in valid:
            problems.append(f"{key}: unknown section{_near(key, valid)}; sections are {', '.join(valid)}")
    parts: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            problems.append(f"{name}: expected a mapping of settings, got {values!r}")
            values = {}
        parts[name] = _section(cls, values, name, problems)
    train_values = raw.get("train") or {}
    if not isinstance(train_values, dict):
        problems.append(f"train: expected a mapping of settings, got {train_values!r}")
        train_values = {}
    parts["train"] = _train_section(train_values, problems)
    recipe = Recipe(**parts)
    problems.extend(_cross_checks(recipe))
    if problems:
        raise RecipeError(source, problems)
    return recipe


def _cross_checks(r: Recipe) -> list[str]:
    problems = []
    m, lo, d = r.model, r.lora, r.data
    if m.max_seq_length < 8:
        problems.append(f"model.max_seq_length={m.max_seq_length} must be >= 8")
    if lo.r <= 0:
        problems.append(f"lora.r={lo.r} must be > 0")
    if not 0 <= lo.lora_dropout < 1:
        problems.append(f"lora.lora_dropout={lo.lora_dropout} must be in [0, 1)")
    if lo.use_gradient_checkpointing not in (True, False, "unsloth"):
        problems.append(
            f'lora.use_gradient_checkpointing={lo.use_gradient_checkpointing!r}: use true, false or "unsloth"'
        )
    if lo.loftq_config:
        problems.append("lora.loftq_config: LoftQ is not supported yet; leave it null")
    if d.schema not in ("auto", "sharegpt", "messages", "alpaca"):
        problems.append(f"data.schema={d.schema!r}: use auto, sharegpt, messages or alpaca")
    if d.unknown_roles not in ("assistant", "user", "drop", "error"):
        problems.append(f"data.unknown_roles={d.unknown_roles!r}: use assistant, user, drop or error")
    if d.max_rows is not None and d.max_rows <= 0:
        problems.append(f"data.max_rows={d.max_rows} must be > 0 or null")
    if d.eval_rows < 0:
        problems.append(f"data.eval_rows={d.eval_rows} must be >= 0")
    if d.dataset_num_proc < 1:
        problems.append(f"data.dataset_num_proc={d.dataset_num_proc} must be >= 1")
    for what, value in (("model.name", m.name), ("data.dataset", d.dataset)):
        p = Path(value).expanduser()
        local = value.startswith((".", "/", "~")) or p.suffix in (".jsonl", ".json", ".parquet", ".gguf")
        if local and not p.exists():
            problems.append(f"{what}={value!r}: no such file or folder")
    problems.extend(_checks_before_loading(r))
    return problems


def _checks_before_loading(r: Recipe) -> list[str]:
    """Settings that would otherwise fail only after the model is loaded (minutes into a run)."""
    from hizli.models.loader import _DTYPE_NAMES

    problems = []
    m, lo, d, t, c = r.model, r.lora, r.data, r.train, r.chat
    if m.dtype not in (None, "auto") and str(m.dtype).lower() not in _DTYPE_NAMES:
        problems.append(f"model.dtype={m.dtype!r}: use null (auto), bfloat16, float16 or float32")
    if not lo.target_modules or not all(isinstance(x, str) and x for x in lo.target_modules):
        problems.append(
            f"lora.target_modules={lo.target_modules!r}: give a list of module names, e.g. "
            f"[{', '.join(RECIPE_TARGETS)}]"
        )
    if lo.bias not in ("none", "all", "lora_only"):
        problems.append(f"lora.bias={lo.bias!r}: use none, all or lora_only")
    if not lo.lora_alpha > 0:
        problems.append(f"lora.lora_alpha={lo.lora_alpha} must be > 0")
    try:
        from hizli.data.templates import lookup

        lookup(d.chat_template)
    except ValueError as e:
        problems.append(f"data.{e}")
    if d.dataset.startswith("hizli:"):
        from hizli.data.sample import FILES

        if d.dataset.split(":", 1)[1].replace("_", "-") not in FILES:
            problems.append(
                f"data.dataset={d.dataset!r}: hizli's packaged samples are {', '.join('hizli:' + k for k in FILES)}"
            )
    if t.eval_strategy != "no" and not d.eval_rows:
        problems.append(
            f"train.eval_strategy={t.eval_strategy!r} needs rows to evaluate on: set data.eval_rows "
            "(e.g. 100) or train.eval_strategy=no"
        )
    resume = t.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() not in ("", "true", "false") and not Path(resume).is_dir():
        problems.append(f"train.resume_from_checkpoint={resume!r}: no such checkpoint folder")
    # Recipes travel between people: a relative path in one may not climb out of the folder it is run
    # from (an absolute path says plainly where it writes, and stays allowed).
    for what, value in (("train.output_dir", t.output_dir), ("output.adapter_dir", r.output.adapter_dir)):
        if isinstance(value, str) and ".." in Path(value).parts:
            problems.append(
                f"{what}={value!r} climbs out of the working folder with '..'; write the path "
                "without '..' (an absolute path if you mean a folder elsewhere)"
            )
    if not isinstance(c.max_new_tokens, int) or c.max_new_tokens < 1:
        problems.append(f"chat.max_new_tokens={c.max_new_tokens!r} must be an integer >= 1")
    if c.temperature < 0:
        problems.append(f"chat.temperature={c.temperature} must be >= 0 (0 = greedy)")
    if not 0 <= c.min_p <= 1:
        problems.append(f"chat.min_p={c.min_p} must be in [0, 1]")
    return problems


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file (or the reference defaults) and apply ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    source = "recipe"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            candidate = Path("configs") / f"{path}.yaml"
            if candidate.is_file():
                p = candidate
            else:
                raise FileNotFoundError(f"recipe file {str(path)!r} not found")
        source = str(p)
        try:
            raw = _read_yaml(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise RecipeError(source, [f"not valid YAML: {e}"]) from e
        except UnicodeDecodeError as e:
            raise RecipeError(source, [f"not UTF-8 text (byte {e.start}): is this a recipe file?"]) from e
        if not isinstance(raw, dict):
            raise RecipeError(source, [f"the top level must be a mapping of sections, got {type(raw).__name__}"])
    problems: list[str] = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            problems.append(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. train.max_steps=10")
            continue
        if raw.get(parts[0]) is None:  # `train:` with nothing under it
            raw[parts[0]] = {}
        section = raw[parts[0]]
        if not isinstance(section, dict):
            problems.append(f"--set {item!r}: section {parts[0]!r} is not a mapping in the recipe")
            continue
        try:
            section[parts[1]] = _read_yaml(value) if value.strip() else None
        except yaml.YAMLError as e:
            problems.append(f"--set {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})")
    try:
        recipe = recipe_from_dict(raw, source)
    except RecipeError as e:  # the malformed --set items and the recipe's own problems, together
        raise RecipeError(source, problems + e.problems) from None
    if problems:
        raise RecipeError(source, problems)
    return recipe
