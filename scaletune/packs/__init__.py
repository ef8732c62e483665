"""Packs: many same-shape trials trained as one batched computation (stacked parameters, vmap)."""

from scaletune.packs.auto import auto_pack_size, pack_size_for
from scaletune.packs.runner import pack_key, run_pack
from scaletune.packs.train import PackMember, train_pack

__all__ = ["PackMember", "auto_pack_size", "pack_key", "pack_size_for", "run_pack", "train_pack"]
