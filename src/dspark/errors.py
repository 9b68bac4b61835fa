"""The project's error type: bad user input or configuration, reported without a traceback."""


class DSparkError(ValueError):
    """A user or configuration error. The message names the bad value and the valid options."""
