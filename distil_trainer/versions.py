"""The oldest library versions the code works with, checked when `distil_trainer` is imported.

Each floor is set by an API the code relies on (setup.cfg's install_requires carries the same numbers;
tests/test_versions.py checks that they agree). Versions are read from the installed package metadata, which
costs nothing, so the check does not import the libraries themselves.
"""

from importlib import metadata

# package -> (oldest version, what needs it)
MINIMUM_VERSIONS = {
    "transformers": ("5.19", "Trainer.loss_is_scaled_for_ga; older Trainers divide the already-averaged loss by "
                             "the accumulation steps again, so gradients come out 1/gradient_accumulation_steps "
                             "too small"),
    "accelerate": ("1.6", "FSDP2 (fsdp_version: 2 in accelerate_configs/fsdp.yaml)"),
    "datasets": ("4.0", "the datasets.List feature type of binarized data"),
}
# Optional (the `deepspeed` extra): not checked at import, since an unused old copy must not block the package;
# transformers' DeepSpeed integration checks this same floor when a run enables DeepSpeed. The teacher engine
# uses only deepspeed.initialize(model=, config=) and zero_optimization_stage(), both older than that floor.
OPTIONAL_MINIMUM_VERSIONS = {"deepspeed": ("0.9.3", "transformers' DeepSpeed integration")}


def installed_version(package):
    """The installed version string of `package`, or None when it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _release(version_string):
    """(major, minor, ...) of a version string; pre-releases of a floor count as that release (a main-branch
    build of transformers 5.19.0.dev0 is accepted)."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version_string).release
    except InvalidVersion:
        return None


def version_problem(package, installed, floor, reason):
    """A one-line message when `installed` is older than `floor`, else None."""
    release = _release(installed)
    if release is None or release >= _release(floor):
        return None  # an unparseable (local) version is given the benefit of the doubt
    return (f"distil_trainer needs {package}>={floor} ({reason}); {package} {installed} is installed. "
            f"Upgrade it: pip install -U '{package}>={floor}'")


def check_versions(minimums=None):
    """Raise ImportError naming the first installed package older than its floor."""
    for package, (floor, reason) in (minimums or MINIMUM_VERSIONS).items():
        installed = installed_version(package)
        if installed is None:
            continue  # not installed: importing it fails later with Python's own clear message
        problem = version_problem(package, installed, floor, reason)
        if problem:
            raise ImportError(problem)
