"""hizli.kernels._weak.IdWeakMap: the per-weight caches find their entry by identity and never keep a
weight (or its quantization state) alive."""

from __future__ import annotations

import gc

import pytest
import torch

from hizli.kernels._weak import IdWeakMap


def test_entries_by_identity_and_gone_with_their_key():
    cache = IdWeakMap()
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))  # equal values, two keys
    cache[a] = "a"
    cache[b] = "b"
    cache[a] = "a2"  # replaced, not added
    assert cache.get(a) == "a2" and cache.get(b) == "b" and a in cache and len(cache) == 2
    assert cache.get(torch.nn.Parameter(torch.zeros(2)), "none") == "none"
    del a
    gc.collect()
    assert len(cache) == 1 and [value for _, value in cache.items()] == ["b"]
    assert len(cache._entries) == 1  # the entry itself went, not only its key


def test_a_key_without_weak_references_is_refused():
    with pytest.raises(TypeError):
        IdWeakMap()[(1, 2)] = "tuple"
