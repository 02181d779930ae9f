"""Student of the teacher's own architecture (BERT->BERT, RoBERTa->RoBERTa, GPT-2->GPT-2, Llama-style decoders).

Everything outside the block stack (embeddings, final norm, heads) is copied by name; block ``i`` of the teacher
becomes block ``layers.index(i)`` of the student with its whole state dict.
"""

from .blocks import find_blocks, shallow_config
from .copying import load_into_student
from .report import ExtractionReport


def _student_name(teacher_name, blocks_prefix, new_index):
    """Teacher tensor name -> student name (None for a block that is dropped)."""
    if not teacher_name.startswith(blocks_prefix):
        return teacher_name
    index, rest = teacher_name[len(blocks_prefix):].split(".", 1)
    new = new_index.get(int(index))
    return None if new is None else f"{blocks_prefix}{new}.{rest}"


def extract_same_architecture(teacher, layers, overrides=None, teacher_missing_keys=()):
    """(student, report): a ``type(teacher)`` model with the selected blocks and everything else copied."""
    blocks_name, _ = find_blocks(teacher)
    config = shallow_config(teacher.config, layers, overrides)
    student = type(teacher)._from_config(
        config, attn_implementation=teacher.config._attn_implementation, dtype=teacher.dtype
    )
    blocks_prefix = blocks_name + "."
    new_index = {old: new for new, old in enumerate(layers)}
    missing = set(teacher_missing_keys)
    tensors, copied, random_keys = {}, {}, []
    for name, tensor in teacher.state_dict().items():
        target = _student_name(name, blocks_prefix, new_index)
        if target is None:
            continue
        if name in missing:  # the teacher's own value is a random init (absent from its checkpoint)
            random_keys.append(target)
            continue
        tensors[target] = tensor
        copied[target] = name
    load_into_student(student, tensors, random_keys)
    student.eval()
    report = ExtractionReport(
        teacher="", teacher_layers=list(layers), strategy=None, student_type="same",
        copied=copied, randomly_initialised=sorted(random_keys),
    )
    return student, report
