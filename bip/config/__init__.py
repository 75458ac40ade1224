"""The run configuration: its schema (typed frozen sections), how it loads (YAML, flags,
``section.key=value``), the command line, the run identity (ids, folder layout, file names) and
the names that become paths. The package exports the schema and the loaders; identity and names
are imported as modules (``from bip.config import identity``)."""
from bip.config.cli import OneLineParser, argument_parser, config_from_argv
from bip.config.load import load_config, read_yaml
from bip.config.schema import (LAYER_TYPES, METHODS, SCORE_INITS, SECTIONS, STAGES, BipConfig, Config, DataConfig,
                               ModelConfig, OptimConfig, PruneConfig, RunConfig, TrainConfig, build_config,
                               valid_keys)

__all__ = ["BipConfig", "Config", "DataConfig", "LAYER_TYPES", "METHODS", "ModelConfig", "OneLineParser",
           "OptimConfig", "PruneConfig", "RunConfig", "SCORE_INITS", "SECTIONS", "STAGES", "TrainConfig",
           "argument_parser", "build_config", "config_from_argv", "load_config", "read_yaml", "valid_keys"]
