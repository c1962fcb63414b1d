"""A model-parallel pipeline trainer for local learning: every block trains on its own, concurrently."""

from pipeline.config import Config, ConfigError
from pipeline.sequential import SequentialTrainer
from pipeline.trained import TrainedNetwork, load

__all__ = ["Config", "ConfigError", "SequentialTrainer", "TrainedNetwork", "load"]
