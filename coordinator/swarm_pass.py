"""A coordinator process's own admission to the swarm (for the observer): its swarm identity, listed
among the coordinator's internal ids (so peers serve it state), and an access token that the
coordinator's key signs, renewed at half its lifetime, with the ledger's allow/deny lists mirrored
into the files its DHT process reads. The same scheme as SwarmAccessKeeper in coordinator/server.py,
for a process of its own.
"""

from __future__ import annotations

import time
from pathlib import Path

IDENTITY_FILE = "swarm_identity.key"


class SwarmPass:
    def __init__(self, data_dir: Path, subdir: str, ledger, coordinator_identity, ttl: float):
        from peer.swarm import swarm_peer_id
        from peer.swarm_access import AccessFiles, make_authorizer

        self.dir = Path(data_dir) / subdir
        self.dir.mkdir(exist_ok=True)
        self.ledger, self.identity, self.ttl = ledger, coordinator_identity, ttl
        self.files = AccessFiles(self.dir)
        self.authorizer = make_authorizer(self.dir, coordinator_identity.public_bytes)
        self.peer_id = swarm_peer_id(self.dir, IDENTITY_FILE)
        self.identity_path = str(self.dir / IDENTITY_FILE)
        ledger.add_internal_swarm_id(self.peer_id)
        self._renewed = 0.0
        self.refresh()

    def refresh(self) -> None:
        from peer.swarm_access import issue_access_token, rsa_public_key

        if time.time() - self._renewed > self.ttl / 2:
            token = issue_access_token(self.identity.private_key, self.peer_id, rsa_public_key(self.authorizer),
                                       self.ttl)
            self.files.write_token(token.SerializeToString())
            self._renewed = time.time()
        version, allow, deny = self.ledger.swarm_lists()
        if version != self.files.version():
            self.files.write_lists(version, allow, deny)
