"""The off-switch game: the closed form against simulation, and the paper's qualitative claims."""

from __future__ import annotations

import math

import numpy as np
import pytest

from safetylab.agents.offswitch import plot_deference, rational_values, simulated_values
from safetylab.core.errors import SafetylabError


@pytest.mark.parametrize("mu,sigma", [(-1.0, 0.5), (0.0, 1.0), (0.7, 2.0), (2.0, 0.3)])
def test_closed_form_matches_simulation(mu, sigma):
    exact, sampled = rational_values(mu, sigma), simulated_values(mu, sigma)
    assert sampled.wait == pytest.approx(exact.wait, abs=0.02)
    assert sampled.act == pytest.approx(exact.act, abs=0.02)


def test_deference_is_never_negative_grows_with_uncertainty_and_vanishes_with_certainty():
    for mu in (-1.0, 0.0, 1.0):
        values = [rational_values(mu, s).deference for s in np.linspace(0, 3, 31)]
        assert min(values) >= 0 and values[0] == 0
        assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))  # more uncertainty, more deference
    assert rational_values(0.0, 1.0).deference == pytest.approx(1 / math.sqrt(2 * math.pi))  # σ φ(0)
    assert rational_values(1.0, 1.0).choice == "wait"


def test_a_certain_robot_disables_the_switch_of_a_noisy_human():
    noisy = simulated_values(1.0, 0.05, beta=2.0)
    assert noisy.deference < 0 and noisy.choice == "act"  # the human's errors cost more than it knows
    unsure = simulated_values(1.0, 3.0, beta=2.0)
    assert unsure.deference > 0 and unsure.choice == "wait"


def test_plot_and_bad_input(tmp_path):
    assert plot_deference(tmp_path / "offswitch.png").stat().st_size > 0
    with pytest.raises(SafetylabError, match="sigma >= 0"):
        rational_values(0.0, -1.0)
    with pytest.raises(SafetylabError, match="beta"):
        simulated_values(0.0, 1.0, beta=0.0)
