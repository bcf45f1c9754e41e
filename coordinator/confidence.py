"""How many audits a window needs, and how sure its audits make us (the settlement rule's arithmetic).

A peer fakes ``F = ceil(f * M)`` of a window's ``M`` micro-batches; the auditor replays ``k`` of them,
drawn without replacement. The fake goes unnoticed with probability ``C(M-F, k) / C(M, k)``, so the
window's *detection confidence* is one minus that. Small windows need a large share audited (all of
a 10-micro-batch window for f = 0.1 at 99%), large ones a small one (44 of 2,000).

The auditor draws per report (a stratum), so the exact figure for a window is the worst case over
how a cheater could spread its fakes across the reports: :func:`window_confidence`.
"""

from __future__ import annotations

import heapq
import math


def escape_probability(micro_batches: int, fakes: int, audited: int) -> float:
    """C(M-F, k) / C(M, k): none of ``audited`` draws (without replacement) hits one of ``fakes``."""
    if fakes <= 0:
        return 1.0
    if audited > micro_batches - fakes:
        return 0.0
    p = 1.0
    for i in range(audited):
        p *= (micro_batches - fakes - i) / (micro_batches - i)
    return p


def fakes_in(micro_batches: int, fraction: float) -> int:
    """F = ceil(f * M), robust to float noise (0.1 * 30 is 3.0000000000000004)."""
    return math.ceil(round(fraction * micro_batches, 9))


def audits_needed(micro_batches: int, fraction: float, confidence: float) -> int:
    """The least k with 1 - C(M-F, k)/C(M, k) >= confidence (k = M when nothing less reaches it)."""
    fakes = fakes_in(micro_batches, fraction)
    for k in range(micro_batches + 1):
        if 1.0 - escape_probability(micro_batches, fakes, k) >= confidence:
            return k
    return micro_batches


def required_audits(verification, micro_batches: int) -> int:
    """Audits a window of this many verifiable micro-batches needs under ``[verification]`` (and the floor)."""
    return max(audits_needed(micro_batches, verification.cheat_fraction, verification.detection_confidence),
               min(verification.audit_floor, micro_batches))


def window_confidence(strata: list[tuple[int, int]], fraction: float) -> float:
    """Detection confidence of a window audited per stratum: ``strata`` holds (micro-batches, audited).

    The cheater places its F fakes where they are least likely to be drawn. Adding the (j+1)-th fake
    to a stratum of m with k audited multiplies the escape probability by 1 - k/(m - j), a factor that
    only shrinks as j grows, so placing fakes one by one where the factor is largest is optimal.
    """
    total = sum(m for m, _ in strata)
    if total == 0:
        return 0.0
    fakes = fakes_in(total, fraction)
    heap = [(-(1.0 - k / m), m, k, 0) for m, k in strata if m > 0]
    heapq.heapify(heap)
    escape = 1.0
    for _ in range(fakes):
        factor, m, k, placed = heapq.heappop(heap)
        escape *= -factor
        placed += 1
        if placed < m:
            heapq.heappush(heap, (-(1.0 - k / (m - placed)) if m - placed > k else 0.0, m, k, placed))
        if escape == 0.0 or not heap:
            break
    return 1.0 - escape
