"""The one error type users see: it says where the problem is and what was expected."""

from __future__ import annotations


class SafetylabError(Exception):
    """A problem with the user's input, files or configuration.

    The command line prints the message alone (no traceback unless ``--debug``) and exits non-zero,
    so the message must name the file, line or field and what was expected there.
    """


class ConfigError(SafetylabError):
    """A config value outside what its field allows, raised when the config is built (before any run
    directory, model load or data pass). ``field`` names it, so a caller that knows the field under
    another name (a command-line option, a key in a file) can say it that way: :meth:`renamed`."""

    def __init__(self, field: str, expected: str, value: object):
        self.field, self.expected, self.value = field, expected, value
        super().__init__(f"{field}: expected {expected}, got {value!r}")

    def renamed(self, field: str) -> ConfigError:
        return ConfigError(field, self.expected, self.value)
