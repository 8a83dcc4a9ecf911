"""Errors an operator sees. Each carries one clear sentence naming what is wrong."""


class GeomirrorError(Exception):
    """Base class: the message is shown to the operator as is."""


class ConfigError(GeomirrorError):
    """A config file is wrong; the message names the file, the key and the problem."""

    def __init__(self, path, key: str | None, problem: str):
        self.path = str(path)
        self.key = key
        self.problem = problem
        where = f"{self.path}: {key}" if key else self.path
        super().__init__(f"{where}: {problem}")


class LabError(GeomirrorError):
    """The lab cannot be built or driven."""


class ImageError(GeomirrorError):
    """The guest image cannot be built."""
