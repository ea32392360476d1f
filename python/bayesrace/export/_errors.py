"""The one exception of export: a posterior or deployable that cannot be exported or read."""


class ExportError(ValueError):
    """A posterior that cannot (or must not) be exported; the message names the field."""
