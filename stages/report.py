"""DVC stage report: the static HTML report of predictions and importances."""
from pipeline import runtime
from pipeline.stages import report

if __name__ == "__main__":
    runtime.run_main(report.main)
