"""The recipe's names as ``from hizli import ...`` gives them, whatever was imported before."""

from __future__ import annotations

import sys
import types

import hizli


class _Trainer:
    def __init__(self) -> None:
        self.calls = 0

    def train(self):
        self.calls += 1
        return "stats"


def test_unsloth_train_runs_the_trainer_after_the_training_package_was_imported():
    import hizli.train.trainer  # noqa: F401  (binds hizli.train to the subpackage, as any hizli run does)
    from hizli import unsloth_train

    trainer = _Trainer()
    assert unsloth_train(trainer) == "stats" and trainer.calls == 1


def test_train_is_the_subpackage_and_not_promised_as_a_function():
    import hizli.train.trainer  # noqa: F401
    from hizli import train

    assert isinstance(train, types.ModuleType) and train is sys.modules["hizli.train"]
    assert "train" not in hizli.__all__ and "unsloth_train" in hizli.__all__


def test_every_exported_name_resolves():
    for name in hizli.__all__:
        assert getattr(hizli, name) is not None, name
