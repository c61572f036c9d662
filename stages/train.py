"""DVC stage train: fit the set model on the extracted feature sets; write the bundle, metrics, curves."""

from pipeline import runtime

runtime.quiet_imports()  # before the stage's libraries log while importing
from pipeline.stages import train  # noqa: E402

if __name__ == "__main__":
    runtime.run_main(train.main)
