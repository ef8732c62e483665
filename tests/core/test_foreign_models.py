"""Model code scaletune did not write: raw nn.Parameter matrices, residual branches and attention without
scaletune's conventions, and the refusals when a plan could not transfer."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaletune.hparams import HParams
from scaletune.parametrize import (
    ParamClass, ParametrizationError, ParamOptions, build_model, classify, make_plan,
)
from scaletune.shapes import Shape

VOCAB, SEQ = 40, 8
HP = HParams(lr=0.01, weight_decay=0.1, eps=1e-8, init_std=2.0, output_mult=3.0, input_mult=5.0)
TOKENS = torch.randint(0, VOCAB, (2, SEQ))


# ---------------------------------------------------------------- raw parameters vs nn.Linear


class LinearBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.branch_mult = 1.0
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)
        self.mix = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch_mult * self.mix(self.fc2(torch.relu(self.fc1(self.norm(x)))))


class LinearLM(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, width)
        self.blocks = nn.ModuleList(LinearBlock(width) for _ in range(depth))
        self.lm_head = nn.Linear(width, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.wte(idx)
        for block in self.blocks:
            h = block(h)
        return self.lm_head(h)


class InOut(nn.Module):
    """A raw (in, out) matrix used as x @ W."""

    def __init__(self, fan_in: int, fan_out: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(fan_in, fan_out))
        self.bias = nn.Parameter(torch.zeros(fan_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight
        return y if self.bias is None else y + self.bias


class OutIn(nn.Module):
    """A raw (out, in) matrix used as torch.matmul(x, W.t()): the nn.Linear layout without nn.Linear."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(fan_out, fan_in))
        self.bias = nn.Parameter(torch.zeros(fan_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight.t()) + self.bias


class Lookup(nn.Module):
    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, width))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.weight[idx]


class Square(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class RawBlock(LinearBlock):
    def __init__(self, width: int) -> None:
        nn.Module.__init__(self)
        self.branch_mult = 1.0
        self.norm = nn.LayerNorm(width)
        self.fc1 = OutIn(width, 4 * width)
        self.fc2 = InOut(4 * width, width)
        self.mix = Square(width)


class RawLM(LinearLM):
    def __init__(self, width: int, depth: int) -> None:
        nn.Module.__init__(self)
        self.wte = Lookup(VOCAB, width)
        self.blocks = nn.ModuleList(RawBlock(width) for _ in range(depth))
        self.lm_head = InOut(width, VOCAB, bias=False)


@pytest.mark.parametrize("parametrization", ["sp", "mup", "completep"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_raw_parameter_model_gets_the_plan_of_the_nn_linear_model(parametrization: str, optimizer: str) -> None:
    base, target = Shape(16, 2), Shape(64, 6)
    linear = make_plan(classify(LinearLM, base, target), parametrization, HP, optimizer)
    raw = make_plan(classify(RawLM, base, target, example_input=TOKENS), parametrization, HP, optimizer)
    assert raw.to_dict() == linear.to_dict()
    c = {p.name: p for p in classify(RawLM, base, target, example_input=TOKENS).params}
    assert c["blocks.5.fc2.weight"].base_fan_in == 64 and c["blocks.5.fc2.weight"].m_in == 4
    assert c["lm_head.weight"].cls is ParamClass.OUTPUT and c["wte.weight"].cls is ParamClass.INPUT


def test_raw_model_is_built_and_initialised_like_the_linear_one() -> None:
    torch.manual_seed(0)
    built = build_model(RawLM, Shape(16, 2), Shape(64, 2), "mup", HP, example_input=TOKENS)
    model = built.model
    assert torch.count_nonzero(model.lm_head.weight) == 0  # readout zero-init, not an input init
    assert model.blocks[0].fc2.weight.std().item() == pytest.approx(2.0 / math.sqrt(256), rel=0.05)
    assert model.blocks[0].mix.weight.std().item() == pytest.approx(2.0 / 8, rel=0.05)  # not fan-in 1
    nn.init.normal_(model.lm_head.weight)
    h = model.wte(TOKENS)
    for block in model.blocks:
        h = block(h)
    torch.testing.assert_close(model(TOKENS), (h * 3.0 / 4) @ model.lm_head.weight)  # output_mult / m


def test_square_raw_hidden_matrices_need_no_example_input() -> None:
    class SquareMLP(nn.Module):
        def __init__(self, width: int, depth: int) -> None:
            super().__init__()
            self.inp = nn.Linear(3, width)
            self.hidden = nn.ModuleList(Square(width) for _ in range(2))
            self.out = nn.Linear(width, 2)

    (p,) = [p for p in classify(SquareMLP, Shape(16, 1), Shape(64, 1)).params if p.name == "hidden.1.weight"]
    assert p.cls is ParamClass.HIDDEN and p.base_fan_in == 16 and p.m_in == 4


def test_ambiguous_raw_matrices_are_refused_without_an_example_input() -> None:
    with pytest.raises(ParametrizationError, match=r"(?s)blocks.0.fc1.weight.*example_input=") as info:
        classify(RawLM, Shape(16, 2), Shape(64, 2))
    assert "lm_head.weight" in str(info.value) and "wte.weight" in str(info.value)


def test_a_readout_held_by_the_model_itself_is_refused() -> None:
    class Bare(nn.Module):
        def __init__(self, width: int, depth: int) -> None:
            super().__init__()
            self.inp = nn.Linear(3, width)
            self.head = nn.Parameter(torch.empty(width, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inp(x) @ self.head

    with pytest.raises(ParametrizationError, match="module of its own"):
        classify(Bare, Shape(16, 1), Shape(32, 1), example_input=torch.randn(4, 3))


# ---------------------------------------------------------------- nanoGPT-style code


class CausalSelfAttention(nn.Module):
    """As in nanoGPT: fused c_attn, F.scaled_dot_product_attention with its default 1/sqrt(d) scale."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_embd, self.n_head = n_embd, n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(n_embd), CausalSelfAttention(n_embd, n_head)
        self.ln_2, self.mlp = nn.LayerNorm(n_embd), MLP(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, width: int, depth: int, n_head: int | None = None) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, width), nn.Embedding(SEQ, width)
        self.blocks = nn.ModuleList(Block(width, n_head or width // 16) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.ln_f(h))


def four_heads(width: int, depth: int) -> NanoGPT:
    return NanoGPT(width, depth, n_head=4)


BRANCHES = ["blocks.*.attn", "blocks.*.mlp"]


@pytest.mark.parametrize("parametrization", ["depth_mup", "completep"])
def test_depth_change_without_scalable_branches_is_refused(parametrization: str) -> None:
    with pytest.raises(ParametrizationError) as info:
        build_model(NanoGPT, Shape(32, 2), Shape(32, 8), parametrization, HP)
    message = str(info.value)
    assert "depth changes 2 -> 8" in message and "blocks.0, blocks.1, blocks.2, blocks.3, ... (8 in all)" in message
    assert "branch_outputs=" in message and "['blocks.*.attn', 'blocks.*.mlp']" in message  # the fix, with a hint
    build_model(NanoGPT, Shape(32, 2), Shape(32, 8), "mup", HP)  # mup does not transfer depth: nothing to refuse
    build_model(NanoGPT, Shape(32, 2), Shape(64, 2), parametrization, HP)  # width only


def test_branch_outputs_are_multiplied_by_r_to_the_minus_alpha() -> None:
    torch.manual_seed(0)
    built = build_model(NanoGPT, Shape(32, 2), Shape(32, 8), "completep", HP, branch_outputs=BRANCHES)
    assert sorted({m.name for m in built.plan.modules if m.role == "branch"}) == sorted(
        f"blocks.{i}.{part}" for i in range(8) for part in ("attn", "mlp"))
    mlp, x = built.model.blocks[5].mlp, torch.randn(2, SEQ, 32)
    torch.testing.assert_close(mlp(x), mlp.c_proj(F.gelu(mlp.c_fc(x))) * 0.25)  # r = 4, alpha = 1
    depth_mup = build_model(NanoGPT, Shape(32, 2), Shape(32, 8), "depth_mup", HP, branch_outputs=BRANCHES)
    mlp = depth_mup.model.blocks[0].mlp
    torch.testing.assert_close(mlp(x), mlp.c_proj(F.gelu(mlp.c_fc(x))) * 0.5)  # alpha = 1/2
    build_model(NanoGPT, Shape(32, 2), Shape(32, 8), "completep", HP, branch_outputs=BRANCHES)  # hooks do not stack


def test_only_partly_covered_blocks_are_named_in_the_refusal() -> None:
    with pytest.raises(ParametrizationError, match=r"the blocks blocks.4, blocks.5, blocks.6, blocks.7 contain no"):
        build_model(NanoGPT, Shape(32, 2), Shape(32, 8), "completep", HP, branch_outputs=["blocks.[0-3].mlp"])


def test_a_pattern_matching_nothing_is_refused() -> None:
    with pytest.raises(ParametrizationError, match=r"'blocks.\*.ffn' matches no module"):
        build_model(NanoGPT, Shape(32, 2), Shape(32, 8), "completep", HP, branch_outputs=["blocks.*.ffn"])


def _reference_attention(attn: CausalSelfAttention, x: torch.Tensor, scale: float) -> torch.Tensor:
    b, t, c = x.shape
    q, k, v = attn.c_attn(x).split(c, dim=2)
    q, k, v = (z.view(b, t, attn.n_head, c // attn.n_head).transpose(1, 2) for z in (q, k, v))
    logits = (q @ k.transpose(-1, -2)) * scale + torch.full((t, t), float("-inf")).triu(1)
    return attn.c_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c))


@pytest.mark.parametrize("parametrization", ["mup", "depth_mup", "completep"])
def test_changing_head_dimension_without_a_settable_scale_is_refused(parametrization: str) -> None:
    with pytest.raises(ParametrizationError) as info:
        build_model(four_heads, Shape(64, 2), Shape(256, 2), parametrization, HP)
    message = str(info.value)
    assert "blocks.0.attn, blocks.1.attn" in message and "16 -> 64" in message and "attention=[patterns]" in message
    build_model(four_heads, Shape(64, 2), Shape(256, 2), "sp", HP)  # SP keeps 1/sqrt(d): nothing to set
    build_model(NanoGPT, Shape(64, 2), Shape(256, 2), parametrization, HP)  # head dim fixed at 16: 1/sqrt(d) holds


def test_declared_attention_gets_the_mup_logit_scale_inside_sdpa() -> None:
    torch.manual_seed(0)
    hp = HParams(lr=0.01, attn_mult=2.0)
    built = build_model(four_heads, Shape(64, 2), Shape(256, 2), "mup", hp,
                        options=ParamOptions(zero_init_query=False), attention=["blocks.*.attn"])
    (info,) = [m for m in built.plan.modules if m.name == "blocks.1.attn"]
    assert (info.role, info.attribute, info.hook) == ("attention", None, True)
    assert info.value == pytest.approx(2.0 * math.sqrt(16) / 64)  # attn_mult * sqrt(d_base) / d
    attn, x = built.model.blocks[1].attn, torch.randn(2, SEQ, 256)
    torch.testing.assert_close(attn(x), _reference_attention(attn, x, 2.0 / 16), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(attn(x), _reference_attention(attn, x, 1 / 8))  # not SDPA's default 1/sqrt(64)
    loss = built.model(TOKENS).logsumexp(-1).mean()
    loss.backward()  # the scale hook leaves no mode behind and gradients flow
    assert torch.isfinite(loss) and attn.c_attn.weight.grad is not None


def test_declared_attention_zeroes_the_query_third_of_a_fused_projection() -> None:
    built = build_model(four_heads, Shape(64, 2), Shape(128, 2), "mup", HP, attention=["blocks.*.attn"])
    c_attn = built.model.blocks[0].attn.c_attn
    assert torch.count_nonzero(c_attn.weight[:128]) == 0 and torch.count_nonzero(c_attn.weight[128:]) > 0
    assert torch.count_nonzero(c_attn.bias[:128]) == 0


def test_a_float_scale_attribute_is_set() -> None:
    class Scaled(CausalSelfAttention):
        def __init__(self, n_embd: int, n_head: int) -> None:
            super().__init__(n_embd, n_head)
            self.head_dim, self.scaling = n_embd // n_head, (n_embd // n_head) ** -0.5

    def factory(width: int, depth: int) -> NanoGPT:
        model = NanoGPT(width, depth, n_head=4)
        for block in model.blocks:
            block.attn = Scaled(width, 4)
        return model

    built = build_model(factory, Shape(64, 2), Shape(256, 2), "mup", HP, attention=["blocks.*.attn"])
    assert built.model.blocks[0].attn.scaling == pytest.approx(4 / 64)
