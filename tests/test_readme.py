"""The README's usage example runs as written once its model names point at local models."""

import re
from pathlib import Path

import tiny

README = Path(__file__).resolve().parents[1] / "README.md"


def usage_example():
    text = README.read_text()
    block = re.search(r"<!-- usage-example.*?-->\s*```python\n(.*?)```\s*<!-- /usage-example -->", text, re.S)
    assert block, "README.md lost its usage example block"
    return block.group(1)


def test_readme_usage_example_runs(tmp_path, monkeypatch):
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    tiny.tiny_bert_mlm().save_pretrained(teacher_dir)
    tiny.bert_tokenizer().save_pretrained(teacher_dir)
    tiny.tiny_distilbert_mlm().save_pretrained(student_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(tiny.real_lines(40)) + "\n")

    code = usage_example()
    for name, local in (('"bert-base-uncased"', teacher_dir), ('"distilbert-base-uncased"', student_dir),
                        ('"corpus.txt"', corpus)):
        assert name in code
        code = code.replace(name, repr(str(local)))
    monkeypatch.chdir(tmp_path)  # output_dir="distilled-student" lands here
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)

    out = tmp_path / "distilled-student"
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert namespace["trainer"].state.global_step == 9  # 40 lines, batch 16, 3 epochs
