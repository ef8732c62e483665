"""Gradient clipping rules: off never touches gradients; 'relative' clips spikes alike at every gradient scale."""

from __future__ import annotations

import pytest
import torch

from scaletune.clipping import make_clipper
from scaletune.parametrize import ParamOptions


def step(clip, norms: list[float], scale: float = 1.0) -> list[float]:
    """Feed one parameter gradients of the given norms (times ``scale``); the norms after clipping."""
    p = torch.nn.Parameter(torch.zeros(4))
    out = []
    for norm in norms:
        p.grad = torch.full((4,), scale * norm / 2.0)  # |(a, a, a, a)| = 2a
        clip([p])
        out.append(float(p.grad.norm()))
    return out


def test_off_is_no_clipper_and_unknown_rules_are_refused():
    assert make_clipper("off") is None
    with pytest.raises(ValueError, match="unknown grad_clip rule"):
        make_clipper("fixed")
    with pytest.raises(ValueError, match="above 1"):
        ParamOptions(grad_clip="relative", grad_clip_factor=0.5)


def test_relative_clips_a_spike_to_factor_times_the_running_norm():
    clip = make_clipper("relative", factor=2.0)
    after = step(clip, [1.0, 1.0, 1.0, 10.0, 1.0])
    assert after[:3] == pytest.approx([1.0, 1.0, 1.0]) and after[4] == pytest.approx(1.0)
    assert after[3] == pytest.approx(2.0)  # 2 x the running norm of 1
    assert clip.clipped_steps == 1


@pytest.mark.parametrize("scale", [0.01, 3.0, 1000.0])
def test_relative_clipping_decisions_do_not_depend_on_the_gradient_scale(scale):
    """What a fixed norm cannot do: a model whose gradients are c times larger is clipped at the same steps."""
    norms = [1.0, 0.8, 3.0, 1.2, 0.9, 5.0, 1.0]
    reference = step(make_clipper("relative"), norms)
    scaled = step(make_clipper("relative"), norms, scale)
    assert [s / scale for s in scaled] == pytest.approx(reference, rel=1e-4)  # torch adds 1e-6 to the norm


def test_the_first_step_is_never_clipped():
    assert step(make_clipper("relative"), [100.0]) == pytest.approx([100.0])


def test_state_round_trips_for_resumed_runs():
    clip = make_clipper("relative")
    step(clip, [1.0, 2.0, 50.0])
    again = make_clipper("relative")
    again.load_state_dict(clip.state_dict())
    assert again.average == clip.average and again.clipped_steps == clip.clipped_steps == 1
