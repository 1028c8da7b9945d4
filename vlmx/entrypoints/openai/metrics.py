"""The server's Prometheus metrics, named as vLLM names them with a `vlmx:` prefix, in a
registry of the server's own (two servers in one process never share counters)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from vlmx.outputs import RequestOutput

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class ServerMetrics:
    """Implements `EngineObserver` (the engine thread reports) plus the HTTP side's counts."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str, extra: list[str] | None = None) -> Counter:
            metric = Counter(name, doc, labels + (extra or []), registry=r)
            return metric if extra else metric.labels(model_name)

        self.num_running = gauge("vlmx:num_requests_running", "Requests in the running batch.")
        self.num_waiting = gauge("vlmx:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("vlmx:kv_cache_usage_perc", "Fraction of KV cache blocks in use.")
        self.prompt_tokens = counter("vlmx:prompt_tokens", "Prompt tokens of queued requests.")
        self.generation_tokens = counter("vlmx:generation_tokens", "Tokens generated.")
        self.images = counter("vlmx:mm_images", "Images in queued requests.")
        self.request_success = counter(
            "vlmx:request_success", "Finished requests, by finish reason.", ["finished_reason"]
        )
        self.request_errors = counter(
            "vlmx:request_errors", "Requests answered with an error, by status.", ["status_code"]
        )
        self.ttft = Histogram(
            "vlmx:time_to_first_token_seconds",
            "Time from arrival to the first output token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.e2e = Histogram(
            "vlmx:e2e_request_latency_seconds",
            "Time from arrival to the last output token.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.model_name = model_name

    def on_added(self, num_prompt_tokens: int, num_images: int) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)
        self.images.inc(num_images)

    def on_step(self, num_running: int, num_waiting: int, kv_usage: float) -> None:
        self.num_running.set(num_running)
        self.num_waiting.set(num_waiting)
        self.kv_usage.set(kv_usage)

    def on_finished(self, output: RequestOutput) -> None:
        for completion in output.outputs:
            self.generation_tokens.inc(len(completion.token_ids))
            reason = completion.finish_reason or "abort"
            self.request_success.labels(self.model_name, reason).inc()
        metrics = output.metrics
        if metrics is not None:
            if metrics.time_to_first_token is not None:
                self.ttft.observe(metrics.time_to_first_token)
            self.e2e.observe(time.monotonic() - metrics.arrival_time)

    def on_error(self, status_code: int) -> None:
        self.request_errors.labels(self.model_name, str(status_code)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
