"""Errors in what a request asks for, answered by service/errors.py: wrong content (422) and unknown items (404)."""

from __future__ import annotations


class InputError(ValueError):
    """A request whose content is wrong (unknown modality, wrong dimension, ...): HTTP 422."""


class NotFound(KeyError):
    """An unknown item: HTTP 404."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"
