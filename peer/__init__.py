"""potluck peer: the work a volunteer's machine does (task API, data assignment, training, CLI)."""

import os

# hivemind (utils/mpfuture.py) picks torch's tensor-sharing strategy from this variable when it is first
# imported, "file_system" by default: every process then hands its shared tensors to a torch_shm_manager
# helper, whose start-up handshake was seen spinning forever in C code that holds the GIL (an auditor
# outlived serve at 100% CPU; peers crashed with "Shared memory manager connection has timed out" on a
# busy machine). "file_descriptor" needs no helper process; a peer shares few tensors.
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")

__version__ = "0.1.0"
