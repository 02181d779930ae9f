"""Reading a teacher-output cache: the manifest, the integrity check of its shard files, and `TeacherCache`.

Layout: `<cache_dir>/teacher_cache.json` (the manifest, written last: its presence means the cache is complete) and
`<cache_dir>/epoch-<e>/shard-<nnnnn>/`, one `datasets.Dataset.save_to_disk` folder per shard (memory-mapped Arrow).
"""

from pathlib import Path

from ..data import cache
from .identity import (TeacherCacheDamaged, TeacherCacheMismatch, differing_fields, expected_identity,
                       mismatch_message)

FORMAT = 1
MANIFEST_FILE = "teacher_cache.json"
PARTIAL_SUFFIX = ".partial"
IDENTITY_FIELDS = ("teacher", "tokenizer", "data", "rows", "head", "positions", "top_k", "vocab_size", "dtype",
                   "hidden_layers", "masking", "epochs")
# load_teacher_cache(verify=...) -> data.cache.check_files(verify_checksums=...)
_VERIFY = {"changed": "changed", "full": True, "size": False}

# Below this share of the teacher's probability inside its stored top k (stats["topk_mass_mean"]), the renormalised
# target is much sharper than the teacher (a flat teacher: bench_teacher_cache.py's MiniLM head keeps 12% in its top 32).
LOW_TOPK_MASS = 0.5


def topk_coverage(stats, temperature=None):
    """(mean teacher probability inside the stored top k, the temperature it was measured at): at the training
    temperature the build was given when there is that figure (and it is `temperature`, if given), else at T = 1.
    Raising T flattens the teacher, so the mass at T > 1 is at most the mass at T = 1."""
    at_t = stats.get("topk_mass_temperature")
    if stats.get("topk_mass_mean_at_temperature") is not None and temperature in (None, at_t):
        return stats["topk_mass_mean_at_temperature"], at_t
    return stats.get("topk_mass_mean"), 1.0


def partial_dir(path):
    """Where a cache is built before it is moved to `path` (same parent, so the final rename is atomic)."""
    path = Path(path)
    return path.parent / (path.name + PARTIAL_SUFFIX)


def read_manifest(path):
    """The manifest dict of the cache at `path`, or None when there is no complete cache there."""
    manifest = cache.read_json(Path(path) / MANIFEST_FILE)
    if not isinstance(manifest, dict) or "identity" not in manifest or "epochs" not in manifest:
        return None
    return manifest


def shard_problems(path, manifest, verify="changed"):
    """Problems (strings naming the file) found comparing the shard files with the manifest."""
    if verify not in _VERIFY:
        raise ValueError(f"verify={verify!r}; use 'changed' (hash files whose size or time changed), 'full' (hash "
                         "every file) or 'size' (sizes only).")
    problems = []
    for epoch in manifest["epochs"]:
        for shard in epoch["shards"]:
            found = cache.check_files(Path(path) / shard["path"], shard["files"], _VERIFY[verify])
            problems += [f"{shard['path']}/{p}" for p in found]
    return problems


class TeacherCache:
    """A complete, checked teacher-output cache. `epoch(e)` is the dataset of masked copy `e` (one for non-MLM)."""

    def __init__(self, path, manifest):
        self.path = Path(path)
        self.manifest = manifest
        self.identity = manifest["identity"]
        self.stats = manifest.get("stats", {})

    @property
    def num_epochs(self):
        return len(self.manifest["epochs"])

    def epoch(self, e):
        import datasets

        if not 0 <= e < self.num_epochs:
            raise IndexError(f"The teacher cache {str(self.path)!r} holds epochs 0..{self.num_epochs - 1}, not {e}.")
        shards = self.manifest["epochs"][e]["shards"]
        parts = [datasets.load_from_disk(str(self.path / s["path"])) for s in shards]
        for shard, part in zip(shards, parts):
            if len(part) != shard["rows"]:
                raise TeacherCacheDamaged(f"{self.path / shard['path']} holds {len(part)} rows, {shard['rows']} were "
                                          "written. Rebuild the cache (--overwrite).")
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

    def train_dataset(self):
        """All cached epochs as one training dataset (epoch e of training reads masked copy e)."""
        from .epochs import CachedEpochsDataset  # the training side's class

        masked = self.identity.get("masking") is not None  # an MLM cache: one masked copy per epoch
        return CachedEpochsDataset([self.epoch(e) for e in range(self.num_epochs)], masked=masked)

    def __repr__(self):
        i = self.identity
        return (f"TeacherCache({str(self.path)!r}, head={i.get('head')}, rows={i.get('rows')}, top_k={i.get('top_k')}, "
                f"epochs={self.num_epochs})")


def check_expected(path, identity, expected):
    unknown = sorted(set(expected) - set(IDENTITY_FIELDS))
    if unknown:
        raise TypeError(f"Unknown teacher cache field(s) {unknown}; compare any of {', '.join(IDENTITY_FIELDS)}.")
    fields = differing_fields(identity, expected)
    if fields:
        raise TeacherCacheMismatch(mismatch_message(path, identity, expected, fields))


def load_teacher_cache(path, verify="changed", teacher=None, tokenizer=None, data=None, **settings):
    """Open the cache at `path`, refusing it when it is incomplete or damaged (`TeacherCacheDamaged`) or when it was
    computed from another `teacher` (model), `tokenizer`, `data` (dataset) or setting (`top_k=`, `positions=`,
    `dtype=`, `head=`, ...) than those given (`TeacherCacheMismatch` naming the field).

    `verify`: "changed" (default) checks every file's size and hashes those whose size or time changed since they
    were written; "full" hashes every file (also catches bit rot that kept the time); "size" checks sizes only.
    """
    if isinstance(path, TeacherCache):
        path = path.path
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        if partial_dir(path).is_dir():
            raise FileNotFoundError(f"The teacher cache {str(path)!r} is not complete (its build stopped; the finished "
                                    f"shards are in {str(partial_dir(path))!r}). Run the same cache-teacher command "
                                    "again to resume it.")
        raise FileNotFoundError(f"{str(path)!r} holds no teacher cache ({MANIFEST_FILE} is missing). Build one with "
                                "distil-trainer cache-teacher or build_teacher_cache().")
    if manifest.get("format") != FORMAT:
        raise TeacherCacheMismatch(f"The teacher cache {str(path)!r} has format {manifest.get('format')!r}; this "
                                   f"version reads format {FORMAT}. Rebuild it with --overwrite.")
    expected = expected_identity(teacher, tokenizer, data, **settings)
    check_expected(path, manifest["identity"], expected)
    problems = shard_problems(path, manifest, verify)
    if problems:
        raise TeacherCacheDamaged(f"The teacher cache {str(path)!r} is damaged: {'; '.join(problems)}. Rebuild it "
                                  "(the same cache-teacher command with --overwrite).")
    return TeacherCache(path, manifest)
