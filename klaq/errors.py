"""One exception type for every error a user can cause.

The CLI turns a :class:`KlaqError` into a one-line message and its exit code; anything else is a
bug and is reported as such (with the traceback only under ``KLAQ_DEBUG=1``).
"""


class KlaqError(Exception):
    """A user-facing error: bad input, missing file, package that cannot fit, parity lost."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
