"""Typed export errors: each names the component, the tensor, the shape point and what went wrong."""

from __future__ import annotations


class ExportError(RuntimeError):
    """Export or validation failed; nothing was written or published."""


class IONameError(ExportError):
    """The exported graph's inputs or outputs differ from the declaration."""


class ShapeError(ExportError):
    """A dimension or an output shape differs from the declaration."""


class ToleranceError(ExportError):
    """An output differs from PyTorch beyond the component's tolerance."""


class NonFiniteError(ExportError):
    """An output holds NaN or Inf."""


class ManifestError(ExportError):
    """An artifact folder whose manifest is missing, malformed or does not match its files."""
