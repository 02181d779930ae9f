"""German DistilBERT (bert-base-german-dbmdz-cased -> 6-layer DistilBERT).

    accelerate launch recipes/distilbert-german.py [--config FILE] [--key value ...]

Settings come from recipes/configs/distilbert-german.yaml; any of them can be overridden on the command line.
"""

from pathlib import Path

from distil_trainer.pipeline import main

if __name__ == "__main__":
    main(default_config=Path(__file__).resolve().parent / "configs" / "distilbert-german.yaml")
