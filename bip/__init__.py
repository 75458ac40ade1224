"""bip: BiP (bi-level optimization pruning, NeurIPS 2022) and its baselines, one training loop."""
from bip.config import Config, load_config
from bip.errors import BipError

__all__ = ["BipError", "Config", "load_config"]
__version__ = "0.1.0"
