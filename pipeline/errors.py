"""The error every check of user input raises: one line on stderr, exit code 2, before any process starts."""


class ConfigError(ValueError):
    """Bad user input: reported as one line, exit code 2, before any process starts."""


class AgreedError(ConfigError):
    """A ConfigError that every rank raises alike, decided on facts gathered from all of them (the backend, the
    network's structure, the hosts): stage 0 reports it, the others leave with the same exit code silently."""
