"""peer/loop.py's WorkBook: which work each report proves, for both strategies' outcome sequences."""

from __future__ import annotations

from peer.loop import WorkBook
from peer.sketch import Sketch
from peer.work import EpochProof, MicroBatchResult


def work(book: WorkBook, label: int, count: int) -> bool:
    """count micro-batches labelled ``label``, as the loop adds them; True if a new chain started."""
    chain, new = book.chain(label, lambda: EpochProof(label, Sketch(1.0, (0.0,)), "fp32"))
    for _ in range(count):
        index = len(chain.proof.micro_batches)
        chain.proof.micro_batches.append(MicroBatchResult(index, 32, 1.0, Sketch(1.0, (float(index),))))
        chain.meter.add(32, 1.0, 0.01)
    return new


def reported(book: WorkBook) -> list[tuple[int, list[int]]]:
    return [(c.proof.epoch, [m.index for m in c.proof.micro_batches]) for c in book.take_sealed()]


def test_sync_epochs_and_applied_diloco_rounds_report_one_chain_each():
    book = WorkBook()
    assert work(book, 0, 3)
    book.seal()
    assert reported(book) == [(0, [0, 1, 2])]
    assert work(book, 1, 2)  # the next epoch is a new chain (DiLoCo: a fresh inner optimizer)
    book.seal()
    assert reported(book) == [(1, [0, 1])]
    assert book.chains == {}


def test_a_failed_round_continues_its_chain_with_the_next_indices():
    book = WorkBook()
    work(book, 4, 2)
    book.seal()  # launched; the round fails: nothing reported, the work stays in the local model
    assert not work(book, 4, 2)  # the same epoch again: the chain goes on, no new optimizer
    book.seal()
    assert reported(book) == [(4, [0, 1, 2, 3])]


def test_overlap_reports_only_the_work_the_applied_round_carried():
    book = WorkBook()
    work(book, 0, 2)
    book.seal()  # round 0 launched
    work(book, 1, 2)  # the next phase computes while round 0 is in flight
    assert reported(book) == [(0, [0, 1])]  # round 0 applied: only its phase is reported
    book.seal()  # round 1 launched
    assert reported(book) == [(1, [0, 1])]


def test_overlap_after_a_failed_round_keeps_every_chain_until_it_is_in():
    book = WorkBook()
    work(book, 0, 2)
    book.seal()  # round 0 launched
    work(book, 1, 2)  # phase labelled 1 while round 0 runs; round 0 fails
    book.seal()  # round 0 again, carrying both phases
    work(book, 1, 2)  # labelled 1 again: chain 1 reopens and goes on
    assert reported(book) == [(0, [0, 1])]  # round 0 applied: chain 1 still grows
    book.seal()
    assert reported(book) == [(1, [0, 1, 2, 3])]


def test_a_discard_throws_all_local_work_away():
    book = WorkBook()
    work(book, 2, 3)
    book.seal()
    work(book, 3, 1)
    assert book.discard() == 4 * 32
    assert reported(book) == [] and work(book, 5, 1)
