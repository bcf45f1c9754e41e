"""A peer whose swarm bootstrap node cannot be reached (a dead address in place of the Join reply's).

It is the real `peer join` with two changes: the initial peers it dials are replaced by an address
where nothing listens, and the bootstrap bound (peer.timeouts.BOOTSTRAP) is cut to 12 s so the
test sees it pass. Run: python -m tests.variants.unreachable_bootstrap join ...
"""

from peer import swarm, timeouts
from peer.cli import main

timeouts.BOOTSTRAP = 12.0
real_start_dht = swarm.start_dht


def start_dht_nowhere(data_dir, initial_peers, *args, **kwargs):
    dead = ["/ip4/127.0.0.1/tcp/1/p2p/" + address.rsplit("/p2p/", 1)[1] for address in initial_peers]
    return real_start_dht(data_dir, dead, *args, **kwargs)


swarm.start_dht = start_dht_nowhere

if __name__ == "__main__":
    main()
