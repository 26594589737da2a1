"""Load generator for any OpenAI-compatible server: N concurrent streaming chat clients.

Each client sends its requests one after another (streaming, ``temperature`` 0 by default) with
prompts from the packaged ShareGPT sample, and records time to first token and the tokens it got.
Aggregate tokens/s is all completion tokens over the wall time from the first request to the last
answer. It speaks plain HTTP with the standard library so that the client costs little CPU next to
the server it measures on the same machine.

    hizli bench serve --url http://127.0.0.1:8000 --clients 1,16,32 --json out.json
"""

from __future__ import annotations

import http.client
import json
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from urllib.parse import urlparse


@dataclass
class Result:
    """One request as the client saw it."""

    ok: bool
    ttft_s: float = 0.0  # request sent -> first text received
    total_s: float = 0.0
    completion_tokens: int = 0
    error: str = ""


@dataclass
class Run:
    """One load level: ``clients`` concurrent clients, ``requests`` each."""

    clients: int
    requests: int
    wall_s: float = 0.0
    results: list[Result] = field(default_factory=list)

    def summary(self) -> dict:
        ok = [r for r in self.results if r.ok]
        ttft = sorted(r.ttft_s for r in ok)
        tokens = sum(r.completion_tokens for r in ok)
        return {
            "clients": self.clients,
            "requests": len(self.results),
            "completed": len(ok),
            "errors": len(self.results) - len(ok),
            "first_errors": [r.error for r in self.results if not r.ok][:3],
            "completion_tokens": tokens,
            "wall_s": round(self.wall_s, 2),
            "aggregate_tok_s": round(tokens / self.wall_s, 2) if self.wall_s else 0.0,
            "per_client_tok_s": round(statistics.mean(r.completion_tokens / r.total_s for r in ok if r.total_s), 2)
            if ok
            else 0.0,
            "ttft_p50_s": round(_quantile(ttft, 0.5), 3),
            "ttft_p95_s": round(_quantile(ttft, 0.95), 3),
        }


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def sample_prompts(n: int = 64, max_chars: int = 300) -> list[str]:
    """First user turns of the packaged ShareGPT sample, cut to ``max_chars``."""
    text = resources.files("hizli.data.sample").joinpath("sharegpt_sample.jsonl").read_text()
    prompts = []
    for line in text.splitlines():
        turns = json.loads(line).get("conversations") or []
        first = next((t.get("value") for t in turns if t.get("from") in ("human", "user")), None)
        if first:
            prompts.append(first[:max_chars])
        if len(prompts) >= n:
            break
    return prompts


def one_request(url: str, model: str, prompt: str, max_tokens: int, temperature: float, timeout: float) -> Result:
    """Send one streaming chat request and read its events to the end."""
    u = urlparse(url)
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    start = time.perf_counter()
    first = None
    chunks = 0
    usage_tokens = None
    try:
        conn.request(
            "POST", (u.path.rstrip("/") or "") + "/v1/chat/completions", body, {"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        if resp.status != 200:
            return Result(False, error=f"HTTP {resp.status}: {resp.read()[:200]!r}")
        buffer = b""
        done = False
        while not done:
            data = resp.read1(65536) if hasattr(resp, "read1") else resp.read(1024)
            if not data:
                break
            buffer += data
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                line = event.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(payload)
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        chunks += 1
                        if first is None:
                            first = time.perf_counter()
        end = time.perf_counter()
        if not done:
            return Result(False, error="the stream ended without [DONE]")
        tokens = usage_tokens if usage_tokens is not None else chunks  # a server without usage: one per chunk
        return Result(True, (first or end) - start, end - start, tokens)
    except (OSError, ValueError, http.client.HTTPException) as e:
        return Result(False, error=f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def run_load(
    url: str,
    model: str,
    clients: int,
    requests: int = 2,
    *,
    max_tokens: int = 64,
    temperature: float = 0.0,
    timeout: float = 600.0,
) -> Run:
    """``clients`` threads, each sending ``requests`` streaming requests in a row."""
    prompts = sample_prompts()
    run = Run(clients, requests)
    lock = threading.Lock()

    def client(index: int) -> None:
        for k in range(requests):
            prompt = prompts[(index * requests + k) % len(prompts)]
            r = one_request(url, model, prompt, max_tokens, temperature, timeout)
            with lock:
                run.results.append(r)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run.wall_s = time.perf_counter() - start
    return run


def _load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def measure(
    url: str,
    *,
    model: str = "smollm2-135m-instruct",
    levels: list[int] = (1, 16, 32),
    requests: int = 2,
    max_tokens: int = 64,
    temperature: float = 0.0,
    label: str = "",
    json_path: str | None = None,
) -> list[dict]:
    """Run ``run_load`` at each concurrency level after one unmeasured warm-up request; print one summary
    line per level, append the full rows (with every request) to ``json_path``; return the rows."""
    one_request(url, model, "Hello", 4, 0.0, 600)  # warm-up, not measured
    rows = []
    shown = (
        "label",
        "clients",
        "completed",
        "errors",
        "aggregate_tok_s",
        "per_client_tok_s",
        "ttft_p50_s",
        "ttft_p95_s",
        "wall_s",
        "load_average_before",
    )
    for n in levels:
        before = _load_average()
        run = run_load(url, model, n, requests, max_tokens=max_tokens, temperature=temperature)
        row = dict(
            run.summary(),
            label=label,
            url=url,
            model=model,
            max_tokens=max_tokens,
            load_average_before=before,
            load_average_after=_load_average(),
            date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            machine=platform.processor() or platform.machine(),
            command=" ".join(sys.argv),
        )
        print(json.dumps({k: row[k] for k in shown}), flush=True)
        if json_path:
            with open(json_path, "a") as f:
                f.write(json.dumps(dict(row, results=[asdict(r) for r in run.results])) + "\n")
        rows.append(row)
    return rows


def serve_records(rows: list[dict], *, system: str, requests: int, temperature: float, command: str) -> list[dict]:
    """``measure``'s rows as ``benchmarks/results/serve.jsonl`` records (one per concurrency level, one
    call). ``system`` names the server under test (``hizli``, ``llama.cpp``, ...); the device is this
    machine, where the server runs in a local measurement."""
    from hizli.bench import results

    date = results.utc_now()
    device = results.device_info()
    call = f"{date}-{results.slug(device['name'])}-serve"
    metric_keys = ("completed", "errors", "completion_tokens", "aggregate_tok_s", "per_client_tok_s")
    metric_keys += ("ttft_p50_s", "ttft_p95_s", "wall_s")
    return [
        results.make_record(
            "serve",
            system,
            {
                "model": row["model"],
                "clients": row["clients"],
                "requests_per_client": requests,
                "max_tokens": row["max_tokens"],
                "temperature": temperature,
                "url": row["url"],
            },
            {
                **{k: row[k] for k in metric_keys},
                "load_average": [row["load_average_before"], row["load_average_after"]],
            },
            command=command,
            call=call,
            device=device,
            date=date,
        )
        for row in rows
    ]
