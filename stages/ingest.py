"""DVC stage ingest: validate the raw dataset, write the canonical manifest, rejects and counts."""
from pipeline import ingest, runtime

if __name__ == "__main__":
    runtime.run_main(ingest.main)
