"""trl-bapo: Batch Adaptation Policy Optimization for TRL's GRPOTrainer."""

from trl_bapo.config import BAPOConfig
from trl_bapo.trainer import BAPOTrainer

__all__ = ["BAPOConfig", "BAPOTrainer"]
__version__ = "0.6.0"
