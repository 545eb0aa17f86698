"""Where shipped YAMLs live and the config class each must load as.

tests/test_config.py loads every YAML under these folders and tests/test_infra.py every one a
launch command names, so a new entry point with its own config folder registers it here. The
first entry that contains a file wins, so a file or subfolder goes before its folder.
"""

from janus_lab.data.config import IngestConfig
from janus_lab.sweeps.config import CfgSweepConfig, MaskingAblationConfig
from janus_lab.train.config import ExperimentConfig

CONFIG_DIRS: dict[str, type] = {
    "jobs/configs/ingest_sample.yaml": IngestConfig,
    "jobs/configs/ingest_mini.yaml": IngestConfig,
    "jobs/configs": ExperimentConfig,
    "sweeps/configs/cfg_debug.yaml": CfgSweepConfig,
    "sweeps/configs/cfg_janus4o_7b.yaml": CfgSweepConfig,
    "sweeps/configs/cfg_mini.yaml": CfgSweepConfig,
    "sweeps/configs": MaskingAblationConfig,
}
