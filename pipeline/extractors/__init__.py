"""One Beam ModelHandler per extractor kind; `pipeline.extract` loads the module of a modality's kind."""

KINDS = ("image", "faces", "ocr", "text", "list", "meta")


def module_for(kind: str) -> str:
    """The module implementing extractor `kind` (each defines HANDLER_CLASS and CONFIG_CLASS)."""
    if kind not in KINDS:
        # not list(KINDS): importing the submodule `list` makes `list` this package's attribute
        raise ValueError(f"unknown extractor kind {kind!r}; valid: {[*KINDS]}")
    return f"pipeline.extractors.{kind}"
