"""The step's loss (``hizli.train.step.loss_sum``): the fused chunked loss and the plain one agree."""

from __future__ import annotations

import torch
from helpers import FakeTokenizer, tiny_lora_model, token_rows

from hizli.data.collate import DataCollatorForSeq2Seq
from hizli.train import step as step_mod


def test_fused_and_plain_loss_give_the_same_sum_and_gradients():
    model = tiny_lora_model()
    batch = DataCollatorForSeq2Seq(tokenizer=FakeTokenizer())(token_rows(4, seed=2))
    moved = step_mod.to_device(batch, torch.device("cpu"))
    results = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        loss = step_mod.loss_sum(model, moved, fused_ce=fused)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((loss.detach(), grads))
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results
    # fp32, the same terms summed in another order (row chunks against all rows at once): the sum of
    # ~100 token losses near 6.2 may differ by a few ulp, a gradient entry by ~1e-6 (measured 1.5e-6)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=0.0)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
