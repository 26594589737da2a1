"""``hizli chat``: a streamed REPL (or one answer with --prompt) over any model hizli can load."""

from __future__ import annotations

import sys


def run_chat(args) -> int:
    from hizli.models import inference, loader

    model, tokenizer = loader.load(
        args.path, max_seq_length=args.max_seq_length, load_in_4bit=args.load_in_4bit,
        adapter_trainable=False,
    )
    if args.template:
        from hizli.data.templates import get_chat_template

        tokenizer = get_chat_template(tokenizer, chat_template=args.template)
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})

    def answer(text: str) -> str:
        history.append({"role": "user", "content": text})
        reply = inference.generate_reply(
            model, tokenizer, history, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, min_p=args.min_p, stream=True,
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
            del history[1 if args.system else 0:]
            print("(conversation cleared)", file=sys.stderr)
            continue
        if command:
            answer(text)
