"""A peer holds at the edge of what the coordinator accepts (peer/pace.py), and only there."""

import threading

from peer.pace import ahead_of_run, hold_for_run


def test_the_bound_is_one_short_of_what_the_coordinator_accepts():
    # the coordinator accepts reports up to run epoch + slack; a peer that loads this one's state after
    # it finished epoch L reports L + 1, so L stays below the limit
    assert not ahead_of_run(5, 6) and ahead_of_run(6, 6) and ahead_of_run(9, 6)
    assert not ahead_of_run(1_000, None)  # no fresh view (coordinator down): the swarm trains on


def test_a_peer_at_the_bound_holds_until_the_run_moves_and_says_so_once():
    limit, said, nudged = [6], [], []
    stop = threading.Event()

    def run_moves():
        limit[0] = 7

    timer = threading.Timer(0.3, run_moves)
    timer.start()
    held = hold_for_run(lambda: 6, lambda: limit[0], stop, said.append, nudge=lambda: nudged.append(1), poll=0.01)
    timer.join()
    assert held and limit[0] == 7 and len(said) == 1 and "waiting for the swarm" in said[0] and nudged == [1]


def test_no_hold_below_the_bound_and_a_stop_or_the_run_s_end_releases_a_hold():
    stop = threading.Event()
    assert not hold_for_run(lambda: 2, lambda: 6, stop, print)
    over = threading.Event()
    threading.Timer(0.2, over.set).start()
    assert hold_for_run(lambda: 6, lambda: 6, stop, lambda text: None, over=over.is_set, poll=0.01)
    stop.set()
    assert hold_for_run(lambda: 6, lambda: 6, stop, lambda text: None, poll=0.01)


def test_a_hold_ends_at_its_bound_when_the_run_does_not_move():
    # peers that loaded the holder's state hold at the same bound; the run moves only once they report
    stop = threading.Event()
    assert hold_for_run(lambda: 6, lambda: 6, stop, lambda text: None, poll=0.01, bound=0.2)
    assert not stop.is_set()
