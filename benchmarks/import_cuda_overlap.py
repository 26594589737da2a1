"""Does CUDA initialisation overlap the big imports if it runs in a thread? (Used by gpu_startup2.sh.)

    python3 benchmarks/import_cuda_overlap.py seq|thread

seq: import torch, transformers (AutoModelForCausalLM), PEFT and bitsandbytes, then initialise CUDA
and compute Triton's cache key; thread: the same with the second part in a thread started right
after ``import torch``. Prints the seconds of each part. On an H100 (2026-11-28) the thread gained
nothing: imports are Python holding the GIL (docs/BENCHMARKS.md).
"""
import sys, time, threading
t0 = time.time()
mode = sys.argv[1]
import torch
t_torch = time.time()
marks = {}
def init():
    a = time.time(); torch.cuda.init(); torch.empty(1, device="cuda"); marks["cuda"] = (round(a - t0, 2), round(time.time() - a, 2))
    a = time.time()
    from triton.runtime.cache import triton_key
    try:
        triton_key()
    except Exception as e:
        marks["tk_err"] = repr(e)
    marks["triton_key"] = round(time.time() - a, 2)
th = threading.Thread(target=init)
if mode == "thread":
    th.start()
import transformers  # noqa: F401 - the imports are what is timed
from transformers import AutoModelForCausalLM  # noqa: F401
import peft, bitsandbytes  # noqa: F401
t_imp = time.time()
if mode == "thread":
    th.join()
else:
    init()
print(mode, {"torch": round(t_torch - t0, 2), "imports": round(t_imp - t0, 2), "total": round(time.time() - t0, 2), **marks})
