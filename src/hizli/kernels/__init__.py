"""Fused ops of the training step, one op per module; each has a pure-PyTorch ``<op>_reference``.

=====================================  ===============================================================
module: public op                      what
=====================================  ===============================================================
``rms_norm``: ``rms_norm``             Llama RMSNorm, forward + backward (grad x, grad weight)
``rope``: ``rope``                     rotary embedding of q and k with per-token positions (the
(alias ``apply_rotary_pos_emb``)       signature of transformers' ``apply_rotary_pos_emb``)
``swiglu``: ``swiglu``                 ``silu(gate) * up``
``cross_entropy``:                     lm_head + cross-entropy in row chunks, full logits never made
``fused_linear_cross_entropy``
``attention``: ``varlen_attention``    causal attention within each sequence of a padding-free row;
                                       ``attention_candidates()`` lists the GPU kernels to time
``nf4``: ``dequantize_nf4``            a bitsandbytes NF4 weight to bf16/fp16/fp32, into a buffer
``lora_qkv``: ``lora_qkv``             LoRA projections sharing an input (q/k/v, rotating q and k; o)
                                       on a frozen, possibly NF4, base
``lora_mlp``: ``lora_mlp``             the Llama MLP ``down(silu(gate(x)) * up(x))`` with LoRA on all
                                       three projections
=====================================  ===============================================================

``dispatch`` is the one switch (``HIZLI_KERNELS=auto|triton|reference``): Triton on CUDA tensors when
Triton imports, the reference elsewhere. Nothing here imports Triton until a kernel first runs, so
these modules import on any machine. Besides the ops: ``lora_casts`` (the adapters' compute-dtype
copies the LoRA ops reuse between optimizer steps), ``launch`` (a kernel launched again with most
arguments unchanged, past Triton's per-call Python: ``HIZLI_TRITON_LAUNCH=direct``, off by default)
and private helpers (``_triton_utils``, ``_lora``, ``_precompile``: Triton compiles ahead in a
background process, started by ``hizli.models.warmup``).

Import ops from their module (``from hizli.kernels.rms_norm import rms_norm``): the package does not
re-export them, because three ops share their module's name and a re-export would shadow the
module attribute.
"""
