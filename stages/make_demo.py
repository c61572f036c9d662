"""DVC stage make_demo: generate the embedded demo dataset (the default input of the pipeline)."""

from pipeline import runtime

runtime.quiet_imports()  # before the stage's libraries log while importing
from pipeline.stages import make_demo  # noqa: E402

if __name__ == "__main__":
    runtime.run_main(make_demo.main)
