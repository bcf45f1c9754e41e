"""A peer that ignores its eviction and keeps trying to train and average with the swarm.

It is the real `peer join` with one change: the coordinator link never records an eviction, so
training goes on after the operator revoked the peer's token. Run: python -m tests.variants.rogue_peer join ...
"""

from peer import client
from peer.cli import main

client.CoordinatorLink._note_eviction = lambda self, error: False

if __name__ == "__main__":
    main()
