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
    ({"inner_state": "fresh"}, "inner_state must be one of reset, keep"),
    ({"inner_steps": True}, "inner_steps must be a int"),
    ({"speed": "fast"}, "unknown key(s) in [averaging]: speed"),
])
def test_bad_averaging_settings_are_refused(values, message):
    with pytest.raises(UserError, match=None) as caught:
        parse_run_config(run_text(**values))
    assert message in str(caught.value)


# -- codecs ------------------------------------------------------------------------------------

def test_codec_round_trip_error_is_bounded_and_bytes_shrink():
    from peer.compression import RELATIVE_ERROR_BOUND, round_trip

    generator = torch.Generator().manual_seed(1)
    gaussian = torch.randn(50_000, generator=generator)
    heavy_tailed = gaussian * torch.rand(50_000, generator=generator) ** 3  # like Adam-driven pseudo-gradients
    sizes = {}
    for codec, gaussian_bound in (("none", 0.0), ("fp16", 5e-4), ("uint8", 0.02)):
        for tensor, bound in ((gaussian, gaussian_bound), (heavy_tailed, RELATIVE_ERROR_BOUND[codec])):
            decoded, sizes[codec] = round_trip(tensor, codec)
            assert decoded.shape == tensor.shape and decoded.dtype == torch.float32
            error = ((decoded - tensor).norm() / tensor.norm()).item()
            assert error <= bound, (codec, error)
    assert sizes["none"] == 4 * 50_000
    assert sizes["fp16"] == 2 * 50_000
    assert sizes["uint8"] <= 50_000 + 2048  # one byte per value plus a 256-entry codebook


def test_eight_bit_decoder_works_with_this_numpy():
    """hivemind 1.1.12's own decoder fails on numpy >= 2.4 (trap 1); the patched one is installed."""
    import numpy as np
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
    from hivemind.compression.quantization import Quantization
    from hivemind.proto import runtime_pb2

    import peer.compression  # noqa: F401  (installs the fix)

    assert Quantization.extract is peer.compression._extract_8bit
    tensor = torch.randn(1000)
    for kind in (runtime_pb2.UNIFORM_8BIT, runtime_pb2.QUANTILE_8BIT):
        decoded = deserialize_torch_tensor(serialize_torch_tensor(tensor, kind))
        assert ((decoded - tensor).norm() / tensor.norm()).item() < 0.05
    assert np.lib.NumpyVersion(np.__version__) >= "2.0.0"


# -- DiLoCo rounds between two real processes ----------------------------------------------------

def start_worker(procs, workdir, role: str, codec: str, rounds: int, width: int) -> Proc:
    worker = Proc([sys.executable, str(ROOT / "tests" / "strategy_worker.py"), role, str(workdir), codec, str(rounds),
                   str(width)], workdir / f"{role}.log")
    procs.append(worker)
    return worker


def run_two_workers(procs, workdir, codec: str, rounds: int, width: int, late: bool = False) -> tuple[dict, ...]:
    """Two peers run `rounds` rounds; with `late`, a third then downloads their state."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not late:
        (workdir / "done").touch()
    workers = [start_worker(procs, workdir, role, codec, rounds, width) for role in ("a", "b")]
    if late:
        wait_until(lambda: (workdir / "a.json").exists() and (workdir / "b.json").exists(), 120, "two peers' rounds")
        workers.append(start_worker(procs, workdir, "late", codec, rounds, width))
    for worker in workers:
        assert worker.wait(120) == 0, worker.log()[-3000:]
    return tuple(json.loads((workdir / f"{role}.json").read_text()) for role in ("a", "b", "late")[:len(workers)])


def known_deltas(width: int, round_index: int) -> list[list[torch.Tensor]]:
    from strategy_worker import known_delta, tiny_model

    shapes = [p.shape for p in tiny_model(width).parameters()]
    return [known_delta(role, round_index, shapes) for role in ("a", "b")]


def test_diloco_two_peers_equal_a_hand_computed_outer_step(procs, tmp_path):
    from strategy_worker import tiny_model

    a, b, late = run_two_workers(procs, tmp_path / "w", "none", rounds=2, width=3, late=True)
    for result in (a, b):
        assert [(r["applied"], r["group_size"], r["epoch"]) for r in result["rounds"]] == [(True, 2, 1), (True, 2, 2)]
        assert result["rounds"][-1]["resynced"], "the last round of a run resyncs the anchors"

    # by hand: DiLoCo's outer Nesterov SGD, lr 0.7, momentum 0.9, on the mean pseudo-gradient
    anchor = [p.detach().clone() for p in tiny_model(3).parameters()]
    momentum = [torch.zeros_like(t) for t in anchor]
    for round_index in range(2):
        delta_a, delta_b = known_deltas(3, round_index)
        mean = [(x + y) / 2 for x, y in zip(delta_a, delta_b)]
        for result in (a, b):
            for got, want in zip(result["rounds"][round_index]["mean_delta"], mean):
                torch.testing.assert_close(torch.tensor(got), want, rtol=0, atol=1e-7)
        momentum = [0.9 * m + d for m, d in zip(momentum, mean)]
        anchor = [g - 0.7 * (d + 0.9 * m) for g, d, m in zip(anchor, mean, momentum)]
    for result in (a, b):
        for got_anchor, got_model, got_momentum, want, want_m in zip(
                result["anchor"], result["model"], result["momentum"], anchor, momentum):
            torch.testing.assert_close(torch.tensor(got_anchor), want, rtol=0, atol=1e-6)
            torch.testing.assert_close(torch.tensor(got_model), want, rtol=0, atol=1e-6)
            torch.testing.assert_close(torch.tensor(got_momentum), want_m, rtol=0, atol=1e-6)
    # a late joiner gets the anchor, the outer momentum and the epoch, and starts from the anchor
    assert late["loaded"] and late["epoch"] == 2
    for key in ("anchor", "momentum", "model"):
        for got, want in zip(late[key], a["anchor" if key == "model" else key]):
            assert got == want, key
    # a round that did nothing would leave the model at anchor - own delta: far from the expected
    assert (torch.tensor(a["anchor"][0]) - tiny_model(3).weight).abs().max() > 1e-3


def test_uint8_averaged_values_across_two_processes(procs, tmp_path):
    a, b = run_two_workers(procs, tmp_path / "w", "uint8", rounds=1, width=64)
    delta_a, delta_b = known_deltas(64, 0)
    mean = torch.cat([((x + y) / 2).reshape(-1) for x, y in zip(delta_a, delta_b)])
    half_gap = torch.cat([((x - y) / 2).reshape(-1) for x, y in zip(delta_a, delta_b)]).norm()
    for result, own in ((a, delta_a), (b, delta_b)):
        assert result["rounds"][0]["applied"] and result["rounds"][0]["group_size"] == 2, result["rounds"][0]
        got = torch.cat([torch.tensor(t).reshape(-1) for t in result["rounds"][0]["mean_delta"]])
        error = (got - mean).norm() / mean.norm()
        # two 8-bit passes (up and down) cost ~2-3%; a dropped part would leave own values (~100% off)
        assert error < 0.06, error.item()
        assert (got - mean).norm() < 0.1 * half_gap
    # every member holds the same decoded average, bit for bit (peer.same_result_allreduce), so the anchors
    # are equal: an auditor replays one peer's phase from another peer's anchor
    assert a["rounds"][0]["mean_delta"] == b["rounds"][0]["mean_delta"]
    assert a["anchor"] == b["anchor"] and a["model"] == b["model"] == a["anchor"]


# -- a DiLoCo run through the real CLI -----------------------------------------------------------

def test_two_peers_train_with_diloco_and_end_equal(procs, tmp_path):
    from coordinator.books.ledger import Ledger
    from examples.digits import TASK
    from peer.outbox import Outbox

    run = write_run(tmp_path / "run.toml", epochs=4, strategy="diloco", compression="fp16", inner_steps=10,
                    matchmaking_time=1.0)
    run.write_text(run.read_text().replace("overlap = false", "overlap = true"))
    coordinator = start_coordinator(procs, tmp_path / "c", run)
    peers = [start_peer(procs, coordinator.address, coordinator.token, tmp_path / name) for name in ("a", "b")]
    for peer in peers:
        assert peer.wait(PEER_EXIT) == 0, peer.log()

    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    assert a["epoch"] == b["epoch"] == 4
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(tensor, b["state_dict"][name], atol=1e-6, rtol=0, msg=name)
    model = TASK.build_model(0)
    model.load_state_dict(a["state_dict"])
    assert TASK.evaluate(model, *TASK.eval_data())["accuracy"] > 0.5  # chance is 0.1

    rounds = [e for e in events(tmp_path / "a") if e["event"] == "round"]
    assert all(r["applied"] and r["group_size"] == 2 for r in rounds), rounds
    assert rounds[-1]["resynced"]
    status = coordinator.status()
    assert status["epoch"] == 4
    assert sorted(p["reports"] for p in status["peers"]) == [4, 4]
    recorded = Ledger.open_existing(tmp_path / "c").report_ids()
    for name in ("a", "b"):
        assert epochs_reported(tmp_path / name) == [0, 1, 2, 3]
        assert set(Outbox(tmp_path / name).acked_ids()) <= recorded


# -- the byte-level language model task ----------------------------------------------------------

def test_bytelm_loads_its_pinned_corpus_and_learns():
    from examples import bytelm
    from peer.task import load_task

    task = load_task("examples.bytelm", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core box: one thread is faster than two fighting
    try:
        check_bytelm_learns(task, bytelm.CONTEXT)
    finally:
        torch.set_num_threads(threads)


def check_bytelm_learns(task, context: int) -> None:
    inputs, targets = task.train_data()
    eval_inputs, eval_targets = task.eval_data()
    assert inputs.shape[1] == context and inputs.dtype == torch.long and len(inputs) > 5000
    assert torch.equal(inputs[0, 1:], targets[0, :-1])  # targets are the next bytes
    model = task.build_model(1)
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    before = task.evaluate(model, eval_inputs[:64], eval_targets[:64])
    assert 7 < before["bits_per_byte"] < 9  # ~uniform over 256 bytes at init
    optimizer = task.make_optimizer(model.parameters())
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        index = torch.randint(len(inputs), (16,), generator=generator)
        task.loss(model, inputs[index], targets[index]).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = task.evaluate(model, eval_inputs[:64], eval_targets[:64])
    assert after["bits_per_byte"] < before["bits_per_byte"] - 2, (before, after)


def test_bytelm_refuses_a_changed_corpus_file(tmp_path):
    from examples import bytelm

    for name, _ in bytelm.HELD_OUT_FILES:
        (tmp_path / name).write_bytes((bytelm.stdlib_dir() / name).read_bytes())
    assert bytelm.read_pinned(bytelm.HELD_OUT_FILES, tmp_path)  # identical copies pass
    changed = bytelm.HELD_OUT_FILES[1][0]
    (tmp_path / changed).write_bytes((tmp_path / changed).read_bytes() + b"\n# edited\n")
    with pytest.raises(UserError, match=f"{changed} differs from the pinned copy"):
        bytelm.read_pinned(bytelm.HELD_OUT_FILES, tmp_path)
    (tmp_path / changed).unlink()
    with pytest.raises(UserError, match=f"needs the standard-library file .*{changed}"):
        bytelm.read_pinned(bytelm.HELD_OUT_FILES, tmp_path)


def test_after_a_round_without_overlap_the_model_is_the_anchor_bit_for_bit():
    """An auditor replays the next phase from the anchor: a model one rounding away diverges under Adam."""
    from peer.diloco import restart_on_anchor

    launched = [torch.tensor([1.0, 0.25, -3.0])]
    anchor = [torch.tensor([1e-8, 0.5, 2.0])]  # far from x: x + (anchor - x) would round to 0.0 here
    assert (launched[0] + (anchor[0] - launched[0]))[0].item() != anchor[0][0].item()
    model = [torch.nn.Parameter(launched[0].clone())]
    with torch.no_grad():
        restart_on_anchor(model, anchor, launched)
    assert torch.equal(model[0].detach(), anchor[0])
    # with overlap, what was learnt since the launch stays on top of the new anchor
    with torch.no_grad():
        model[0].add_(torch.tensor([0.5, 0.5, 0.5]))
        restart_on_anchor(model, anchor, [anchor[0].clone()])
    torch.testing.assert_close(model[0].detach(), anchor[0] + 0.5)
