"""DVC stage train: fit the set model on the extracted feature sets; write the bundle, metrics, curves."""
from pipeline import runtime
from pipeline.stages import train

if __name__ == "__main__":
    runtime.run_main(train.main)
