"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own.

| metric | kind | what |
| --- | --- | --- |
| ``hvdtrain_requests_total{endpoint, status}`` | counter | HTTP requests answered |
| ``hvdtrain_prompt_tokens_total``, ``hvdtrain_generation_tokens_total`` | counter | tokens in, tokens out |
| ``hvdtrain_sequences_finished_total{reason}`` | counter | ``stop``, ``length``, ``cancelled``, ``error`` |
| ``hvdtrain_queue_depth`` | gauge | sequences waiting for a cache slot |
| ``hvdtrain_running_sequences`` | gauge | sequences holding a slot |
| ``hvdtrain_cache_slots`` | gauge | the slots (``--slots``) |
| ``hvdtrain_time_to_first_token_seconds`` | histogram | arrival to first token |
| ``hvdtrain_inter_token_latency_seconds`` | histogram | between a sequence's tokens (a step's tokens share it) |
| ``hvdtrain_request_latency_seconds`` | histogram | arrival to the last token |
| ``hvdtrain_draft_tokens_total``, ``hvdtrain_accepted_tokens_total`` | counter | draft proposals: scored, kept |
"""
from __future__ import annotations

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                   10.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)


class Metrics:
    def __init__(self, slots: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("hvdtrain_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("hvdtrain_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("hvdtrain_generation_tokens", "tokens generated", registry=r)
        self.sequences = Counter("hvdtrain_sequences_finished", "sequences ended, by reason", ["reason"], registry=r)
        self.queue = Gauge("hvdtrain_queue_depth", "sequences waiting for a cache slot", registry=r)
        self.running = Gauge("hvdtrain_running_sequences", "sequences holding a cache slot", registry=r)
        Gauge("hvdtrain_cache_slots", "cache slots (--slots)", registry=r).set(slots)
        self.ttft = Histogram("hvdtrain_time_to_first_token_seconds", "arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("hvdtrain_inter_token_latency_seconds", "time between a sequence's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("hvdtrain_request_latency_seconds", "arrival to last token of a sequence",
                                 buckets=REQUEST_BUCKETS, registry=r)
        self.drafted = Counter("hvdtrain_draft_tokens", "the draft's proposals the model scored", registry=r)
        self.accepted = Counter("hvdtrain_accepted_tokens", "the draft's proposals the model kept", registry=r)

    def answered(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def tokens(self, seq, added: int, now: float) -> None:
        """``added`` tokens of ``seq`` at ``now`` (the engine's thread)."""
        if not added:
            return
        self.generation_tokens.inc(added)
        if not seq.first:
            self.prompt_tokens.inc(len(seq.prompt))
            self.ttft.observe(now - seq.arrival)
            added -= 1
            previous = now
        else:
            previous = seq.last
        for _ in range(added):  # a step's tokens share its time
            self.itl.observe((now - previous) / max(1, added))

    def speculated(self, proposed: int, accepted: int) -> None:
        self.drafted.inc(proposed)
        self.accepted.inc(accepted)

    def finished(self, seq, reason: str) -> None:
        self.sequences.labels(reason).inc()
        if seq.first:
            self.latency.observe(seq.last - seq.arrival)

    def load(self, waiting: int, running: int) -> None:
        self.queue.set(waiting)
        self.running.set(running)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
