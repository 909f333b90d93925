"""PASA: Precision-Allocated Sparse Attention for video diffusion transformers.

Core (torch only): :class:`PASAConfig`, :func:`sparse_attention`, :func:`plan_blocks`.
diffusers integration (``pip install 'pasa[diffusers]'``): :func:`apply`, :func:`remove`,
:func:`last_report`, imported on first use so that the core needs no diffusers.
"""

from typing import Any

from pasa.attention import FiniteChecks, plan_blocks, sparse_attention
from pasa.budget import make_budget
from pasa.config import PASAConfig
from pasa.layout import TokenLayout, make_layout
from pasa.plan import BlockPlan
from pasa.profile import BudgetProfile

__version__ = "0.1.0"

_DIFFUSERS_NAMES = ("GenerationReport", "apply", "last_report", "remove")

__all__ = [
    "BlockPlan",
    "BudgetProfile",
    "FiniteChecks",
    "PASAConfig",
    "TokenLayout",
    "make_budget",
    "make_layout",
    "plan_blocks",
    "sparse_attention",
    *_DIFFUSERS_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _DIFFUSERS_NAMES:
        try:
            from pasa.integrations import diffusers as integration
        except ImportError as e:
            raise ImportError(
                f"pasa.{name} needs diffusers: pip install 'pasa[diffusers]' ({e})"
            ) from e
        return getattr(integration, name)
    raise AttributeError(f"module 'pasa' has no attribute {name!r}")
