"""A hivemind DHT process trying to read a swarm record (which peers share averaging state).

Usage: python -m tests.variants.stranger_dht INITIAL_PEER KEY [COORDINATOR_DATA_DIR]
Without a data dir it has no access token (a stranger); with one it mints a valid token from the
coordinator's key (the control that shows the record is there to be read). Prints one JSON line.
"""

import json
import sys
import tempfile
from pathlib import Path


def main() -> None:
    import hivemind

    from peer.swarm import use_fork_start_method

    initial_peer, key = sys.argv[1], sys.argv[2]
    authorizer, own_dir = None, Path(tempfile.mkdtemp())
    if len(sys.argv) > 3:
        from peer.identity import load_or_create_identity
        from peer.swarm import swarm_peer_id
        from peer.swarm_access import AccessFiles, issue_access_token, make_authorizer, rsa_public_key

        coordinator_key = load_or_create_identity(Path(sys.argv[3]), "coordinator.key")
        authorizer = make_authorizer(own_dir, coordinator_key.public_bytes)
        token = issue_access_token(coordinator_key.private_key, swarm_peer_id(own_dir), rsa_public_key(authorizer), 60)
        AccessFiles(own_dir).write_token(token.SerializeToString())
    use_fork_start_method()
    try:
        from peer.swarm import swarm_peer_id

        swarm_peer_id(own_dir)  # creates the identity file the token (if any) names
        dht = hivemind.DHT(initial_peers=[initial_peer], authorizer=authorizer, start=True,
                           identity_path=str(own_dir / "swarm_identity.key"))
    except Exception as error:  # a refused bootstrap may surface as an exception
        print(json.dumps({"started": False, "error": repr(error)[:300]}), flush=True)
        return
    try:
        found = dht.get(key, latest=True, return_future=True).result(timeout=30)
    except Exception as error:
        print(json.dumps({"started": True, "found": False, "error": repr(error)[:300]}), flush=True)
    else:
        print(json.dumps({"started": True, "found": found is not None}), flush=True)
    dht.shutdown()


if __name__ == "__main__":
    main()
