"""The server side of signed RPCs: one interceptor checks every request before any handler runs.

For each call it verifies the Ed25519 signature over the exact request bytes (peer/signing.py),
the timestamp (finite, within the window), that the nonce was not seen before (also across a
restart), the run id, and that the signing key is the one bound to the peer the request speaks for
(for Join: the key being registered). Only then is the body parsed and handed to the service.
Refusals are gRPC errors with a message a volunteer can act on; nothing reaches the ledger.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from coordinator.books.nonces import NONCE_FILE, NonceStore
from peer.signing import SignatureError, verify_request

CLOCK_WINDOW = 120.0  # seconds a request's timestamp may differ from the coordinator's clock


class SignedRequestInterceptor(grpc.ServerInterceptor):
    def __init__(self, ledger, run_id: str, clock=time.time):
        self.ledger = ledger
        self.run_id = run_id
        self.clock = clock
        # next to the ledger: its folder's nonce file, or a table of the ledger's PostgreSQL database
        where = Path(ledger.path).parent / NONCE_FILE if ledger.path is not None else ledger.target
        self.nonces = NonceStore(where, CLOCK_WINDOW)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method
        metadata = {key: value for key, value in handler_call_details.invocation_metadata if isinstance(value, str)}
        deserialize, behavior = handler.request_deserializer, handler.unary_unary

        def checked(raw: bytes, context: grpc.ServicerContext):
            try:
                key, timestamp, nonce, run_id = verify_request(metadata, method, raw)
            except SignatureError as error:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))
            now = self.clock()
            if not math.isfinite(timestamp):  # NaN compares false with everything: it would pass the window
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "request timestamp is not a finite number")
            if abs(now - timestamp) > CLOCK_WINDOW:
                context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"request timestamp is {now - timestamp:+.0f}s off the coordinator's clock (window "
                    f"{CLOCK_WINDOW:.0f}s): a stale or replayed request, or this machine's clock is wrong",
                )
            is_join = method.endswith("/Join")
            if run_id != self.run_id and not (is_join and run_id == ""):
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"this coordinator serves run '{self.run_id}', not '{run_id}'; join it again")
            try:
                request = deserialize(raw)
            except DecodeError:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request (not a valid message)")
            bound_key = request.public_key if is_join else self.ledger.public_key(getattr(request, "peer_id", ""))
            if bound_key != key:
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              "request is not signed by the key of the peer it speaks for")
            if not self.nonces.add(key, nonce, now):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "replayed request (nonce already used)")
            return behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked, request_deserializer=None, response_serializer=handler.response_serializer
        )
