"""/metrics in Prometheus text format: the run's gauges (read from the ledger at scrape time) and the
latency of every gRPC handler, measured by a server interceptor.
"""

from __future__ import annotations

import time
from typing import Callable

import grpc
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RunCollector:
    """Turns the run view (coordinator/run_view.py) into metric families at every scrape."""

    def __init__(self, state: Callable[[], dict]):
        self._state = state

    def collect(self):
        state = self._state()
        yield GaugeMetricFamily("potluck_epoch", "The run's global epoch.", value=state["epoch"])
        peers = GaugeMetricFamily("potluck_peers", "Peers known to the ledger, by liveness.", labels=["state"])
        peers.add_metric(["alive"], state["live_peers"])
        peers.add_metric(["gone"], len(state["peers"]) - state["live_peers"])
        yield peers
        yield CounterMetricFamily("potluck_samples", "Samples reported by all peers.", value=state["samples"])
        if state["loss"] is not None:
            yield GaugeMetricFamily("potluck_loss", "Sample-weighted training loss of the latest epoch.",
                                    value=state["loss"])
        accuracy = state["metrics"].get("accuracy")
        if accuracy is not None:
            yield GaugeMetricFamily("potluck_heldout_accuracy", "Held-out accuracy of the latest report.",
                                    value=accuracy)
        yield GaugeMetricFamily("potluck_swarm_samples_per_second", "Sum of live peers' samples/s.",
                                value=state["swarm_samples_per_second"])
        org_samples = CounterMetricFamily("potluck_org_samples", "Samples reported per organization.", labels=["org"])
        org_credit = GaugeMetricFamily("potluck_org_credit", "Credit per organization.", labels=["org"])
        for org in state["orgs"]:
            org_samples.add_metric([org["name"]], org["samples"])
            org_credit.add_metric([org["name"]], org["credit"])
        yield org_samples
        yield org_credit
        audits = CounterMetricFamily("potluck_audits", "Audit verdicts recorded, by outcome.", labels=["outcome"])
        audits.add_metric(["passed"], sum(p["audits_passed"] for p in state["peers"]))
        audits.add_metric(["failed"], sum(p["audits_failed"] for p in state["peers"]))
        yield audits
        yield GaugeMetricFamily("potluck_banned_peers", "Peers banned from the run.",
                                value=sum(p["banned"] for p in state["peers"]))
        if state["checkpoint"] is not None:
            yield GaugeMetricFamily("potluck_checkpoint_epoch", "Epoch of the newest checkpoint.",
                                    value=state["checkpoint"]["epoch"])


class Metrics:
    """One registry per coordinator: the run collector plus the RPC latency histogram."""

    def __init__(self, state: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.registry.register(RunCollector(state))
        self.rpc_latency = Histogram(
            "potluck_rpc_latency_seconds", "Time spent in each gRPC handler.", ["method", "code"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def interceptor(self) -> grpc.ServerInterceptor:
        return LatencyInterceptor(self.rpc_latency)


def _code_name(context) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "OK"


class LatencyInterceptor(grpc.ServerInterceptor):
    """Times unary and server-streaming handlers (a stream until its last message), labelled by status."""

    def __init__(self, histogram: Histogram):
        self.histogram = histogram

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        observe = self.histogram.labels

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def unary(request, context):
                started = time.perf_counter()
                try:
                    return inner(request, context)
                finally:
                    observe(method, _code_name(context)).observe(time.perf_counter() - started)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            def stream(request, context):
                started = time.perf_counter()
                try:
                    yield from inner_stream(request, context)
                finally:
                    observe(method, _code_name(context)).observe(time.perf_counter() - started)

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
