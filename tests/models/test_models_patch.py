"""hizli's attention hook and fused-op routing compute what transformers computes.

On a CPU the fused ops dispatch to their PyTorch references, so these tests check the wiring (which
modules are routed, the padding-free attention, the training-only attention forward); the Triton
kernels themselves are compared with the references in tests/kernels on a GPU.
"""

from __future__ import annotations

import torch

from hizli.data.collate import DataCollatorForSeq2Seq, PaddingFreeCollator
from hizli.models.patch import use_fused_ops, use_hizli_attention
from hizli.train import step as step_mod

from helpers import FakeTokenizer, tiny_llama_config, token_rows


def _pair(seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    plain = LlamaForCausalLM(tiny_llama_config(vocab_size=512))
    fused = LlamaForCausalLM(tiny_llama_config(vocab_size=512))
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def _loss_and_grads(model, batch):
    model.zero_grad()
    model.train()
    b = step_mod.to_device(batch, torch.device("cpu"))
    loss = step_mod.loss_sum(model, b)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_fused_routing_and_padding_free_attention_match_transformers():
    plain, fused = _pair()
    counts = use_fused_ops(fused)
    assert counts == {"rms_norm": 2 * 2 + 1, "swiglu": 2, "rope": 2}
    assert use_hizli_attention(fused) and fused.config._attn_implementation == "hizli"
    rows = token_rows(6, seed=1, vocab=512)
    ref_loss, ref_grads = _loss_and_grads(plain, DataCollatorForSeq2Seq(FakeTokenizer())(rows))
    loss, grads = _loss_and_grads(fused, PaddingFreeCollator()(rows))
    # fp32: one padding-free row against padded rows, hizli's kernels' references against transformers'
    # modules: the same maths in another summation order
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert ref_grads.keys() == grads.keys()
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6)


def test_padding_free_attention_never_crosses_sequences():
    """Changing one sequence must not change another's outputs in the same padding-free row."""
    _, model = _pair()
    use_hizli_attention(model)
    model.eval()
    rows = token_rows(3, seed=2, vocab=512)
    other = [dict(r) for r in rows]
    other[0] = {"input_ids": [7] * len(rows[0]["input_ids"]), "labels": rows[0]["labels"]}

    def hidden(rs):
        b = step_mod.to_device(PaddingFreeCollator()(rs), torch.device("cpu"))
        from hizli.models.patch import padding_free

        with torch.no_grad(), padding_free():
            return model.model(**b.inputs).last_hidden_state[0]

    h1, h2 = hidden(rows), hidden(other)
    n0 = len(rows[0]["input_ids"])
    assert not torch.allclose(h1[:n0], h2[:n0])
    torch.testing.assert_close(h1[n0:], h2[n0:])


def test_generation_after_patching_is_unchanged():
    plain, fused = _pair()
    use_fused_ops(fused)
    use_hizli_attention(fused)
    ids = torch.tensor([[5, 9, 13, 200, 31]])
    for m in (plain, fused):
        m.eval()
    a = plain.generate(ids, max_new_tokens=6, do_sample=False)
    b = fused.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)
