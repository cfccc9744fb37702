"""Renderers: the only package that imports rich. They format records; they compute nothing."""
