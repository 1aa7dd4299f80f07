"""bench/bench_cpt_train.py alternates its arms: the order rotates every round."""

from collections import Counter

from bench.bench_cpt_train import ARMS, round_order


def test_bench_rounds_rotate_so_each_arm_runs_once_in_every_position():
    rounds = [round_order(r) for r in range(len(ARMS))]
    assert all(sorted(order) == sorted(ARMS) for order in rounds)
    for position in range(len(ARMS)):
        assert Counter(order[position] for order in rounds) == Counter(ARMS)  # each arm first, middle and last once
    assert round_order(0) != round_order(1)  # two rounds (the default) already differ
    assert round_order(len(ARMS)) == round_order(0)
