"""DistilRoBERTa (roberta-base -> 6-layer RoBERTa).

    accelerate launch recipes/distilroberta.py [--config FILE] [--key value ...]

Settings come from recipes/configs/distilroberta.yaml; any of them can be overridden on the command line.
"""

from pathlib import Path

from distil_trainer.pipeline import main

if __name__ == "__main__":
    main(default_config=Path(__file__).resolve().parent / "configs" / "distilroberta.yaml")
