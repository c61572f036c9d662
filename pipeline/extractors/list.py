"""List fields (tags): one element per list item, through the text encoder of `text`."""
from pipeline.extractors.text import LIBRARIES, ListConfig, TextHandler, cache_column, describe, prepare  # noqa: F401

SOURCES = ("pipeline.extractors.list", "pipeline.extractors.text", "pipeline.extractors.base", "pipeline.records")
CONFIG_CLASS = ListConfig
HANDLER_CLASS = TextHandler
