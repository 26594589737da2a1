"""``hizli templates [NAME]``: list the chat templates, or render a sample conversation through one."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    tp = sub.add_parser(
        "templates",
        help="list chat templates, or render one",
        description="Without NAME, list the registered chat templates; with NAME, render a "
        "sample conversation through it.",
    )
    tp.add_argument("name", nargs="?")


def run(args: argparse.Namespace) -> int:
    from hizli.data.templates import EOS, SAMPLE_CONVERSATION, lookup, registry, render

    def show(eot: str) -> str:
        return "EOS" if eot == EOS else eot

    name = args.name
    if not name:
        rows = [(info.name, ", ".join(info.aliases) or "-", show(info.end_of_turn)) for info in registry().values()]
        w0 = max(len(r[0]) for r in rows)
        w2 = max(len(r[2]) for r in rows)
        print(f"{'template':<{w0}}  {'ends a turn':<{w2}}  aliases")
        for n, aliases, eot in rows:
            print(f"{n:<{w0}}  {eot:<{w2}}  {aliases}")
        print(f"\n{len(rows)} templates. `hizli templates NAME` renders a sample conversation.")
        return 0
    info = lookup(name)
    text = render(info, SAMPLE_CONVERSATION, add_generation_prompt=True)
    print(f"# {info.name}  (aliases: {', '.join(info.aliases) or '-'}; source: {info.source})")
    print(
        f"# ends a turn: {show(info.end_of_turn)}   turn markers (user / assistant): "
        f"{json.dumps(info.instruction_part)} / {json.dumps(info.response_part)}"
    )
    if info.default_system is not None:
        print(f"# default system message: {json.dumps(info.default_system)}")
    print("# rendered (system, user, assistant, user + generation prompt), between the lines:")
    print("-" * 60)
    print(text)
    print("-" * 60)
    return 0
