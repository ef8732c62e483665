"""How many trials to pack: enough that one step's arithmetic outweighs the step's fixed cost, within memory.

A pack pays its per-step fixed cost (Python, dispatch, kernel launches, the optimizer's op count) once for
all members; past the size where the pack's arithmetic dominates, a larger pack only adds memory.
"""

from __future__ import annotations

import os

import torch

from scaletune.models.size import count_params
from scaletune.runner import TrialConfig, prepare_trial
from scaletune.train import resolve_device

# Training FLOPs per pack step at which a larger pack stops paying, per device type: about what the device does
# in the fixed per-step time of a pack. CPU: from bench/packs.py (docs/benchmarks.md, "Proxy packs"). CUDA: not
# measured in this project (no GPU at hand); set from a 5 ms fixed step on a device sustaining ~50 TFLOP/s.
SATURATION_FLOPS: dict[str, float] = {"cpu": 3e8, "cuda": 2.5e11}
MAX_PACK: dict[str, int] = {"cpu": 32, "cuda": 256}
BYTES_PER_PARAM = 40  # float32 parameter, gradient, two Adam moments, eps, update temporaries, stacking copy
MEMORY_FRACTION = 0.25  # of the free memory; activations come on top of the per-parameter state


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now (host RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_pack_size(params: int, flops_per_step: float, device: str | torch.device | None = None) -> int:
    """The pack size for members of ``params`` parameters whose training step costs ``flops_per_step``."""
    dev = resolve_device(device)
    kind = "cuda" if dev.type == "cuda" else "cpu"
    by_compute = int(SATURATION_FLOPS[kind] // max(flops_per_step, 1.0))
    by_memory = int(MEMORY_FRACTION * free_memory(dev) // max(params * BYTES_PER_PARAM, 1))
    return max(1, min(MAX_PACK[kind], by_compute, by_memory))


def pack_size_for(cfg: TrialConfig, data_root: str | None = None) -> int:
    """``auto_pack_size`` for trials of this configuration (counted on the meta device, nothing allocated)."""
    prepared = prepare_trial(cfg, data_root)
    return auto_pack_size(count_params(prepared.factory, cfg.shape),
                          prepared.flops_per_sample * cfg.budget.batch_size, prepared.device)
