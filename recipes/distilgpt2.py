"""DistilGPT2 (gpt2 -> 6-layer GPT-2, causal-LM loss).

    accelerate launch recipes/distilgpt2.py [--config FILE] [--key value ...]

Settings come from recipes/configs/distilgpt2.yaml; any of them can be overridden on the command line.
"""

from pathlib import Path

from distil_trainer.pipeline import main

if __name__ == "__main__":
    main(default_config=Path(__file__).resolve().parent / "configs" / "distilgpt2.yaml")
