"""What the models written here share of the contract (models/contract.py), and the helpers that act on
any model's classifier and layer groups."""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from imgcls.models.contract import problems


class ClassifierSurface:
    """forward, get_classifier and reset_classifier for a model whose classifier is `self.head`.

    Each model still defines forward_features, forward_head, num_features and group_matcher itself:
    those differ by architecture. reset_classifier makes a linear head (as timm's models do)."""

    head: nn.Module
    num_features: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()


def classifier_name(model: nn.Module) -> str:
    """Dotted name of the module `get_classifier()` returns ("head", "classifier", "head.fc")."""
    classifier = model.get_classifier()
    for name, module in model.named_modules():
        if module is classifier and name:
            return name
    raise ValueError(f"{type(model).__name__}.get_classifier() is not a submodule of the model")


def replace_classifier(model: nn.Module, new: nn.Module) -> None:
    model.set_submodule(classifier_name(model), new)


def mlp_head(in_features: int, num_classes: int, hidden: int = 256, dropout: float = 0.3) -> nn.Sequential:
    """The two-layer head for transfer learning: Linear, ReLU, Dropout, Linear."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes))


def layer_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Parameter names in groups from the input up: stem, each stage, ..., and the classifier last.

    The stages come from the model's `group_matcher(coarse=True)` (timm's convention, which our
    models follow too); the classifier always forms its own top group, named "head".
    """
    from timm.models import group_parameters

    if "no group_matcher" in problems(model):
        raise ValueError(f"{type(model).__name__} has no group_matcher; layer groups cannot be derived")
    head_prefix = classifier_name(model) + "."
    matcher = model.group_matcher(coarse=True)
    groups = []
    for names in group_parameters(model, matcher).values():
        body = [n for n in names if not n.startswith(head_prefix)]
        if body:
            groups.append((_group_name(body, matcher), body))
    groups.append(("head", [n for n, _ in model.named_parameters() if n.startswith(head_prefix)]))
    return groups


def _group_name(names: list[str], matcher: dict) -> str:
    """The text each name's matcher pattern matched ('layer2', 'blocks.6'), joined: 'blocks.6+conv_head+bn2'."""
    parts: list[str] = []
    for name in names:
        key = name.rsplit(".", 1)[0]  # unmatched (e.g. head.norm.weight): its module
        for spec in matcher.values():
            patterns = [spec] if isinstance(spec, str) else [pattern for pattern, _ in spec]
            found = next((m.group(0) for p in patterns if (m := re.match(p, name))), None)
            if found:
                key = found
                break
        if key not in parts:
            parts.append(key)
    return "+".join(parts)
