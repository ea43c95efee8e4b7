"""The health findings as pure functions: how often they cry wolf on good chains, and that they see real faults."""

import pytest
import torch

from lightning_devinterp.sampling.health import diagnose

NUM_DRAWS = 40


def findings(draws, init_loss=0.0):
    return diagnose(
        draws,
        init_loss,
        llc_mean=1.0,
        failures={},
        acceptance=torch.full((draws.shape[0],), 0.95),
        epsilon=1e-4,
        num_burnin_steps=10,
        num_steps_bw_draws=1,
    )


@pytest.mark.parametrize("num_chains", [2, 4, 8])
def test_levelled_off_draws_are_rarely_flagged(num_chains):
    """Stationary draws around an elevation of one noise unit: at most 2% flagged as still drifting."""
    generator = torch.Generator().manual_seed(num_chains)
    flagged = 0
    for _ in range(500):
        draws = 1.0 + torch.randn(num_chains, NUM_DRAWS, generator=generator, dtype=torch.float64)
        flagged += any("not levelled off" in finding for finding in findings(draws))
    assert flagged / 500 <= 0.02


@pytest.mark.parametrize("num_chains", [4, 8])
def test_a_trace_still_rising_is_flagged(num_chains):
    generator = torch.Generator().manual_seed(0)
    rise = torch.linspace(0.0, 3.0, NUM_DRAWS, dtype=torch.float64)
    flagged = 0
    for _ in range(50):
        draws = 1.0 + rise + 0.3 * torch.randn(num_chains, NUM_DRAWS, generator=generator, dtype=torch.float64)
        flagged += any("not levelled off" in finding for finding in findings(draws))
    assert flagged / 50 >= 0.9
