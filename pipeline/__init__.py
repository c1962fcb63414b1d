"""A model-parallel pipeline trainer for local learning: every block trains on its own, concurrently."""

from pipeline.config import Config, ConfigError
from pipeline.sequential import SequentialTrainer

__all__ = ["Config", "ConfigError", "SequentialTrainer"]
