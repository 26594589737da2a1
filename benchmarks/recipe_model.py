#!/usr/bin/env python3
"""Make (once) the benchmarks' model folder: random bf16 weights of a shape plus the Llama 3 tokenizer
with Meta's llama-3.1 chat template; print its path.

    python3 benchmarks/recipe_model.py [--shape llama-3.2-3b] [--tokenizer .gpu-bundle/tok/tokenizer.json]
                                       [--cache /tmp/hizli-compare]

The folder is CACHE/SHAPE; a folder that already holds a tokenizer is reused as it is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make(shape: str, tokenizer_json: Path, cache: Path) -> Path:
    out = cache / shape
    if (out / "tokenizer_config.json").is_file():
        return out
    sys.path.insert(0, str(ROOT / "src"))
    from hizli.bench.run import load_tokenizer
    from hizli.bench.shapes import random_model_folder
    from hizli.data.templates import get_chat_template

    folder = Path(random_model_folder(shape, cache=cache))
    if folder != out:
        folder.replace(out)
    get_chat_template(load_tokenizer(str(tokenizer_json)), chat_template="llama-3.1").save_pretrained(out)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.2-3b")
    p.add_argument("--tokenizer", default=str(ROOT / ".gpu-bundle" / "tok" / "tokenizer.json"))
    p.add_argument("--cache", default="/tmp/hizli-compare")
    a = p.parse_args()
    print(make(a.shape, Path(a.tokenizer), Path(a.cache)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
