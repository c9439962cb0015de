"""The exporter's configuration: typed, validated, loaded once at start.

``load_config(path)`` reads the YAML file, substitutes ``${VAR}``s, validates
every key, reads the ``*_file`` secrets and loads private keys, and returns a
frozen ``Config``. Any problem raises ``ConfigError`` with one line per problem
naming the field path; no message ever contains a secret.
"""

from exporter.config.errors import ConfigError
from exporter.config.loader import load_config, parse_config
from exporter.config.models import (
    AccountConfig,
    AssetFilter,
    BinanceSettings,
    BudgetSettings,
    CollectSettings,
    Config,
    PricesSettings,
    StreamSettings,
)
from exporter.config.secrets import PrivateKey

__all__ = [
    "AccountConfig",
    "AssetFilter",
    "BinanceSettings",
    "BudgetSettings",
    "CollectSettings",
    "Config",
    "ConfigError",
    "PricesSettings",
    "PrivateKey",
    "StreamSettings",
    "load_config",
    "parse_config",
]
