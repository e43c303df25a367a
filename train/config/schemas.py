"""Which schema each verb's config is checked against: the primary config
`configs/<verb>.yaml` names `<verb>_schema` first in its defaults list. torch-free."""

from __future__ import annotations

from data_prep.config import PrepConfig
from train.config.dpo import DpoConfig
from train.config.evaluation import EvalConfig, GenerateConfig
from train.config.sft import SftConfig
from train.config.tools import ExportConfig, ImportConfig, InfoConfig, PlotConfig, VerifyConfig
from train.config.train import TrainConfig

SCHEMAS: dict[str, type] = {
    "prep": PrepConfig,
    "train": TrainConfig,
    "sft": SftConfig,
    "dpo": DpoConfig,
    "eval": EvalConfig,
    "generate": GenerateConfig,
    "info": InfoConfig,
    "export": ExportConfig,
    "import": ImportConfig,
    "verify": VerifyConfig,
    "plot": PlotConfig,
}


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore, so that YAML files are checked against
    them."""
    from hydra.core.config_store import ConfigStore  # only composing a config needs Hydra

    store = ConfigStore.instance()
    for verb, schema in SCHEMAS.items():
        store.store(name=f"{verb}_schema", node=schema)
