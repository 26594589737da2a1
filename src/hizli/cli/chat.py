"""``hizli chat PATH``: a streamed REPL (or one answer with --prompt) over any model hizli can load."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "chat",
        help="talk to a model, adapter folder or GGUF file",
        description="Chat through the model's chat template. Interactive by default "
        "(/reset clears the history, /exit quits); --prompt answers once and exits.",
    )
    c.add_argument(
        "path",
        help="adapter folder (lora_model), merged folder, .gguf file, hub id, or "
        "an embedded model name (smollm2-135m-instruct)",
    )
    c.add_argument("--prompt", help="answer this one message and exit")
    c.add_argument("--system", help="system message to start the conversation with")
    c.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    c.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 answers greedily, reproducibly (default); the recipe samples with 1.5",
    )
    c.add_argument("--min-p", type=float, default=0.1, help="min-p sampling cut-off when temperature > 0")
    c.add_argument("--template", help="chat template name to use instead of the tokenizer's own")
    c.add_argument("--load-in-4bit", action="store_true", help="load the base weights in 4-bit (NF4)")
    c.add_argument("--max-seq-length", type=int, default=2048)


def run(args: argparse.Namespace) -> int:
    from hizli.models import inference, loader

    model, tokenizer = loader.load(
        args.path,
        max_seq_length=args.max_seq_length,
        load_in_4bit=args.load_in_4bit,
        adapter_trainable=False,
    )
    from hizli.data.templates import get_chat_template, stop_token_ids

    if args.template:
        tokenizer = get_chat_template(tokenizer, chat_template=args.template)
    stop_ids = stop_token_ids(tokenizer)
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})

    def answer(text: str) -> str:
        history.append({"role": "user", "content": text})
        reply = inference.generate_reply(
            model,
            tokenizer,
            history,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            min_p=args.min_p,
            stream=True,
            stop_ids=stop_ids,
        )
        history.append({"role": "assistant", "content": reply})
        return reply

    if args.prompt is not None:
        answer(args.prompt)
        return 0
    print("hizli chat: type a message; /reset clears the conversation, /exit quits.", file=sys.stderr)
    while True:
        try:
            text = input(">>> ")
        except EOFError:
            print()
            return 0
        command = text.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            del history[1 if args.system else 0 :]
            print("(conversation cleared)", file=sys.stderr)
            continue
        if command:
            answer(text)
