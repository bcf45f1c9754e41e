"""The sparse codec (peer.sparse_codec): values and bytes checked against hand computations.

Unit tests of the pure parts, then two real processes averaging sparse pseudo-gradients, then a
2-peer DiLoCo run through the real CLI that learns with the sparse codec.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import events, load_model, start_coordinator, start_peer, write_run
from peer import sparse_codec
from peer.compression import error_bound, error_figure, make_compression, round_trip
from peer.errors import UserError
from peer.runconfig import parse_run_config
from test_strategies import known_deltas, run_text, run_two_workers


def hand_tensor() -> torch.Tensor:
    """Two chunks of 16: a full one and a last one of 4 values."""
    x = torch.zeros(20)
    x[[1, 5, 9, 12]] = torch.tensor([0.2, 0.9, -0.3, 0.1])
    x[16:] = torch.tensor([0.0, 0.05, -0.02, 0.01])
    return x


def test_sparsify_and_wire_round_trip_match_hand_computed_values():
    # chunk 16, density 1/8: the 2 largest magnitudes of each chunk; 4 bits: codes -7..7 times 2**e,
    # e the smallest with max|chunk| <= 7 * 2**e
    sent = sparse_codec.sparsify(hand_tensor(), chunk=16, density=1 / 8, bits=4)
    want = torch.zeros(20)
    # chunk 1: max 0.9 -> e = -2 (7 * 0.25 = 1.75 >= 0.9 > 7 * 0.125); 0.9 / 0.25 = 3.6 -> 4 -> 1.0;
    # -0.3 / 0.25 = -1.2 -> -1 -> -0.25; 0.2 and 0.1 are not in the top 2
    want[5], want[9] = 1.0, -0.25
    # chunk 2: max 0.05 -> e = -7 (7/128 = 0.0547 >= 0.05 > 7/256); 0.05 * 128 = 6.4 -> 6; -0.02 * 128 = -2.56 -> -3
    want[17], want[18] = 6 / 128, -3 / 128
    assert torch.equal(sent, want)

    codec = make_compression("sparse", chunk=16, bits=4, density=1 / 8)
    decoded, size = round_trip(sent, codec)
    assert torch.equal(decoded, sent)  # the wire carries a sparsified vector losslessly
    # header 14 + one exponent byte per chunk 2 + length 4 + positions 3 + 4 codes of 4 bits 2; positions as
    # gaps would take 4 bytes (5, 3, 7, 0), a bitmap of 20 values 3: the smaller is sent
    assert size == 14 + 2 + 4 + 3 + 2
    longer = torch.cat([sent, torch.zeros(44)])  # 64 values: a bitmap of 8 bytes, gaps 4
    assert round_trip(longer, codec)[1] == 14 + 4 + 4 + 4 + 2
    # a dense vector costs more than its sparsified self, and the wire rounds it to the 4-bit grid
    dense = torch.linspace(-1, 1, 4096)
    decoded, dense_size = round_trip(dense, codec)
    assert dense_size > 4096 // 2 and (decoded - dense).abs().max() <= 1 / 7


def test_encoding_is_idempotent_and_bitmap_mode_and_hivemind_meanstd_still_decode():
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
    from hivemind.proto import runtime_pb2

    generator = torch.Generator().manual_seed(3)
    codec = make_compression("sparse", bits=2)
    for x in (torch.randn(10_000, generator=generator) * 1e-6, torch.randn(3, 70, generator=generator) * 50):
        once, _ = round_trip(x, codec)
        twice, _ = round_trip(once, codec)
        assert once.shape == x.shape and torch.equal(once, twice)
    wide = torch.zeros(3_000_000)
    wide[[0, 1, 600, 70_000, 2_999_999]] = torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0])
    assert torch.equal(round_trip(wide, codec)[0], wide)  # gaps > 255 (escapes)
    # MEANSTD_16BIT, the slot the sparse messages travel in, still decodes hivemind's own messages
    y = torch.randn(1000, generator=generator)
    back = deserialize_torch_tensor(serialize_torch_tensor(y, runtime_pb2.MEANSTD_16BIT))
    assert ((back - y).norm() / y.norm()).item() < 1e-3


def test_error_feedback_accumulates_what_was_not_sent():
    # chunk 16, one value per chunk, 8 bits: 1.0 -> e = -6 (127/64 >= 1 > 127/128): exact
    feedback = sparse_codec.ErrorFeedback([(16,)], chunk=16, density=1 / 16, bits=8)
    first = torch.zeros(16)
    first[0], first[1] = 1.0, 0.6
    (sent,) = feedback.compress([first])
    assert sent[0] == 1.0 and torch.count_nonzero(sent) == 1
    torch.testing.assert_close(feedback.residual[0][1], torch.tensor(0.6))  # dropped, kept for later
    second = torch.zeros(16)
    second[0], second[1] = 0.5, 0.5
    (sent,) = feedback.compress([second])
    # 0.6 + 0.5 = 1.1 now leads; e = -6, 1.1 * 64 = 70.4 -> 70 -> 1.09375; 0.5 waits in the residual
    assert sent[1] == 70 / 64 and torch.count_nonzero(sent) == 1
    torch.testing.assert_close(feedback.residual[0][:2], torch.tensor([0.5, 1.1 - 70 / 64]))
    # nothing is lost: everything the deltas held is either sent or still in the residual
    torch.testing.assert_close(torch.tensor([1.0, 70 / 64]).sum() + feedback.residual[0].sum(), (first + second).sum())
    # a round that is not applied puts the residual back; a resync drops it
    before = feedback.residual[0].clone()
    feedback.compress([second])
    feedback.restore()
    assert torch.equal(feedback.residual[0], before)
    feedback.reset()
    assert feedback.norm() == 0.0


def test_parts_of_the_all_reduce_hold_whole_chunks_and_misaligned_parts_are_refused():
    from hivemind.averaging.partition import TensorPartContainer
    from hivemind.compression import CompressionInfo

    codec = make_compression("sparse", chunk=4096)
    tensors = [torch.zeros(5_000_000), torch.zeros(300)]
    container = TensorPartContainer(tensors, peer_fractions=(0.3, 0.7), compression=codec)
    infos = [info for parts in container._input_parts_by_peer for _, info in parts]
    assert len(infos) == 4 and all(info.part_size % 4096 == 0 for info in infos)
    with pytest.raises(ValueError, match="do not align with chunks"):
        codec.compress(torch.zeros(100), CompressionInfo.from_tensor(torch.zeros(100)).get_part(1, 1000))


def test_downlink_error_stays_within_the_bound_the_check_uses():
    generator = torch.Generator().manual_seed(5)
    for bits in (2, 4, 8):
        codec = make_compression("sparse", bits=bits)
        sent = [sparse_codec.sparsify(torch.randn(50_000, generator=generator) * scale, 256, 1 / 32, bits)
                for scale in (1.0, 0.1, 3.0)]
        for group in (sent[:2], sent):
            mean = sum(group) / len(group)
            error = (round_trip(mean, codec)[0] - mean).norm().item()
            assert 0 < error <= error_bound(codec, [error_figure(codec, [s]) for s in group])


@pytest.mark.parametrize("values, message", [
    ({"strategy": "sync", "compression": "sparse"}, 'compression = "sparse" needs strategy = "diloco"'),
    ({"strategy": "diloco", "compression": "sparse", "sparse_chunk": 100}, "sparse_chunk must be a power of two"),
    ({"strategy": "diloco", "compression": "sparse", "sparse_density": 0.0}, "sparse_density must be in (0, 0.5]"),
    ({"strategy": "diloco", "compression": "sparse", "sparse_density": 0.001, "sparse_chunk": 64},
     "keeps no value of a chunk of 64"),
    ({"strategy": "diloco", "compression": "sparse", "sparse_bits": 3}, "sparse_bits must be one of 2, 4, 8"),
])
def test_bad_sparse_settings_are_refused(values, message):
    with pytest.raises(UserError) as caught:
        parse_run_config(run_text(**values))
    assert message in str(caught.value)


def test_sparse_settings_parse():
    config = parse_run_config(run_text(strategy="diloco", compression="sparse", sparse_density=0.0625, sparse_bits=8))
    assert (config.averaging.sparse_density, config.averaging.sparse_bits, config.averaging.sparse_chunk) == (
        0.0625, 8, 256)


# -- real processes ------------------------------------------------------------------------------

def test_sparse_average_of_two_processes_is_the_mean_of_what_they_sent(procs, tmp_path):
    a, b = run_two_workers(procs, tmp_path / "w", "sparse", rounds=1, width=64)
    codec = make_compression("sparse")
    sent = [[sparse_codec.sparsify(t, 256, 1 / 32, 4) for t in deltas] for deltas in known_deltas(64, 0)]
    mean = [(x + y) / 2 for x, y in zip(*sent)]
    for result, own, own_sent in ((a, known_deltas(64, 0)[0], sent[0]), (b, known_deltas(64, 0)[1], sent[1])):
        outcome = result["rounds"][0]
        assert outcome["applied"] and outcome["group_size"] == 2, outcome
        for got, want in zip(outcome["mean_delta"], mean):
            got = torch.tensor(got)
            assert torch.equal(got, round_trip(got, codec)[0])  # on the wire's grid
            assert (got - want).norm() <= error_bound(codec, [error_figure(codec, s) for s in sent]) / 10
            assert torch.count_nonzero(got) <= 2 * 8 * -(-got.numel() // 256)  # the union of two top-8 supports
        # the residual is what this peer did not send (its delta is anchor - (anchor - known), rounded)
        for residual, delta, out in zip(outcome["residual"], own, own_sent):
            torch.testing.assert_close(torch.tensor(residual), delta - out, rtol=0, atol=1e-7)
        assert 0 < outcome["payload_bytes"] < 4160 * 2 / 16  # > 16x fewer bytes than fp16
    assert a["rounds"][0]["mean_delta"] == b["rounds"][0]["mean_delta"]  # the same bits on every member
    assert a["anchor"] == b["anchor"] and a["model"] == b["model"] == a["anchor"]


def test_two_peers_learn_with_the_sparse_codec(procs, tmp_path):
    from examples.digits import TASK

    run = write_run(tmp_path / "run.toml", epochs=4, strategy="diloco", compression="sparse", inner_steps=10,
                    matchmaking_time=1.0)
    coordinator = start_coordinator(procs, tmp_path / "c", run)
    peers = [start_peer(procs, coordinator.address, coordinator.token, tmp_path / name) for name in ("a", "b")]
    for peer in peers:
        assert peer.wait(180) == 0, peer.log()
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    assert a["epoch"] == b["epoch"] == 4
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    model = TASK.build_model(0)
    before = TASK.evaluate(model, *TASK.eval_data())
    model.load_state_dict(a["state_dict"])
    after = TASK.evaluate(model, *TASK.eval_data())
    assert after["accuracy"] > 0.5 and after["loss"] < before["loss"] - 0.5, (before, after)  # chance is 0.1
    rounds = [e for e in events(tmp_path / "a") if e["event"] == "round"]
    assert [(r["applied"], r["group_size"]) for r in rounds] == [(True, 2)] * 4, rounds
    dense_fp16 = 2 * sum(t.numel() for t in a["state_dict"].values())
    assert all(0 < r["payload_bytes"] < dense_fp16 / 16 for r in rounds), rounds


def test_a_failed_round_gives_back_the_residual(procs, tmp_path):
    """Its phase's progress stays in the model, so the next delta carries it again: sent once, not twice."""
    from test_strategies import start_worker

    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "done").touch()
    worker = start_worker(procs, workdir, "alone", "sparse", rounds=2, width=64)
    assert worker.wait(120) == 0, worker.log()[-3000:]
    result = json.loads((workdir / "alone.json").read_text())
    assert [r["applied"] for r in result["rounds"]] == [False, False], result["rounds"]
    for outcome in result["rounds"]:
        assert all(not any(map(bool, torch.tensor(r).reshape(-1).tolist())) for r in outcome["residual"])
    # the second round sends what the first did: the same progress, with the residual given back
    assert result["rounds"][0]["mean_delta"] == result["rounds"][1]["mean_delta"]
    assert result["model"] != result["anchor"]  # the model keeps its local progress
