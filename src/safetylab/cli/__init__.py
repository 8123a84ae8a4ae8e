"""The ``safetylab`` command line: one thin file per subsystem, parsing options into configs and calling
the library or the subsystem's study; :mod:`.main` assembles them."""

from safetylab.cli.main import app, main

__all__ = ["app", "main"]
