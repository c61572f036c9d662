"""DVC stage score: batch-score the folder params score.input names with the trained bundle."""

from pipeline import runtime

runtime.quiet_imports()  # before the stage's libraries log while importing
from pipeline.stages import score  # noqa: E402

if __name__ == "__main__":
    runtime.run_main(score.main)
