"""Model families: built-ins (mlp, resnet, vit, gpt) and plugins, looked up by name."""

from scaletune.models.registry import family_names, get_family

__all__ = ["family_names", "get_family"]
