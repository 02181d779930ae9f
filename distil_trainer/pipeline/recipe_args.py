"""Recipe configuration: YAML files with command-line overrides, parsed into dataclasses by `HfArgumentParser`.

A recipe's YAML sets defaults; `--key value` on the command line wins. Unknown keys, wrong types and missing
required fields are reported in one line naming the key (and, for a typo, the closest valid key).
"""

import dataclasses
import difflib
import os
import re
import sys
from dataclasses import dataclass, field

from ..distillation_config import DistillationArguments


@dataclass
class ModelArguments:
    teacher_name: str = field(metadata={"help": "Teacher: Hub name, local path (e.g. bert-base-uncased) or GGUF file "
                                                "(path/model.gguf or folder_or_repo::model.gguf)."})
    teacher_revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    student_type: str = field(default="same", metadata={"help": "'same' (teacher's architecture, fewer layers) or "
                                                                "'distilbert' (BERT teacher -> DistilBERT)."})
    student_layers: str | None = field(default=None, metadata={"help": "Teacher layers to copy, e.g. '0,2,4,7,9,11'."})
    layer_strategy: str | None = field(default=None, metadata={
        "help": "every_other, uniform, first or last; or measured on calibration text: block_influence (drop the "
                "layers whose output is closest to their input) or angular (drop the contiguous run of layers whose "
                "input and output are closest)."})
    student_num_layers: int | None = field(default=None, metadata={"help": "k for the layer strategy."})
    calibration_file: str | None = field(default=None, metadata={
        "help": "Text the measured strategies and width pruning run the teacher on (plain text, one sequence per "
                "line, or a distil-trainer binarize folder); default: the run's training data."})
    calibration_tokens: int = field(default=4096, metadata={"help": "Calibration tokens (from the start)."})
    keep_ends: bool | None = field(default=None, metadata={
        "help": "Measured strategies: keep the teacher's first and last layers (default true)."})
    iterative: bool = field(default=False, metadata={
        "help": "block_influence: drop one layer at a time, measuring the remaining layers again."})
    student_hidden_size: int | None = field(default=None, metadata={
        "help": "Width pruning: hidden channels kept (activation importance at the norm layers, Minitron)."})
    student_num_attention_heads: int | None = field(default=None, metadata={
        "help": "Width pruning: attention heads kept per layer (whole key-value groups under GQA)."})
    student_intermediate_size: int | None = field(default=None, metadata={
        "help": "Width pruning: MLP neurons kept per layer."})
    student_reference_config: str | None = field(
        default=None, metadata={"help": "JSON of the original Distil* student config; the extracted student must "
                                        "match its sizes (checked before training)."})
    student_init: str = field(
        default="teacher_layers", metadata={"help": "'teacher_layers' (copy the chosen teacher layers) or 'random' "
                                                    "(same architecture, weights re-initialised: the paper's "
                                                    "random-initialisation ablation).",
                                            "choices": ["teacher_layers", "random"]})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Defaults to the teacher's tokenizer."})
    distillation_objective: str = field(
        default="auto", metadata={"help": "'embedding' (the teacher's sentence embeddings, alpha_embed; no MLM head "
                                          "fitted), 'logits' (the triple loss of the configuration) or 'auto': "
                                          "embedding for a sentence-embedding teacher (a sentence-transformers folder, "
                                          "or a checkpoint without an LM head), logits otherwise.",
                                  "choices": ["auto", "embedding", "logits"]})
    fit_teacher_mlm_head_steps: int = field(
        default=0, metadata={"help": "For a teacher without an MLM head: fit the head on the corpus, body frozen, for "
                                     "at most this many updates (early stopping; cached) before distilling. 0 = off."})
    fit_teacher_mlm_head_decoder: str = field(
        default="tied", metadata={"help": "'tied' (decoder = the frozen word embeddings) or 'untied' (a decoder of its "
                                          "own, initialised from them and trained).", "choices": ["tied", "untied"]})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the Hub (off)."})


@dataclass
class DataArguments:
    file_path: str | None = field(default=None, metadata={"help": "Text file (one sequence per line) or folder."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset name (instead of file_path)."})
    binarized_data: str | None = field(default=None, metadata={
        "help": "Folder made by `distil-trainer binarize` (instead of file_path or dataset_name), used as is; its "
                "tokenizer must be the teacher's. A file_path that is such a folder is used the same way."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    dataset_split: str = field(default="train", metadata={"help": "Hub dataset split."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    streaming: bool = field(default=False, metadata={"help": "Stream the Hub dataset (corpora larger than disk)."})
    data_cache_dir: str | None = field(default=None, metadata={"help": "Where binarized data and token counts go "
                                                                       "(default: <output_dir>/data)."})
    max_length: int | None = field(default=None, metadata={"help": "Sequence length (default: the model maximum)."})
    min_length: int = field(default=12, metadata={"help": "Sequences of fewer tokens (begin and end included) are "
                                                          "dropped (12: DistilBERT's rule)."})
    num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    pack: int | None = field(default=None, metadata={"help": "Pack sequences into blocks of this size (causal LM)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N sequences."})
    mlm_mask_prop: float = field(default=0.15, metadata={"help": "Share of real tokens chosen per batch."})
    word_mask: float = field(default=0.8, metadata={"help": "Of the chosen: share replaced by the mask token."})
    word_keep: float = field(default=0.1, metadata={"help": "Of the chosen: share left unchanged."})
    word_rand: float = field(default=0.1, metadata={"help": "Of the chosen: share replaced by a random token."})
    mlm_smoothing: float = field(default=0.7, metadata={"help": "Masking probability ~ count^-smoothing (0: uniform)."})


@dataclass
class RecipeArguments:
    config: str | None = field(default=None, metadata={"help": "YAML file with the recipe's settings."})
    report: bool = field(default=False, metadata={"help": "Write report.md with a loss curve, parameter counts and "
                                                          "measured CPU inference speed."})
    onnx_latency: bool = field(default=False, metadata={
        "help": "Export teacher and student to ONNX (fp32 and int8, under output_dir/onnx) and measure their CPU "
                "latency in PyTorch and ONNX Runtime side by side, for report.md and the card (needs the export "
                "extra)."})
    card_model_name: str | None = field(default=None, metadata={"help": "Student name shown in the model card "
                                                                        "(default: hub_model_id or output_dir)."})
    teacher_card_name: str | None = field(default=None, metadata={"help": "Teacher name shown in the model card "
                                                                          "(default: teacher_name)."})
    score: bool = field(default=False, metadata={"help": "Score teacher, extracted and distilled student (masked-LM "
                                                         "teachers): STS-B Spearman of mean-pooled embeddings and "
                                                         "fidelity on heldout_file; into report.md and the card."})
    stsb_file: str | None = field(default=None, metadata={"help": "GLUE STS-B dev.tsv for --score (default: the Hub's "
                                                                  "nyu-mll/glue stsb validation split)."})
    heldout_file: str | None = field(default=None, metadata={"help": "Text (one sequence per line) the run does NOT "
                                                                     "train on, for --score's fidelity figures."})
    teacher_cache: str | None = field(default=None, metadata={
        "help": "Folder of a teacher-output cache: the teacher runs once over the training data (its outputs at the "
                "positions and hidden layer the losses read, one masked copy per epoch) and distillation reads them "
                "instead of running it. Runs with the same teacher, data and settings reuse the folder. Off by "
                "default."})
    teacher_cache_top_k: int = field(default=64, metadata={
        "help": "With teacher_cache: the teacher's k largest logits stored per position (0: the whole vocabulary)."})
    teacher_cache_dtype: str = field(default="float16", metadata={
        "help": "With teacher_cache: precision of the stored logits and hidden states.",
        "choices": ["float16", "float32"]})


ARGUMENT_CLASSES = (ModelArguments, DataArguments, DistillationArguments, RecipeArguments)


class ConfigError(ValueError):
    """A bad recipe configuration; its message is one line naming the key and the fix."""


def _field_types():
    types = {}
    for cls in ARGUMENT_CLASSES:
        for f in dataclasses.fields(cls):
            if f.init:
                types[f.name] = f
    return types


def _yaml_to_argv(path):
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist; pass an existing YAML with --config.")
    with open(path, encoding="utf-8") as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of settings (key: value), not a {type(values).__name__}.")
    known = _field_types()
    argv = []
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "; see --help for the valid keys."
            raise ConfigError(f"{path}: unknown key '{key}'{hint}")
        if value is None:
            continue
        if isinstance(value, bool):
            argv += [f"--{key}", str(value)]
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", *[str(v) for v in value]]
        elif isinstance(value, dict):
            import json

            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def _drop(argv, keys):
    """`argv` (pairs of --key value from a YAML) without the given keys."""
    out, skip = [], False
    for arg in argv:
        if skip and not arg.startswith("--"):
            continue
        skip = arg.startswith("--") and arg[2:] in keys
        if not skip:
            out.append(arg)
    return out


def _config_path(argv):
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


class _OneLineErrors:
    """Turn argparse's usage dump + exit into a one-line ConfigError naming the key (and the YAML it came from)."""

    def __init__(self, parser, config, yaml_keys):
        self.parser, self.config, self.yaml_keys = parser, config, yaml_keys

    def __enter__(self):
        def fail(message):
            match = re.match(r"argument --(\w+)(?:/--[\w-]+)?: (.*)", message)
            if match:
                key, reason = match.groups()
                where = f"{self.config}: " if key in self.yaml_keys else ""
                message = f"{where}{key}: {reason}"
            raise ConfigError(message)

        self._old = self.parser.error
        self.parser.error = fail
        return self

    def __exit__(self, *exc):
        self.parser.error = self._old
        return False


def parse_recipe_args(argv=None, default_config=None):
    """(model_args, data_args, training_args, recipe_args) from the YAML (--config or `default_config`) and argv."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    config = _config_path(argv) or default_config
    yaml_argv = _yaml_to_argv(config) if config else []
    # A corpus given on the command line replaces the recipe's corpus, whichever kind the YAML names.
    cli_keys = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    if "file_path" in cli_keys and "dataset_name" not in cli_keys:
        yaml_argv = _drop(yaml_argv, ("dataset_name", "dataset_config", "binarized_data"))
    if "dataset_name" in cli_keys and "file_path" not in cli_keys:
        yaml_argv = _drop(yaml_argv, ("file_path", "binarized_data"))
    if "binarized_data" in cli_keys and not cli_keys & {"file_path", "dataset_name"}:
        yaml_argv = _drop(yaml_argv, ("file_path", "dataset_name", "dataset_config"))
    # Likewise the student's layers: an explicit list replaces the recipe's strategy, and a strategy its list.
    if "student_layers" in cli_keys and not cli_keys & {"layer_strategy", "student_num_layers"}:
        yaml_argv = _drop(yaml_argv, ("layer_strategy", "student_num_layers"))
    if "layer_strategy" in cli_keys and "student_layers" not in cli_keys:
        yaml_argv = _drop(yaml_argv, ("student_layers",))
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    yaml_keys = {a[2:] for a in yaml_argv if a.startswith("--")}
    with _OneLineErrors(parser, config, yaml_keys):
        try:
            model_args, data_args, training_args, recipe_args, rest = parser.parse_args_into_dataclasses(
                args=yaml_argv + argv, return_remaining_strings=True)
        except (ValueError, TypeError) as err:
            raise ConfigError(str(err).splitlines()[0]) from None
    if rest:
        known = [f"--{k}" for k in _field_types()]
        unknown = rest[0].split("=")[0]
        close = difflib.get_close_matches(unknown, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "; see --help for the valid options."
        raise ConfigError(f"unknown option '{unknown}'{hint}")
    corpora = [data_args.file_path, data_args.dataset_name, data_args.binarized_data]
    if sum(c is not None for c in corpora) != 1:
        raise ConfigError("set exactly one of file_path (a text file or folder), dataset_name (a Hub dataset) and "
                          "binarized_data (a folder made by distil-trainer binarize).")
    if recipe_args.onnx_latency:
        _require_export_packages()
    recipe_args.config = config
    ref = model_args.student_reference_config
    if config and ref and not os.path.isabs(ref) and not os.path.exists(ref):
        # Paths written in a YAML are relative to that YAML file.
        model_args.student_reference_config = os.path.join(os.path.dirname(os.path.abspath(config)), ref)
    return model_args, data_args, training_args, recipe_args


def _require_export_packages():
    """--onnx_latency needs the export packages: refused now, not after training."""
    from ..export.runtime import require_export_packages

    try:
        require_export_packages("dynamo")
    except ImportError as error:
        raise ConfigError(f"--onnx_latency: {error} Or drop --onnx_latency.") from None
