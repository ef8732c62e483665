"""The context-length axis: a GPT attends within blocks of ``context`` tokens, pays attention FLOPs for that span,
and switches context in place (no surgery), so a schedule can train short contexts first."""

from __future__ import annotations

import torch

from scaletune.data.base import DataSpec
from scaletune.hparams import HParams
from scaletune.models import get_family
from scaletune.scaling.moves import product_shapes, surgery_moves
from scaletune.shapes import Shape
from scaletune.surgery import Recipe, reshape

TEXT = DataSpec("lm", (16,), 32)
GPT = get_family("gpt")


def tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, TEXT.num_outputs, (3, TEXT.input_shape[0]), generator=torch.Generator().manual_seed(seed))


def test_a_short_context_sees_only_the_earlier_tokens_of_its_block_at_their_own_positions() -> None:
    torch.manual_seed(0)
    model = GPT.build(Shape(32, 2, context=4), TEXT, {}).eval()
    full = GPT.build(Shape(32, 2), TEXT, {}).eval()
    full.load_state_dict(model.state_dict())
    x, changed = tokens(1), tokens(1)
    changed[:, 5] = (changed[:, 5] + 1) % TEXT.num_outputs  # a token in the second block of 4
    with torch.no_grad():
        short, short_changed, long, long_changed = model(x), model(changed), full(x), full(changed)
    assert torch.allclose(short[:, :4], long[:, :4], atol=1e-6)  # the first block is the sequence's start
    assert torch.equal(short[:, 8:], short_changed[:, 8:])  # later blocks do not see it
    assert not torch.allclose(long[:, 8:], long_changed[:, 8:])  # the whole context does
    assert not torch.allclose(short[:, 4:8], long[:, 4:8])  # block 2 starts afresh, at positions 4..7


def test_flops_per_token_pay_attention_for_the_context_only() -> None:
    seq, width, depth = TEXT.input_shape[0], 32, 2
    saved = GPT.train_flops_per_sample(Shape(width, depth), TEXT, {}) - GPT.train_flops_per_sample(
        Shape(width, depth, context=4), TEXT, {})
    assert saved == 3 * depth * 4 * seq * (seq - 4) * width  # QK^T and AV over 12 fewer keys per token


def test_a_context_switch_keeps_the_model_its_weights_and_its_optimizer_state() -> None:
    recipe = Recipe(build=lambda s: GPT.build(s, TEXT, {}), base=Shape(16, 2), parametrization="mup",
                    hparams=HParams(lr=3e-3))
    torch.manual_seed(0)
    short = recipe.start(Shape(32, 2, context=4))
    logits = short.model(tokens(2))
    torch.nn.functional.cross_entropy(logits.reshape(-1, TEXT.num_outputs), tokens(3).reshape(-1)).backward()
    short.optimizer.step()
    weights = {k: v.clone() for k, v in short.model.state_dict().items()}
    state = short.named_state()

    long = reshape(recipe, short, Shape(32, 2, context=16), tokens(2))
    assert long.model is short.model and long.optimizer is short.optimizer and long.shape.context == 16
    assert all(torch.equal(v, long.model.state_dict()[k]) for k, v in weights.items())
    assert long.named_state().keys() == state.keys()
    fresh = recipe.start(Shape(32, 2, context=16)).model
    fresh.load_state_dict(weights)
    with torch.no_grad():
        assert torch.allclose(long.model(tokens(4)), fresh(tokens(4)), atol=1e-6)


def test_a_schedule_may_lengthen_or_shorten_the_context_and_join_it_with_depth() -> None:
    shapes = product_shapes(Shape(32, 1), {"context": [4, 16], "depth": [1, 2]})
    allowed = surgery_moves(shapes, max_axes=2)
    assert allowed("context=4,depth=1", "context=16,depth=1") and allowed("context=16,depth=1", "context=4,depth=1")
    assert allowed("context=4,depth=1", "context=16,depth=2") and not allowed("context=4,depth=2", "context=16,depth=1")
    assert Shape.from_dict(shapes["context=4,depth=2"].to_dict()) == Shape(32, 2, context=4)
