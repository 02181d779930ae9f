"""Teacher outputs computed once: an Arrow cache of a teacher's predictions that students and ablations reuse.

`build_teacher_cache` writes it (top-k logits + logsumexp for LM heads, full logits for task heads, optional hidden
states; one masked copy per epoch for MLM), `load_teacher_cache` opens and checks it. The training side
(`DistillationTrainer(teacher_cache=...)`) reads it through `TeacherCache.train_dataset()`.
"""

from .build import build_teacher_cache
from .identity import TeacherCacheDamaged, TeacherCacheMismatch
from .store import MANIFEST_FILE, TeacherCache, load_teacher_cache

__all__ = ["MANIFEST_FILE", "TeacherCache", "TeacherCacheDamaged", "TeacherCacheMismatch", "build_teacher_cache",
           "load_teacher_cache"]
