#!/usr/bin/env python3
"""Seconds from process start to a loaded 4-bit model: ``from hizli import FastLanguageModel`` and
``from_pretrained(FOLDER, load_in_4bit=True)``, nothing else (the figures in ``hizli._startup``).

    python3 benchmarks/load_time.py FOLDER [--no-gc-pause]

FOLDER: a transformers model folder with a tokenizer, e.g. the bench's tiny shape, made with
``python3 -c "from hizli.bench.shapes import random_model_folder as r; from hizli.bench.run import
load_tokenizer as t; t(None).save_pretrained(r('tiny'))"`` (it prints nothing; the folder is
/tmp/hizli-bench/tiny). ``--no-gc-pause`` turns the garbage-collector pause into a no-op before
hizli is imported, for the comparison. Run it several times: one run says little.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def main() -> int:
    from hizli.bench.run import process_start_time  # standard library only at import

    t0 = process_start_time()
    folder = next(a for a in sys.argv[1:] if not a.startswith("--"))
    if "--no-gc-pause" in sys.argv:
        import hizli._startup

        hizli._startup.gc_paused = contextmanager(lambda: (yield))  # usable as a decorator too
    from hizli import FastLanguageModel

    t_import = time.time()
    FastLanguageModel.from_pretrained(folder, load_in_4bit=True)
    done = time.time()
    print(f"import {t_import - t0:.2f} s, from_pretrained {done - t_import:.2f} s, total {done - t0:.2f} s"
          f"{' (no gc pause)' if '--no-gc-pause' in sys.argv else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
