"""A model-parallel pipeline trainer for local learning: every block trains on its own, concurrently.

The public API: configure a run (Config), define a network (Network of BlockSpec / OutputSpec, each block with a
learning rule or a LocalHead of your own; or from_modules of a model one has), train it (train: sequentially or as K stages), load it back (load).
"""

from pipeline.config import Config, ConfigError
from pipeline.model.from_modules import from_modules
from pipeline.model.network import BlockSpec, Network, NetworkContext, OutputSpec
from pipeline.model.heads import LocalHead
from pipeline.model.rules import DFA, LearningRule, Pred, PredSim, Sim
from pipeline.sequential import SequentialTrainer
from pipeline.persistence.trained import TrainedNetwork, load
from pipeline.training import train

__all__ = ["BlockSpec", "Config", "ConfigError", "DFA", "LearningRule", "LocalHead", "Network", "NetworkContext",
           "OutputSpec", "Pred", "PredSim", "SequentialTrainer", "Sim", "TrainedNetwork", "from_modules", "load", "train"]
