"""PASA: Precision-Allocated Sparse Attention for video diffusion transformers."""

from pasa.attention import plan_blocks, sparse_attention
from pasa.budget import make_budget
from pasa.config import PASAConfig
from pasa.layout import TokenLayout, make_layout
from pasa.plan import BlockPlan
from pasa.profile import BudgetProfile

__version__ = "0.1.0"

__all__ = [
    "BlockPlan",
    "BudgetProfile",
    "PASAConfig",
    "TokenLayout",
    "make_budget",
    "make_layout",
    "plan_blocks",
    "sparse_attention",
]
