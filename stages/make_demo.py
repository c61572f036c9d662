"""DVC stage make_demo: generate the embedded demo dataset (the default input of the pipeline)."""
from pipeline import demo, runtime

if __name__ == "__main__":
    runtime.run_main(demo.main)
