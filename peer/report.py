"""A signed epoch report: canonical bytes that peer, coordinator and partners all compute the same way.

The peer signs the canonical bytes with its Ed25519 identity. The coordinator keeps them, with the
signature, in its contribution log, so anyone holding the log can re-check every report against
the peer's public key without trusting the coordinator's copy of the numbers.
"""

from __future__ import annotations

import json

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from peer.work import EpochProof
from protos import coordinator_pb2 as pb

FORMAT = 1


def attach_proof(request: pb.ReportRequest, proof: EpochProof) -> None:
    request.parameters.norm = proof.parameters.norm
    request.parameters.projection.extend(proof.parameters.projection)
    request.compute_dtype = proof.dtype
    for item in proof.micro_batches:
        request.sketches.add(index=item.index, samples=item.samples, norm=item.sketch.norm,
                             projection=item.sketch.projection)


def canonical_body(request: pb.ReportRequest, run_id: str) -> dict:
    """Everything a report claims, as plain JSON values (floats as the message holds them).

    Attestation records are signed with the report (so the contribution log holds them as the
    peer's own word); the key is left out when there are none, so older reports verify unchanged.
    """
    body = {
        "format": FORMAT,
        "run_id": run_id,
        "peer_id": request.peer_id,
        "report_id": request.report_id,
        "epoch": request.epoch,
        "samples": request.samples,
        "loss": request.loss,
        "compute_seconds": request.compute_seconds,
        "metrics": {key: request.metrics[key] for key in sorted(request.metrics)},
        "compute_dtype": request.compute_dtype,
        "parameters": {"norm": request.parameters.norm, "projection": list(request.parameters.projection)},
        "sketches": [
            {"index": s.index, "samples": s.samples, "norm": s.norm, "projection": list(s.projection)}
            for s in request.sketches
        ],
    }
    if request.attestations:
        body["attestations"] = [attestation_body(a) for a in request.attestations]
    return body


def attestation_body(a: pb.Attestation) -> dict:
    return {"role": a.role, "kind": a.kind, "group": a.group, "epoch": a.epoch, "sender": a.sender,
            "reducer": a.reducer, "length": a.length, "sketch": list(a.sketch), "norm_sq": a.norm_sq,
            "weight": a.weight, "score": a.score, "clipped": a.clipped, "time": a.time}


def canonical_bytes(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def sign_report(request: pb.ReportRequest, run_id: str, private_key) -> None:
    request.signature = private_key.sign(canonical_bytes(canonical_body(request, run_id)))


def signature_valid(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
