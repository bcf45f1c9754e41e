"""A peer that serves its state slowly, so a test can kill it in the middle of a transfer.

It is the real `peer join` with one change: hivemind's state-download handler pauses 0.4 s before
each chunk it sends (below the swarm's matchmaking_time, so the receiver keeps waiting) and appends
the time to SERVING_FILE in the peer's data dir when a download starts.
Run: python -m tests.variants.slow_donor join ... --data-dir DIR
"""

import asyncio
import functools
import sys
import time
from pathlib import Path

from hivemind.averaging.averager import DecentralizedAverager

from peer.cli import main

SERVING_FILE = "serving_state"
CHUNK_PAUSE = 0.4
DATA_DIR = Path(sys.argv[sys.argv.index("--data-dir") + 1]) if "--data-dir" in sys.argv else Path(".")
real_download_state = DecentralizedAverager.rpc_download_state


@functools.wraps(real_download_state)
async def slow_download_state(self, _request, _context):
    with open(DATA_DIR / SERVING_FILE, "a") as marker:
        marker.write(f"{time.time()}\n")
    async for message in real_download_state(self, _request, _context):
        await asyncio.sleep(CHUNK_PAUSE)
        yield message


DecentralizedAverager.rpc_download_state = slow_download_state

if __name__ == "__main__":
    main()
