"""One in-process server on the embedded model for all serve tests (the model loads once)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smol_served():
    """``load_models`` on the embedded model: ``{name: ServedModel}`` (context 512, up to 8 in a batch)."""
    from hizli.serve.app import load_models

    models = load_models("smollm2-135m-instruct", context=512, max_batch=8, max_queue=64)
    yield models
    next(iter(models.values())).engine.close()


@pytest.fixture(scope="session")
def server(smol_served):
    """A running server on a free loopback port; ``server.url`` is its base URL.

    Besides the embedded model it serves ``busy``, an engine whose waiting queue holds nothing,
    so every request for it meets a full server.
    """
    from hizli.serve.app import stop_ids, start
    from hizli.serve.engine import Engine
    from hizli.serve.http import ServedModel
    from hizli.serve.protocol import Limits

    served = next(iter(smol_served.values()))
    model = served.engine.slots.model
    busy = Engine(model, served.tokenizer, stop_ids(model, served.tokenizer), max_slots=1, max_queue=0, context=512)
    models = dict(smol_served, busy=ServedModel("busy", busy, served.tokenizer))
    srv = start(models, "127.0.0.1", 0, limits=Limits(max_body_bytes=1024 * 1024, max_tokens=256, context=512))
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    busy.close()


@pytest.fixture(scope="session")
def client(server):
    """The unchanged ``openai`` package pointed at the test server."""
    openai = pytest.importorskip("openai", reason="the openai package is in hizli[test]")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
