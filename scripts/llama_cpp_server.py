#!/usr/bin/env python
"""llama-cpp-python's OpenAI-compatible server with plain CPU buffers: the side-by-side serving
measurement in docs/SERVE.md runs llama.cpp through this. On CPUs with AMX-INT8, llama.cpp's extra
buffer types (AMX, repacked weights) crash in decode on quantized files; elsewhere pass
``--extra-bufts`` to keep them. Arguments are the server's own (``python -m llama_cpp.server --help``).
"""

import runpy
import sys

import llama_cpp

if "--extra-bufts" in sys.argv:
    sys.argv.remove("--extra-bufts")
else:
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def plain_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = plain_buffers
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
