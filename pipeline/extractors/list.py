"""List fields (tags): one element per list item, through the text encoder of `text`."""
from pipeline.extractors.text import ListConfig, TextHandler, cache_column, describe, prepare  # noqa: F401

CONFIG_CLASS = ListConfig
HANDLER_CLASS = TextHandler
