"""The convergence rule of benchmarks/converged.py (the script itself is run by hand: BENCHMARKS.md)."""

from converged import converged


def test_prototypes_run_at_least_the_asked_multiple_and_until_held_out_stops_rising():
    assert not converged({1: 50.0}, at_least=10, min_gain=0.5)
    assert not converged({1: 50.0, 2: 50.0, 5: 49.0}, at_least=10, min_gain=0.5)  # flat, but fewer than 10x
    assert not converged({1: 50.0, 5: 52.0, 10: 53.0}, at_least=10, min_gain=0.5)  # still rising at 10x
    assert converged({1: 50.0, 5: 52.0, 10: 53.0, 20: 53.4}, at_least=10, min_gain=0.5)
    assert converged({1: 50.0, 10: 49.0}, at_least=10, min_gain=0.5)  # fell
