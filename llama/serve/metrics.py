"""GET /metrics: the server's counters, gauges and latency histograms in Prometheus's text format
(prometheus_client writes it). Each server has its own registry, so tests and embedders can run
several in one process."""

from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds; from one step of a small model on a CPU to a long prompt on a loaded server.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


class Metrics:
    def __init__(self, queue_sizes: Callable[[], tuple], prefix_tokens: Optional[Callable[[], tuple]] = None):
        """queue_sizes() -> (running, waiting, free slots); prefix_tokens() -> (prompt tokens placed
        in the KV cache, of those found there already), when prefix reuse is on; read at each scrape."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llama_requests", "HTTP requests answered, by route and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("llama_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("llama_generated_tokens", "tokens generated for finished requests",
                                        registry=r)
        self.ttft = Histogram("llama_time_to_first_token_seconds", "from a request's arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("llama_time_per_output_token_seconds",
                              "a request's time after its first token, per later token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.latency = Histogram("llama_request_latency_seconds", "from a request's arrival to its last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        sizes = lambda i: (lambda: queue_sizes()[i])  # noqa: E731
        Gauge("llama_requests_running", "requests decoding", registry=r).set_function(sizes(0))
        Gauge("llama_requests_waiting", "requests queued for a slot", registry=r).set_function(sizes(1))
        Gauge("llama_free_slots", "KV-cache slots free", registry=r).set_function(sizes(2))
        if prefix_tokens is not None:
            r.register(_PrefixReuse(prefix_tokens))

    def finished(self, prompt_tokens: int, generated: int, arrived: float, first_token: float, ended: float) -> None:
        """One request's figures once it is answered (times from time.monotonic())."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(generated)
        if generated:
            self.ttft.observe(first_token - arrived)
            if generated > 1:
                self.tpot.observe((ended - first_token) / (generated - 1))
        self.latency.observe(ended - arrived)

    def exposition(self) -> tuple:
        """(body, content type) of a scrape."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _PrefixReuse:
    """Prefix reuse's counters, read from the engine at each scrape (the hit rate is their ratio)."""

    def __init__(self, prefix_tokens: Callable[[], tuple]):
        self.prefix_tokens = prefix_tokens

    def collect(self):
        placed, reused = self.prefix_tokens()
        yield CounterMetricFamily("llama_prefix_prompt_tokens", "prompt tokens of the requests placed in the "
                                  "KV cache", value=placed)
        yield CounterMetricFamily("llama_prefix_reused_tokens", "of those, found there already (prefix reuse)",
                                  value=reused)
