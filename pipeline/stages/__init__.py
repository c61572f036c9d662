"""The pipeline's stages, one module each, in the order data flows: make_demo, ingest, extract, train,
predict, report, score."""
