"""Robust aggregation of one all-reduce part: what a reducer does with the parts its senders sent.

A reducer of hivemind's butterfly all-reduce alone decides the averaged value of its slice of the
vector, so the rule it applies is what stands between one poisoning sender and every honest peer.
``[averaging] aggregator`` picks the rule (the same on every member, see :func:`agreed_key`):

- ``centered_clip`` (default; CenteredClip as in Karimireddy et al. 2021 and BTARD, Gorbunov et al.
  2022): start from the coordinate-wise median ``m`` of the parts, set the clip radius
  ``tau = tau_factor * median_i ||x_i - m||`` (relative to the group, so it needs no scale of its own),
  then iterate ``v <- v + sum_i w_i clip(x_i - v, tau) / sum_i w_i``. One outlier among n moves the
  result by at most about ``tau / (n - 1)`` whatever its size. A part still farther than
  ``REJECT_SCORE`` radii from the center is then left out and the rest re-aggregated, so a gross
  outlier (a flipped or scaled gradient) costs nothing at all, and a subtle one stays bounded.
- ``trimmed_mean``: coordinate-wise, drop the ``b = min(ceil(n/4), (n-1)//2)`` largest and smallest
  values and average the rest (equal weights).
- ``mean``: hivemind's weighted mean, unchanged (no weight cap): the control, not a defence.

Declared weights cannot buy influence in the robust rules: each sender's weight is capped at the
lower median of the group's positive weights (weight 0, a peer tagging along, stays 0), so a peer
that doubles the batch size it declares to hivemind weighs no more than a typical member.

Every rule also returns, per sender, ``score = ||x_i - result|| / tau`` and whether it was clipped
(the last iteration clipped it): the evidence a reducer attests (peer.attestations).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

AGGREGATORS = ("centered_clip", "trimmed_mean", "mean")
DEFAULT_AGGREGATOR = "centered_clip"
DEFAULT_TAU = 2.0  # clip radius in units of the group's median distance to the coordinate-wise median (measured: see README)
ITERATIONS = 10  # CenteredClip iterations from the median (it converges in a few; stops early when still)
# parts this many radii from the center are left out (honest parts score about 1: distances of noisy
# high-dimensional vectors concentrate; a sign-flipped x10 gradient scores 10 or more)
REJECT_SCORE = 3.0


@dataclass(frozen=True)
class AveragingRule:
    """The aggregation every member of a group applies to the parts it reduces."""

    aggregator: str = DEFAULT_AGGREGATOR
    tau: float = DEFAULT_TAU

    def __post_init__(self):
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {self.aggregator!r}; choose one of {', '.join(AGGREGATORS)}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"tau must be a positive number, got {self.tau}")


def agreed_key(rule: AveragingRule) -> str:
    """A string that differs between rules that must never average together (prefix / schema hash)."""
    return rule.aggregator if rule.aggregator != "centered_clip" else f"{rule.aggregator}:{rule.tau!r}"


def agreed_schema_hash(schema_hash: bytes, rule: AveragingRule, protocol: int | None = None) -> bytes:
    """hivemind's schema hash with the rule and the averaging protocol's version (peer/protocol.py,
    read at call time) folded in: a leader refuses joiners with another hash."""
    from peer import protocol as versions

    version = versions.AVERAGING_PROTOCOL if protocol is None else protocol
    return hashlib.sha256(schema_hash + b"|potluck-aggregator|" + agreed_key(rule).encode()
                          + b"|potluck-protocol|" + str(version).encode()).digest()


@dataclass
class Aggregate:
    """A part's result and, per sender (in input order), the evidence against it."""

    value: torch.Tensor
    scores: list[float]
    clipped: list[bool]


def cap_weights(weights: torch.Tensor) -> torch.Tensor:
    """Cap every weight at the lower median of the positive weights (zeros stay zero)."""
    positive = weights[weights > 0]
    if positive.numel() == 0:
        return weights.clone()
    cap = positive.sort().values[(positive.numel() - 1) // 2]
    return weights.clamp(max=float(cap))


def _sorted(rows: torch.Tensor) -> torch.Tensor:
    """The rows sorted coordinate-wise (along dim 0).

    torch's sort along a short leading dim is slow (strided); for small groups an odd-even
    transposition network of elementwise min/max is ~10x faster, else sort the transpose."""
    n = rows.shape[0]
    if n > 8:
        return rows.T.contiguous().sort(dim=1).values.T
    ordered = list(rows)
    for phase in range(n):
        for i in range(phase % 2, n - 1, 2):
            low, high = torch.minimum(ordered[i], ordered[i + 1]), torch.maximum(ordered[i], ordered[i + 1])
            ordered[i], ordered[i + 1] = low, high
    return torch.stack(ordered)


def _median(rows: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median along dim 0 (the mean of the two middle values for an even count)."""
    n = rows.shape[0]
    if n == 1:
        return rows[0]
    ordered = _sorted(rows)
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


def _radius(rows: torch.Tensor, tau: float, median: torch.Tensor | None = None) -> float:
    distances = (rows - (_median(rows) if median is None else median)).norm(dim=1).sort().values
    n = len(distances)
    return tau * float(distances[(n - 1) // 2] + distances[n // 2]) / 2


def _evidence(parts: torch.Tensor, live: torch.Tensor, result: torch.Tensor, radius: float, clip: bool,
              distances: torch.Tensor | None = None):
    distances = (parts - result).norm(dim=1) if distances is None else distances
    scores = [d / radius if radius > 0 else (0.0 if d == 0 else math.inf) for d in distances.tolist()]
    clipped = [bool(clip and alive and s > 1.0) for s, alive in zip(scores, live.tolist())]
    return scores, clipped


def _clip_iterations(rows, w, center, radius: float, iterations: int):
    total = float(w.sum())
    for _ in range(iterations):
        offsets = rows - center
        scale = (radius / offsets.norm(dim=1).clamp_min(1e-30)).clamp(max=1.0)
        step = (w * scale) @ offsets / total
        center = center + step
        if float(step.norm()) <= 1e-4 * radius:  # still, to a negligible fraction of the radius
            break
    return center


def centered_clip(parts: torch.Tensor, weights: torch.Tensor, tau: float = DEFAULT_TAU,
                  iterations: int = ITERATIONS, reject: float = REJECT_SCORE) -> Aggregate:
    """CenteredClip of the rows of ``parts`` (n x d) with weights capped at their median; rows farther
    than ``reject`` radii from the result are then left out and the rest clipped again."""
    parts = parts.float()
    weights = cap_weights(weights.double()).float()
    live = weights > 0
    rows, w = parts[live], weights[live]
    if rows.shape[0] == 0:
        return Aggregate(torch.zeros(parts.shape[1]), [0.0] * len(parts), [False] * len(parts))
    center = _median(rows)
    radius = _radius(rows, tau, center)
    mean = w @ rows / float(w.sum())
    from_mean = (parts - mean).norm(dim=1)
    if radius > 0 and float(from_mean[live].max()) <= radius:
        # nobody is clipped at the weighted mean, so it is the fixed point CenteredClip converges to (the
        # Huber-type objective it minimizes is convex): the common honest case costs no iterations
        scores, clipped = _evidence(parts, live, mean, radius, clip=True, distances=from_mean)
        return Aggregate(mean, scores, clipped)
    if radius > 0:
        center = _clip_iterations(rows, w, center, radius, iterations)
        kept = (rows - center).norm(dim=1) <= reject * radius
        if not bool(kept.all()) and int(kept.sum()) * 2 > len(kept):  # leave out gross outliers (a minority)
            center = _clip_iterations(rows[kept], w[kept], _median(rows[kept]), radius, iterations)
    scores, clipped = _evidence(parts, live, center, radius, clip=True)
    return Aggregate(center, scores, clipped)


def trimmed_mean(parts: torch.Tensor, weights: torch.Tensor, tau: float = DEFAULT_TAU) -> Aggregate:
    """Coordinate-wise trimmed mean of the rows with positive weight (weights otherwise ignored)."""
    parts = parts.float()
    live = weights > 0
    rows = parts[live]
    n = rows.shape[0]
    if n == 0:
        return Aggregate(torch.zeros(parts.shape[1]), [0.0] * len(parts), [False] * len(parts))
    trim = min(math.ceil(n / 4), (n - 1) // 2)
    value = _sorted(rows)[trim:n - trim].mean(dim=0)
    scores, clipped = _evidence(parts, live, value, _radius(rows, tau), clip=False)
    return Aggregate(value, scores, clipped)


def weighted_mean(parts: torch.Tensor, weights: torch.Tensor, tau: float = DEFAULT_TAU) -> Aggregate:
    """hivemind's rule: sum_i w_i x_i / sum_i w_i with the declared weights (no evidence computed)."""
    weights = weights.float()
    if float(weights.sum()) <= 0:  # every member tagged along (weight 0): nothing to average
        return Aggregate(torch.zeros(parts.shape[1]), [0.0] * len(parts), [False] * len(parts))
    value = weights @ parts.float() / float(weights.sum())
    return Aggregate(value, [0.0] * len(parts), [False] * len(parts))


_RULES = {"centered_clip": centered_clip, "trimmed_mean": trimmed_mean, "mean": weighted_mean}


def aggregate(rule: AveragingRule, parts: list[torch.Tensor], weights: list[float]) -> Aggregate:
    """Apply ``rule`` to the parts (same shape) that one reducer received for one part index."""
    shape = parts[0].shape
    stacked = torch.stack([p.reshape(-1) for p in parts])
    result = _RULES[rule.aggregator](stacked, torch.tensor(weights, dtype=torch.float64), rule.tau)
    result.value = result.value.reshape(shape)
    return result
