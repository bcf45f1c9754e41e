"""Averaging strategies: run.toml [averaging], codecs (values checked, not logs), DiLoCo rounds and runs.

Every averaging test runs real hivemind averagers in separate OS processes on 127.0.0.1 and checks
the averaged values against a hand computation.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import (
    BIN, DIGITS_RUN, ROOT, Proc, epochs_reported, events, load_model, start_coordinator, start_peer, wait_until,
    write_run,
)
from peer.errors import UserError
from peer.runconfig import parse_run_config

PEER_EXIT = 180


def run_text(**averaging) -> str:
    lines = [f"{key} = {json.dumps(value)}" for key, value in averaging.items()]
    base = DIGITS_RUN.read_text().split("[averaging]")[0]
    return base + "[averaging]\n" + "\n".join(lines) + "\n"


def test_averaging_defaults_keep_sync():
    config = parse_run_config(DIGITS_RUN.read_text().split("[averaging]")[0])
    assert (config.averaging.strategy, config.averaging.compression) == ("sync", "none")
    diloco = parse_run_config(run_text(strategy="diloco", compression="uint8", inner_steps=7, overlap=True))
    assert diloco.averaging.strategy == "diloco" and diloco.averaging.inner_steps == 7 and diloco.averaging.overlap
    assert diloco.averaging.outer_lr == 0.7 and diloco.averaging.outer_momentum == 0.9


@pytest.mark.parametrize("values, message", [
    ({"strategy": "ring"}, "strategy must be one of sync, diloco"),
    ({"compression": "int4"}, "compression must be one of none, fp16, uint8"),
    ({"inner_steps": 0}, "inner_steps must be >= 1"),
    ({"outer_lr": 0}, "outer_lr must be in (0, 10]"),
    ({"outer_momentum": 1}, "outer_momentum must be in [0, 1)"),
    ({"overlap": 1}, "overlap must be a bool"),
    ({"inner_steps": True}, "inner_steps must be a int"),
    ({"speed": "fast"}, "unknown key(s) in [averaging]: speed"),
])
def test_bad_averaging_settings_are_refused(values, message):
    with pytest.raises(UserError, match=None) as caught:
        parse_run_config(run_text(**values))
    assert message in str(caught.value)
