"""What shapes cannot show about foreign model code (:class:`Declarations`), and presets of it for popular
model classes, found by the model's class: no annotations for their users.

Classes are matched by their import path, so neither ``transformers`` nor anything else is imported here.
Each preset says where the residual branches end (the output projection of each attention and MLP
branch) and which modules compute attention (Hugging Face passes their ``scaling`` attribute to every
attention implementation). Checked against transformers 5.24 (tests/core/test_presets.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Declarations:
    """What shapes cannot show about foreign model code: fnmatch patterns on module names, module classes.

    ``branch_outputs``: modules whose output is one residual branch (the core multiplies it by r^-alpha);
    ``attention``: modules computing attention (the core sets their logit scale); ``transposed``: module
    classes ("module.QualName") that store their weight as (in, out), like Hugging Face's Conv1D.
    """

    branch_outputs: tuple[str, ...] = ()
    attention: tuple[str, ...] = ()
    transposed: tuple[str, ...] = ()

    def merged(self, other: Declarations) -> Declarations:
        return Declarations(*(tuple(dict.fromkeys((*a, *b))) for a, b in (
            (self.branch_outputs, other.branch_outputs), (self.attention, other.attention),
            (self.transposed, other.transposed))))


_HF = "transformers.models"
_HF_CONV1D = "transformers.pytorch_utils.Conv1D"  # stores its weight as (in, out)


def _gpt2(prefix: str) -> Declarations:
    return Declarations(branch_outputs=(f"{prefix}h.*.attn.c_proj", f"{prefix}h.*.mlp.c_proj"),
                        attention=(f"{prefix}h.*.attn",), transposed=(_HF_CONV1D,))


def _llama(prefix: str) -> Declarations:
    return Declarations(branch_outputs=(f"{prefix}layers.*.self_attn.o_proj", f"{prefix}layers.*.mlp.down_proj"),
                        attention=(f"{prefix}layers.*.self_attn",))


PRESETS: dict[str, Declarations] = {
    f"{_HF}.gpt2.modeling_gpt2.GPT2LMHeadModel": _gpt2("transformer."),
    f"{_HF}.gpt2.modeling_gpt2.GPT2Model": _gpt2(""),
    f"{_HF}.llama.modeling_llama.LlamaForCausalLM": _llama("model."),
    f"{_HF}.llama.modeling_llama.LlamaModel": _llama(""),
}


def preset_for(model: nn.Module) -> Declarations:
    """The declarations for the model's class (or a base class), empty for unknown classes."""
    for cls in type(model).__mro__:
        preset = PRESETS.get(f"{cls.__module__}.{cls.__qualname__}")
        if preset is not None:
            return preset
    return Declarations()
