"""The one error type users see: it says where the problem is and what was expected."""


class SafetylabError(Exception):
    """A problem with the user's input, files or configuration.

    The command line prints the message alone (no traceback unless ``--debug``) and exits non-zero,
    so the message must name the file, line or field and what was expected there.
    """
