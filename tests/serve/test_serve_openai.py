"""The unchanged ``openai`` client against ``hizli serve`` on the embedded model."""

from __future__ import annotations

import json
import urllib.request

MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "Name three colours of the rainbow."}]


def _prompt_len(tokenizer, messages) -> int:
    return len(
        tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
    )


def test_models_lists_the_embedded_model(client):
    assert MODEL in [m.id for m in client.models.list()]


def test_chat_whole_answer_cut_by_max_tokens(client, smol_tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens == _prompt_len(smol_tokenizer, ASK)
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    # the text is what those 12 tokens decode to, so re-encoding it counts 12 again
    assert len(smol_tokenizer(choice.message.content, add_special_tokens=False)["input_ids"]) == 12


def test_chat_stops_by_itself_with_finish_stop(client, smol_tokenizer):
    messages = [{"role": "user", "content": "Reply with just the word: yes"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=200, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 200
    # the end-of-turn token is generated and counted, but it is not text
    answer = smol_tokenizer(r.choices[0].message.content, add_special_tokens=False)["input_ids"]
    assert r.usage.completion_tokens == len(answer) + 1


def test_stream_gives_the_same_answer_and_a_usage_chunk(client):
    whole = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 3  # it really streamed
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_raw_stream_is_server_sent_events_ending_in_done(server):
    body = json.dumps({"model": MODEL, "messages": ASK, "max_tokens": 4, "stream": True}).encode()
    req = urllib.request.Request(
        server.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert "Access-Control-Allow-Origin" not in resp.headers  # no CORS unless asked for
        events = [e for e in resp.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert "usage" not in json.loads(events[-2][6:]) or json.loads(events[-2][6:])["usage"] is None


def test_stop_string_ends_the_answer_before_it(client):
    free = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=24, temperature=0)
    text = free.choices[0].message.content
    cut = text.split()[2]  # a word from the middle of the greedy answer
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=24, temperature=0, stop=[cut])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[: text.index(cut)]
    s = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=24, temperature=0, stop=cut, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == text[: text.index(cut)]


def test_seed_makes_sampling_repeatable(client):
    kw = dict(model=MODEL, messages=ASK, max_tokens=12, temperature=1.0, top_p=0.9)
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    assert a == b


def test_text_completion(client, smol_tokenizer):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(smol_tokenizer("The capital of France is")["input_ids"])
    assert r.usage.completion_tokens == 5 and r.choices[0].text
    s = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in s if c.choices) == r.choices[0].text


def test_health_and_chat_page(server):
    with urllib.request.urlopen(server.url + "/health", timeout=30) as resp:
        health = json.loads(resp.read())
    assert health["status"] == "ok" and MODEL in health["models"]
    with urllib.request.urlopen(server.url + "/", timeout=30) as resp:
        page = resp.read().decode()
    assert resp.headers["Content-Type"].startswith("text/html")
    assert "/v1/chat/completions" in page and "http://" not in page and "https://" not in page  # nothing fetched
