"""DVC stage ingest: validate the raw dataset, write the canonical manifest, rejects and counts."""

from pipeline import runtime

runtime.quiet_imports()  # before the stage's libraries log while importing
from pipeline.stages import ingest  # noqa: E402

if __name__ == "__main__":
    runtime.run_main(ingest.main)
