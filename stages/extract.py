"""DVC stage extract@<modality>: one Beam job turning the manifest into that modality's feature sets."""

from pipeline import runtime

runtime.quiet_imports()  # before the stage's libraries log while importing
from pipeline.stages import extract  # noqa: E402

if __name__ == "__main__":
    runtime.run_main(extract.main)
