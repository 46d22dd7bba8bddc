import pytest
import torch

from flowdppo.schedule import choose_sde_steps, sde_window_steps, shift_sigmas, sigma_schedule


@pytest.mark.parametrize("steps,shift", [(10, 1.0), (10, 3.0), (28, 3.0), (40, 5.0), (1, 3.0)])
def test_schedule_matches_diffusers_flow_match_euler(steps, shift):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    ours = sigma_schedule(steps, shift, num_train_timesteps=1000)
    assert ours.shape == sched.sigmas.shape
    assert torch.allclose(ours, sched.sigmas.float(), atol=1e-7, rtol=0)


def test_default_schedule_is_even_and_shift_keeps_endpoints():
    s = sigma_schedule(10)
    assert torch.allclose(s, torch.linspace(1, 0, 11))
    shifted = sigma_schedule(10, 3.0)
    assert shifted[0] == 1 and shifted[-1] == 0
    assert torch.all(shifted[1:-1] > s[1:-1])  # a shift > 1 spends more steps at high noise
    assert torch.all(shifted[:-1] > shifted[1:])
    assert torch.allclose(shift_sigmas(torch.tensor(0.5), 3.0), torch.tensor(0.75))


def test_sde_steps_come_from_the_window_and_follow_the_generator():
    assert sde_window_steps(10, (0.0, 0.5)) == [0, 1, 2, 3, 4]
    draws = {
        tuple(choose_sde_steps(10, 3, (0.0, 0.5), torch.Generator().manual_seed(i)))
        for i in range(50)
    }
    assert len(draws) > 5  # re-drawn, not fixed
    assert all(len(d) == 3 and set(d) <= {0, 1, 2, 3, 4} and list(d) == sorted(d) for d in draws)
    a = choose_sde_steps(10, 3, generator=torch.Generator().manual_seed(7))
    b = choose_sde_steps(10, 3, generator=torch.Generator().manual_seed(7))
    assert a == b


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: sigma_schedule(0), "num_steps"),
        (lambda: sigma_schedule(10, 0.0), "shift"),
        (lambda: choose_sde_steps(10, 6, (0.0, 0.5)), "cannot draw 6"),
        (lambda: choose_sde_steps(10, 1, (0.5, 1.2)), "window"),
    ],
)
def test_schedule_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
