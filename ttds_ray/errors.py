"""The project's error hierarchy: every error ttds-ray raises on bad input derives from :class:`TTDSError`.

Catch ``TTDSError`` to handle any refusal of the library (bad config, bad data, missing artifact,
unavailable model) in one place; the CLI turns it into one ``error:`` line and exit code 2.
Each subclass also keeps the builtin base that describes it (``ValueError``, ``FileNotFoundError``,
``RuntimeError``), so code that caught those before still works.
"""
from __future__ import annotations


class TTDSError(Exception):
    """Base class of every error ttds-ray raises on purpose; the message names the key/file and the fix."""


class ConfigError(TTDSError, ValueError):
    """A config file or override is invalid; the message names every bad key/value and the fix."""


class DataError(TTDSError, ValueError):
    """A dataset file is missing, malformed or empty after filtering; the message names the file."""


class ArtifactError(TTDSError, FileNotFoundError):
    """A run directory lacks an artifact or holds one that does not match its manifest."""


class StageMissing(ArtifactError):
    """A stage's inputs are not in the run directory; the message says which command makes them."""


class BackboneUnavailable(TTDSError, RuntimeError):
    """The LLM backbone cannot be loaded offline."""


class EncoderUnavailable(TTDSError, RuntimeError):
    """The sentence encoder cannot be loaded offline."""


class CollisionError(TTDSError, ValueError):
    """Semantic IDs cannot be made unique (ID space or a prefix too small for the catalogue)."""


class UnknownIdError(TTDSError, KeyError):
    """A request names user or item ids the run does not know; ``.ids`` lists them."""

    def __init__(self, kind: str, ids: list):
        self.kind, self.ids = kind, list(ids)
        super().__init__(f"unknown {kind} id(s): {', '.join(map(str, self.ids[:20]))}"
                         + (f" (+{len(self.ids) - 20} more)" if len(self.ids) > 20 else ""))

    def __str__(self) -> str:          # KeyError would repr() the message
        return self.args[0]
