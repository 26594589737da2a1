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
=====================================  ===============================================================

``dispatch`` is the one switch (``HIZLI_KERNELS=auto|triton|reference``): Triton on CUDA tensors when
Triton imports, the reference elsewhere. Nothing here imports Triton until a kernel first runs, so
these modules import on any machine.

Import ops from their module (``from hizli.kernels.rms_norm import rms_norm``): the package does not
re-export them, because three ops share their module's name and a re-export would shadow the
module attribute.
"""
