"""Mask-training recipes: how the real-valued masks start and how fast they move.

``paper`` is the paper's recipe exactly (every mask at 1e-2, threshold 5e-3, Adam 1e-4).
``default`` is the toolkit's default. Every pipeline reads its mask settings from here, so
``--recipe`` means the same in ``decathlon.train``, ``segmentation.train`` and
``classification.train``; flags given explicitly (``--mask-init``, ``--lr`` ...) override
the recipe's values.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

from .errors import UsageError

__all__ = ["Recipe", "RECIPES", "get_recipe", "DEFAULT_RECIPE"]


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    mask_init: str
    mask_scale: float
    mask_spread: float
    threshold: float
    mask_optimizer: str
    mask_lr: float

    def mask_options(self) -> Dict[str, object]:
        """Keyword arguments of ``common.masking.piggyback``."""
        return {"mask_init": self.mask_init, "mask_scale": self.mask_scale,
                "mask_spread": self.mask_spread, "threshold": self.threshold}

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


RECIPES: Dict[str, Recipe] = {r.name: r for r in (
    Recipe("paper", "the paper's recipe: every mask at 1e-2, threshold 5e-3, Adam 1e-4",
           mask_init="constant", mask_scale=1e-2, mask_spread=0.0, threshold=5e-3,
           mask_optimizer="adam", mask_lr=1e-4),
    Recipe("default", "masks spread uniformly by +-4e-3 around 1e-2, threshold 5e-3, Adam 1e-4",
           mask_init="spread", mask_scale=1e-2, mask_spread=4e-3, threshold=5e-3,
           mask_optimizer="adam", mask_lr=1e-4),
)}
DEFAULT_RECIPE = "default"


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise UsageError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
    return RECIPES[name]
