"""DVC stage predict: predictions and per-modality importances of the trained bundle."""

from pipeline import runtime

runtime.quiet_imports()  # before the stage's libraries log while importing
from pipeline.stages import predict  # noqa: E402

if __name__ == "__main__":
    runtime.run_main(predict.main)
