"""The error every check of user input raises: one line on stderr, exit code 2, before any process starts."""


class ConfigError(ValueError):
    """Bad user input: reported as one line, exit code 2, before any process starts."""
