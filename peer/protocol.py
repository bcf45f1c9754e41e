"""The averaging protocol's version: what peers must agree on beyond the run config to average together.

Folded into every potluck averager's schema hash (peer.robust.agreed_schema_hash), so a hivemind
leader refuses a member that speaks another version: peers of two potluck releases whose rounds would
give different results never meet in a round, in sync or in DiLoCo mode. Bump it with any change to
what a round computes or records:

1. hivemind's runner with the robust rules and attestation records;
2. every member copies the decoded average (the same bits everywhere: DiLoCo anchors agree bit for
   bit), a round with a dropped part fails instead of applying a partial average, and DiLoCo
   restarts on the anchor (anchor + local progress since launch);
3. a gradient buffer that is not the gradient its gather names takes part with weight 0, and "sent"
   records carry the sender's weight.
"""

AVERAGING_PROTOCOL = 3
