"""User-facing errors. Each carries one paragraph that names the file, field or value at
fault and what was expected; the CLI prints it without a traceback."""

from __future__ import annotations

import difflib
from typing import Iterable


class WsssError(Exception):
    """Base of every error the CLI reports as a clean message (exit code 2)."""


class ConfigError(WsssError):
    """Bad method / dataset / suite name, override key or value."""


class DataError(WsssError):
    """Missing or malformed data: roots, list files, images, masks, annotations."""


class TrackingError(WsssError):
    """The MLflow tracking store or server cannot be used."""


class ResultsError(WsssError):
    """The results directory cannot be written or holds something unexpected."""


def suggest(value: str, choices: Iterable[str]) -> str:
    """' Did you mean "x"?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.5)
    return f' Did you mean "{close[0]}"?' if close else ""


def unknown(kind: str, value: str, choices: Iterable[str]) -> ConfigError:
    """ConfigError for an unknown name, listing the valid ones and the closest."""
    choices = sorted(choices)
    return ConfigError(
        f'Unknown {kind} "{value}".{suggest(value, choices)} Valid {kind}s: {", ".join(choices) or "(none)"}.'
    )
