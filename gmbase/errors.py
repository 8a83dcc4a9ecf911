"""The one error root. Every typed error of the product derives from it; its message is
one sentence shown to the operator as is (the CLI prints it and exits non-zero)."""


class GeomirrorError(Exception):
    """Base class: the message is shown to the operator as is."""
