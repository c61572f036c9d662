"""DVC stage report: the static HTML report of predictions and importances."""

from pipeline import runtime

runtime.quiet_imports()  # before the stage's libraries log while importing
from pipeline.stages import report  # noqa: E402

if __name__ == "__main__":
    runtime.run_main(report.main)
