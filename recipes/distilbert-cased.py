"""DistilBERT, cased (bert-base-cased -> 6-layer DistilBERT).

    accelerate launch recipes/distilbert-cased.py [--config FILE] [--key value ...]

Settings come from recipes/configs/distilbert-cased.yaml; any of them can be overridden on the command line.
"""

from pathlib import Path

from distil_trainer.pipeline import main

if __name__ == "__main__":
    main(default_config=Path(__file__).resolve().parent / "configs" / "distilbert-cased.yaml")
