"""A peer that joins, bootstraps its DHT node, proves the swarm answers, and leaves.

It is the real `peer join` (Join, reachability self-test, DHT bootstrap with its retries) with one
change: training is replaced by one DHT round trip through the bootstrap node and a clean Leave.
Run: python -m tests.variants.join_only join ...   Exit 0: joined, 2: a clear error.
"""

import json
import time

from peer import trainer
from peer.cli import main


def join_and_leave(config, task, peer_id, dht, make_link, events, options):
    link = make_link().start()
    key = f"{config.run_id}.join-test"
    stored = dht.store(key, peer_id, expiration_time=time.time() + 60, subkey=peer_id)
    found = dht.get(key, latest=True)
    print(json.dumps({"peer_id": peer_id, "stored": bool(stored), "seen": len(found.value) if found else 0}),
          flush=True)
    link.close("join test done")
    return {"epoch": 0, "reason": "join test done", "samples": 0, "metrics": {}}


trainer.train = join_and_leave

if __name__ == "__main__":
    main()
