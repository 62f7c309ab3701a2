"""What /metrics exports, in Prometheus' text format: the engine's counts (LLM.stats) as gauges, and per
finished request its tokens, time to first token and inter-token latencies; one log line per request."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..engine.request import Request

log = logging.getLogger("minillm.server")


class Metrics:
    """What /metrics exports, in Prometheus' text format (prometheus-client, a registry of its own)."""

    def __init__(self, llm):
        self.registry = registry = CollectorRegistry()
        gauges = {  # EngineStats field -> what the gauge shows
            "running": "Requests in the running batch",
            "waiting": "Requests waiting to be admitted",
            "kv_slots_total": "Token slots in the KV pool",
            "kv_slots_used": "KV pool slots in use (by running requests or the prefix cache)",
            "kv_slots_cached": "KV pool slots held by the prefix cache",
            "prefix_cache_hit_rate": "Prompt tokens served from the prefix cache, of all prompt tokens",
        }
        for field, text in gauges.items():
            name = "minillm_requests_" + field if field in ("running", "waiting") else "minillm_" + field
            Gauge(name, text, registry=registry).set_function(lambda field=field: getattr(llm.stats(), field))
        self.prompt_tokens = Counter("minillm_prompt_tokens", "Prompt tokens of finished requests", registry=registry)
        self.cached_tokens = Counter(
            "minillm_cached_tokens", "Prompt tokens found in the prefix cache", registry=registry
        )
        self.generated_tokens = Counter("minillm_generated_tokens", "Tokens generated", registry=registry)
        self.draft_proposed = Counter(
            "minillm_draft_proposed_tokens", "Speculation: guessed tokens verified by the model", registry=registry
        )
        self.draft_accepted = Counter(
            "minillm_draft_accepted_tokens", "Speculation: guessed tokens taken as output", registry=registry
        )
        self.requests = Counter("minillm_requests", "Finished requests", ["finish_reason"], registry=registry)
        self.ttft = Histogram(
            "minillm_time_to_first_token_seconds",
            "From submission to the first token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )
        self.itl = Histogram(
            "minillm_inter_token_latency_seconds",
            "Between consecutive tokens of a request",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )

    def finished(self, r: Request) -> None:
        c = r.completion()
        self.prompt_tokens.inc(c.prompt_tokens)
        self.cached_tokens.inc(c.cached_tokens)
        self.generated_tokens.inc(len(c.token_ids))
        self.draft_proposed.inc(c.draft_proposed)
        self.draft_accepted.inc(c.draft_accepted)
        self.requests.labels(c.finish_reason).inc()
        if r.token_times:
            self.ttft.observe(c.ttft_s)
        for before, after in zip(r.token_times, r.token_times[1:]):
            self.itl.observe(after - before)
        log.info(
            "request %d: %d prompt tokens (%d cached), %d generated, ttft %.0f ms, %.1f tok/s, %s",
            r.id,
            c.prompt_tokens,
            c.cached_tokens,
            len(c.token_ids),
            1000 * c.ttft_s,
            c.decode_tok_s,
            c.finish_reason,
        )

    def text(self) -> bytes:
        return generate_latest(self.registry)
