"""Loaders: a file on disk (and an `arch`) to one :class:`LoadedModel`."""
