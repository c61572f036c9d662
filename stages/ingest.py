"""DVC stage ingest: validate the raw dataset, write the canonical manifest, rejects and counts."""
from pipeline import runtime
from pipeline.stages import ingest

if __name__ == "__main__":
    runtime.run_main(ingest.main)
