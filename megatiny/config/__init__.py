"""Configuration: the model (`model.py`), the run's parallel / train / data sections and their
validation (`run.py`), YAML and dotted-override parsing (`io.py`).

The names below are the package's public face: `from megatiny.config import ModelConfig`.
"""

from megatiny.config.io import ConfigError
from megatiny.config.model import ModelConfig
from megatiny.config.run import Config, DataConfig, ParallelConfig, TrainConfig, load_config

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "ParallelConfig",
    "TrainConfig",
    "load_config",
]
