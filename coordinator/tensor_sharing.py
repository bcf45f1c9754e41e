"""serve, the auditor and the observer share tensors between processes by file descriptor.

hivemind (utils/mpfuture.py) picks torch's sharing strategy from HIVEMIND_MEMORY_SHARING_STRATEGY
when it is first imported, "file_system" by default: every process then hands its shared tensors to a
torch_shm_manager helper, whose start-up handshake was seen spinning forever in C code that holds the
GIL (an auditor never audited and outlived serve at 100% CPU; found with gdb). "file_descriptor" needs
no helper process, and these processes share few tensors. Peers keep hivemind's default for now.
"""

from __future__ import annotations

import os
import sys

STRATEGY = "file_descriptor"


def share_tensors_by_file_descriptor() -> None:
    """Call first thing in a coordinator process's main; its children inherit the choice."""
    os.environ["HIVEMIND_MEMORY_SHARING_STRATEGY"] = STRATEGY
    if "torch.multiprocessing" in sys.modules:  # already imported (hivemind may have set its default)
        sys.modules["torch.multiprocessing"].set_sharing_strategy(STRATEGY)
