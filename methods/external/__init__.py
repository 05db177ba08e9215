"""``external``: evaluate CAMs, pseudo masks or predictions made by other code (see README.md)."""

from methods.external.method import External, ExternalConfig

__all__ = ["External", "ExternalConfig"]
