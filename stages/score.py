"""DVC stage score: batch-score the folder params score.input names with the trained bundle."""
from pipeline import runtime
from pipeline.stages import score

if __name__ == "__main__":
    runtime.run_main(score.main)
