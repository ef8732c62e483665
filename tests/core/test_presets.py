"""Presets found by model class, on the real Hugging Face `transformers` models (built from configs, no weights)."""

import math
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from scaletune.hparams import HParams
from scaletune.parametrize import ParamClass, build_model, classify
from scaletune.shapes import Shape

VOCAB, SEQ = 50, 16
HP = HParams(lr=0.01, attn_mult=1.0)
TOKENS = torch.randint(0, VOCAB, (2, SEQ))
BASE, TARGET = Shape(32, 2), Shape(128, 4)


def gpt2(width: int, depth: int, attn_implementation: str = "sdpa") -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=width, n_layer=depth, n_head=4,
                        bos_token_id=0, eos_token_id=0, attn_implementation=attn_implementation)
    return GPT2LMHeadModel(config)


def llama(width: int, depth: int) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width,
                                        num_hidden_layers=depth, num_attention_heads=4, num_key_value_heads=4,
                                        max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=0))


def test_gpt2_conv1d_weights_are_read_as_in_out() -> None:
    c = {p.name: p for p in classify(gpt2, BASE, TARGET).params}
    fc, proj = c["transformer.h.3.mlp.c_fc.weight"], c["transformer.h.3.mlp.c_proj.weight"]
    assert (fc.cls, fc.base_fan_in, fc.m_in, fc.in_block) == (ParamClass.HIDDEN, 32, 4, True)
    assert (proj.cls, proj.base_fan_in, proj.m_in) == (ParamClass.HIDDEN, 128, 4)
    wte = c["transformer.wte.weight"]
    assert wte.cls is ParamClass.INPUT and wte.tied_readout  # lm_head shares it


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_gpt2_preset_sets_attention_scale_branches_and_query(attn_implementation: str) -> None:
    torch.manual_seed(0)
    built = build_model(lambda w, d: gpt2(w, d, attn_implementation), BASE, TARGET, "completep", HP)
    model = built.model
    attn = model.transformer.h[1].attn
    assert attn.scaling == pytest.approx(math.sqrt(8) / 32)  # mu-P 1/d, equal to SP at the base head dim 8
    assert torch.count_nonzero(attn.c_attn.weight[:, :128]) == 0 and torch.count_nonzero(attn.c_attn.weight[:, 128:])
    mlp, x = model.transformer.h[3].mlp, torch.randn(2, SEQ, 128)
    unscaled = torch.addmm(mlp.c_proj.bias, mlp.act(mlp.c_fc(x)).view(-1, 512), mlp.c_proj.weight).view(2, SEQ, 128)
    torch.testing.assert_close(mlp.c_proj(mlp.act(mlp.c_fc(x))), unscaled * 0.5)  # r = 2, alpha = 1
    assert torch.isfinite(model(TOKENS).logits).all()


def test_gpt2_logit_scale_reaches_both_attention_implementations() -> None:
    outputs = []
    for implementation in ("sdpa", "eager"):
        torch.manual_seed(0)
        built = build_model(lambda w, d, i=implementation: gpt2(w, d, i), Shape(32, 2), Shape(128, 2), "mup", HP)
        for block in built.model.transformer.h:
            torch.nn.init.normal_(block.attn.c_attn.weight, std=0.5)  # undo the query zero-init: logits matter
        outputs.append(built.model(TOKENS).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)


def test_llama_preset() -> None:
    torch.manual_seed(0)
    built = build_model(llama, BASE, TARGET, "completep", HP)
    model = built.model
    layer = model.model.layers[2]
    assert layer.self_attn.scaling == pytest.approx(math.sqrt(8) / 32)
    assert torch.count_nonzero(layer.self_attn.q_proj.weight) == 0 and torch.count_nonzero(model.lm_head.weight) == 0
    roles = {m.name: m.role for m in built.plan.modules}
    assert roles["model.layers.3.self_attn.o_proj"] == roles["model.layers.3.mlp.down_proj"] == "branch"
    assert roles["lm_head"] == "output" and roles["model.embed_tokens"] == "input"
    x = torch.randn(2, SEQ, 128)
    down = layer.mlp.down_proj
    torch.testing.assert_close(down(x[..., :128].repeat(1, 1, 2)),
                               torch.nn.functional.linear(x[..., :128].repeat(1, 1, 2), down.weight) * 0.5)
    assert torch.isfinite(model(TOKENS).logits).all()


def test_the_core_imports_without_transformers() -> None:
    code = ("import sys; import scaletune, scaletune.parametrize, scaletune.presets, scaletune.coord_check; "
            "assert 'transformers' not in sys.modules and 'timm' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
