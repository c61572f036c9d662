"""Extractor kinds: one `Extractor` subclass each, registered by name (pipeline.extractors.base).

The built-in kinds register when this package is imported; a third-party kind registers with
`@register` in its own module, or through the entry-point group `dmms.extractors` of its package.
"""

from pipeline.extractors import faces, image, meta, ocr, text  # noqa: F401  (registers the built-in kinds)
from pipeline.extractors.base import REGISTRY, Extractor, get, kinds, register

__all__ = ["REGISTRY", "Extractor", "get", "kinds", "register"]
