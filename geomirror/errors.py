"""Errors an operator sees. Each carries one clear sentence naming what is wrong.

The root, `GeomirrorError`, lives in `gmbase` so that `replication` and `bgp` derive
their errors from it too without importing `geomirror`."""

from gmbase.errors import GeomirrorError

__all__ = ["GeomirrorError", "ConfigError", "ImageError", "Refused"]


class ConfigError(GeomirrorError):
    """A config file is wrong; the message names the file, the key and the problem."""

    def __init__(self, path, key: str | None, problem: str):
        self.path = str(path)
        self.key = key
        self.problem = problem
        where = f"{self.path}: {key}" if key else self.path
        super().__init__(f"{where}: {problem}")


class Refused(GeomirrorError):
    """An operator command refused in the site's present state (the control API answers 409)."""


class ImageError(GeomirrorError):
    """The guest image cannot be built."""
