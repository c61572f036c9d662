"""DVC stage predict: predictions and per-modality importances of the trained bundle."""
from pipeline import runtime
from pipeline.stages import predict

if __name__ == "__main__":
    runtime.run_main(predict.main)
