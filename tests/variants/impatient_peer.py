"""The real `peer join` with the state download's bound (peer.timeouts.STATE_DOWNLOAD) cut to 20 s,
so a test sees what happens when it passes. Run: python -m tests.variants.impatient_peer join ...
"""

from peer import timeouts
from peer.cli import main

timeouts.STATE_DOWNLOAD = 20.0

if __name__ == "__main__":
    main()
