"""DVC stage extract@<modality>: one Beam job turning the manifest into that modality's feature sets."""
from pipeline import runtime
from pipeline.stages import extract

if __name__ == "__main__":
    runtime.run_main(extract.main)
