"""DVC stage make_demo: generate the embedded demo dataset (the default input of the pipeline)."""
from pipeline import runtime
from pipeline.stages import make_demo

if __name__ == "__main__":
    runtime.run_main(make_demo.main)
