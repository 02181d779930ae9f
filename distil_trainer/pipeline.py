"""The pipeline every recipe runs:

    binarize -> token counts -> load teacher (fit its MLM head if it has none) -> extract the student
    -> distil (resumable) -> save student + tokenizer -> model card -> report -> push to the Hub

Each stage is cached and skipped when its output exists, prints a one-line summary, and runs on the main process
first in multi-process launches (the other ranks then find its output and reuse it).

Layout of `output_dir`:
    data/binarized-<key>/     tokenized corpus (Arrow) and token_counts.npy (unless data_cache_dir is set)
    teacher_mlm_head/         the teacher with a fitted MLM head (only for teachers shipped without one)
    student_init/             the student as extracted from the teacher, before distillation (with
                              --student_init random: the same architecture with fresh random weights)
    checkpoint-<step>/        Trainer checkpoints (optimizer, scheduler, RNG, data position): re-running resumes
    student/                  the distilled student, its tokenizer and model card (README.md): what is pushed
    report.md, loss_curve.png with --report
"""

import json
import logging
import os
import shutil
import time
import contextlib
from contextlib import contextmanager
from pathlib import Path

from .recipe_args import ConfigError
from .run_lock import OutputDirInUse

logger = logging.getLogger(__name__)

STUDENT_DIR, STUDENT_INIT_DIR, TEACHER_HEAD_DIR = "student", "student_init", "teacher_mlm_head"
RANDOM_INIT = "random"  # student_init value of the random-initialisation ablation
TRAINING_LOG = "training_log.json"
# Config fields that fix a student's size, under the names of the families the recipes use.
SIZE_FIELDS = ("dim", "hidden_size", "n_embd", "n_layers", "num_hidden_layers", "n_layer", "n_heads",
               "num_attention_heads", "n_head", "hidden_dim", "intermediate_size", "vocab_size",
               "max_position_embeddings", "n_positions", "type_vocab_size")


class TrainingStopped(RuntimeError):
    """Training ended early on purpose (non-finite loss); checkpoints are intact, no student is saved."""


class _Stages:
    """Numbered stage headers and one-line summaries, printed by the main process only."""

    def __init__(self, total, is_main):
        self.total, self.is_main, self.index = total, is_main, 0

    @contextmanager
    def stage(self, name):
        self.index += 1
        start = time.perf_counter()
        box = {"summary": ""}
        if self.is_main:
            print(f"==> [{self.index}/{self.total}] {name}", flush=True)
        yield box
        if self.is_main:
            print(f"    {name}: {box['summary']} ({time.perf_counter() - start:.1f} s)", flush=True)


def _data_key(model_args, data_args, tokenizer_name):
    from .data.cache import stable_hash

    source = data_args.file_path and str(Path(data_args.file_path).resolve())
    return stable_hash([tokenizer_name, source, data_args.dataset_name, data_args.dataset_config,
                        data_args.dataset_split, data_args.text_column, data_args.max_length, data_args.pack])[:12]


def check_reference_config(student, reference_path):
    """The extracted student must have the sizes of the original Distil* student config."""
    with open(reference_path, encoding="utf-8") as f:
        reference = json.load(f)
    actual = student.config.to_dict()
    wrong = [f"{k}: reference {reference[k]}, student {actual[k]}" for k in SIZE_FIELDS
             if k in reference and k in actual and reference[k] != actual[k]]
    if wrong:
        raise ConfigError(f"the student differs from {reference_path}: {'; '.join(wrong)}. Check teacher_name, "
                          "student_type and student_layers.")


def _missing_head_keys(teacher, missing_keys):
    prefix = teacher.base_model_prefix + "."
    return [k for k in missing_keys if not k.startswith(prefix)]


def _student_is_masked_lm(student):
    from .model_utils import MASKED_LM, head_kind

    return head_kind(student) == MASKED_LM


def _layers(model_args):
    if model_args.student_layers:
        return [int(x) for x in str(model_args.student_layers).replace(" ", "").split(",") if x != ""]
    return None


def run_pipeline(model_args, data_args, training_args, recipe_args):
    """Run the whole recipe; returns a dict with the paths and figures of the run.

    The main process holds `output_dir` for the whole run (a second run on it is refused, naming this one)."""
    from accelerate import PartialState

    from .run_lock import output_dir_lock

    lock = output_dir_lock(training_args.output_dir) if PartialState().is_main_process else contextlib.nullcontext()
    with lock:
        return _run_pipeline(model_args, data_args, training_args, recipe_args)


def _run_pipeline(model_args, data_args, training_args, recipe_args):
    from accelerate import PartialState
    from transformers import AutoTokenizer
    from transformers.trainer_utils import get_last_checkpoint

    from . import extraction
    from .data import binarize, compute_token_counts
    from .data.collators import CausalLMCollator, MaskedLMCollator
    from .distillation_trainer import DistillationTrainer
    from .model_utils import unpartitioned_loading
    from .reporting import count_parameters

    state = PartialState()
    is_main = state.is_main_process
    out = Path(training_args.output_dir)
    final_dir = out / STUDENT_DIR
    stages = _Stages(8 + bool(model_args.fit_teacher_mlm_head_steps) + bool(training_args.push_to_hub), is_main)
    push, training_args.push_to_hub = training_args.push_to_hub, False  # pushed once, at the end, by this module
    if training_args.include_num_input_tokens_seen == "no":
        training_args.include_num_input_tokens_seen = "non_padding"  # the model card reports tokens seen
    result = {"output_dir": str(out), "student_dir": str(final_dir)}

    tokenizer_name = model_args.tokenizer_name or model_args.teacher_name
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, revision=model_args.teacher_revision,
                                              trust_remote_code=model_args.trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad token; padding is masked out anyway

    # 1. binarize
    data_dir = Path(data_args.data_cache_dir or out / "data") / f"binarized-{_data_key(model_args, data_args, tokenizer_name)}"
    with stages.stage("binarize") as s, state.main_process_first():
        binarized = binarize(data_dir, tokenizer, file_path=data_args.file_path, dataset_name=data_args.dataset_name,
                             dataset_config=data_args.dataset_config, split=data_args.dataset_split,
                             text_column=data_args.text_column, streaming=data_args.streaming,
                             max_length=data_args.max_length, pack=data_args.pack, num_proc=data_args.num_proc,
                             overwrite=True, verbose=is_main)  # a derived cache: rebuilt when its inputs change
        st = binarized.stats
        s["summary"] = (f"{len(binarized.dataset)} sequences, {st.tokens} tokens "
                        f"({'cache reused' if binarized.cache_hit else 'built'}) in {data_dir}")
    train_dataset = binarized.dataset
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(data_args.max_train_samples, len(train_dataset))))

    # 2. teacher
    with stages.stage("load teacher") as s, unpartitioned_loading():
        teacher, missing = extraction.load_teacher(model_args.teacher_name, model_args.trust_remote_code,
                                                   revision=model_args.teacher_revision)
        missing_head = _missing_head_keys(teacher, missing)
        s["summary"] = (f"{type(teacher).__name__}, {count_parameters(teacher):,} parameters"
                        + (f"; NO pretrained head ({len(missing_head)} head tensors missing)" if missing_head else ""))

    masked_lm = type(teacher).__name__.endswith("ForMaskedLM") or model_args.student_type == "distilbert"
    # 3. token counts (masked LM only: they weight the masking)
    counts = None
    with stages.stage("token counts") as s, state.main_process_first():
        if masked_lm and data_args.mlm_smoothing > 0:
            counted = compute_token_counts(data_dir, vocab_size=len(tokenizer), overwrite=True)
            counts = counted.counts
            s["summary"] = (f"{int((counts > 0).sum())} distinct tokens of {len(counts)} "
                            f"({'cache reused' if counted.cache_hit else 'counted'}) in {counted.path}")
        else:
            s["summary"] = "skipped (not needed: causal LM or uniform masking)"
    if masked_lm:
        collator = MaskedLMCollator(tokenizer, token_counts=counts, mlm_mask_prop=data_args.mlm_mask_prop,
                                    word_mask=data_args.word_mask, word_keep=data_args.word_keep,
                                    word_rand=data_args.word_rand, mlm_smoothing=data_args.mlm_smoothing,
                                    seed=training_args.seed)
    else:
        collator = CausalLMCollator(tokenizer)

    # 3b. a teacher shipped without an MLM head gets one fitted (body frozen), or the run stops here
    needs_logits = training_args.alpha_ce > 0 or training_args.alpha_mse > 0
    if missing_head and needs_logits and not model_args.fit_teacher_mlm_head_steps:
        raise ConfigError(
            f"the teacher {model_args.teacher_name} has no pretrained LM head ({missing_head[0]} and "
            f"{len(missing_head) - 1} more are missing), so alpha_ce/alpha_mse would match random logits. Set "
            "fit_teacher_mlm_head_steps (fits the head with the body frozen) or set alpha_ce=0 and alpha_mse=0.")
    if model_args.fit_teacher_mlm_head_steps:
        from .teacher_head import fit_mlm_head

        with stages.stage("fit teacher MLM head") as s:
            if not missing_head:
                s["summary"] = "skipped: the teacher has a pretrained head"
            else:
                identity = {"teacher": model_args.teacher_name, "revision": model_args.teacher_revision,
                            "steps": model_args.fit_teacher_mlm_head_steps, "data": data_dir.name,
                            "seed": training_args.seed}
                state.wait_for_everyone()
                teacher, reused = fit_mlm_head(teacher, train_dataset, collator, out / TEACHER_HEAD_DIR,
                                               model_args.fit_teacher_mlm_head_steps, identity,
                                               batch_size=training_args.per_device_train_batch_size,
                                               seed=training_args.seed, save=is_main)
                state.wait_for_everyone()
                missing = missing_head = []  # the head now exists, and the student copies it
                s["summary"] = ("reused " if reused else "fitted ") + str(out / TEACHER_HEAD_DIR)
                result["teacher_head"] = str(out / TEACHER_HEAD_DIR)

    # 4. student initialised from teacher layers
    init_dir = out / STUDENT_INIT_DIR
    with stages.stage("extract student") as s, state.main_process_first(), unpartitioned_loading():
        if (init_dir / "config.json").exists():
            student = _load_like(teacher, init_dir)
            _check_student_init(student, model_args.student_init, init_dir)
            s["summary"] = f"reused {init_dir}"
        else:
            student, report = extraction.extract_student(
                teacher, layers=_layers(model_args), strategy=model_args.layer_strategy,
                num_layers=model_args.student_num_layers, student_type=model_args.student_type,
                teacher_missing_keys=missing, return_report=True)
            if model_args.student_init == RANDOM_INIT:
                student = _reinitialise(student, report, training_args.seed)
            if is_main:
                extraction.save_student(student, tokenizer, init_dir, report=report)
            s["summary"] = (f"layers {report.teacher_layers} -> {type(student).__name__} in {init_dir}"
                            + (" (weights RANDOMLY re-initialised)" if model_args.student_init == RANDOM_INIT
                               else ""))
    if model_args.student_reference_config:
        check_reference_config(student, model_args.student_reference_config)
    if model_args.student_init == RANDOM_INIT and training_args.freeze_pos_embs:
        logger.warning("student_init=random with freeze_pos_embs: the position embeddings stay at their random "
                       "initial values for the whole run.")
    record = student.config.to_dict().get(extraction.CONFIG_KEY, {})
    # A re-initialised student took only its shape from the teacher layers: the card shows no layer map.
    layer_map = None if record.get("student_init") == RANDOM_INIT else record.get("teacher_layers")

    # 5. distil (resumes from the last checkpoint when one exists)
    trainer = None
    with stages.stage("distil") as s:
        if (final_dir / "model.safetensors").exists() and not training_args.overwrite_output_dir:
            s["summary"] = f"skipped: {final_dir} holds a finished run (--overwrite_output_dir to train again)"
        else:
            last = None if training_args.overwrite_output_dir or not out.is_dir() else get_last_checkpoint(str(out))
            if is_main and last:
                print(f"    resuming from {last}", flush=True)
            trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args,
                                          train_dataset=train_dataset, data_collator=collator,
                                          processing_class=tokenizer)
            train_result = trainer.train(resume_from_checkpoint=last)
            if trainer.stopped_on_nonfinite:
                raise TrainingStopped(
                    f"training stopped at step {trainer.state.global_step}: non-finite loss "
                    f"({', '.join(trainer.nonfinite_terms)}); no student was saved. The last good checkpoint is in "
                    f"{out}; fix the cause (learning rate, data, precision) and run the same command to resume.")
            s["summary"] = (f"{trainer.state.global_step} steps, final loss "
                            f"{train_result.training_loss:.4f}, {trainer.state.num_input_tokens_seen or 0} tokens")

    # 6. save the student and tokenizer (atomically)
    with stages.stage("save student") as s:
        if trainer is None:
            s["summary"] = f"kept {final_dir}"
        else:
            partial = out / (STUDENT_DIR + ".partial")
            if is_main and partial.exists():
                shutil.rmtree(partial)
            state.wait_for_everyone()
            trainer.save_model(str(partial))  # every rank: DeepSpeed ZeRO-3 gathers the shards here
            if is_main:
                tokenizer.save_pretrained(partial)
                (partial / TRAINING_LOG).write_text(json.dumps(trainer.state.log_history, indent=2))
                if final_dir.exists():
                    shutil.rmtree(final_dir)
                os.replace(partial, final_dir)
            state.wait_for_everyone()
            s["summary"] = str(final_dir)

    # 7. model card, 8. report, 9. push: main process only
    if is_main:
        with unpartitioned_loading():
            # What was saved, with full tensors (under ZeRO-3 the trained modules hold only their shards).
            final_student = _load_like(teacher, final_dir)
            if trainer is not None and trainer.is_deepspeed_enabled:
                source = result.get("teacher_head") or model_args.teacher_name
                teacher, _ = extraction.load_teacher(source, model_args.trust_remote_code,
                                                     revision=None if "teacher_head" in result else
                                                     model_args.teacher_revision)
        log_history = json.loads((final_dir / TRAINING_LOG).read_text()) if (final_dir / TRAINING_LOG).exists() else []
        with stages.stage("model card") as s:
            speed = _speed(teacher, final_student, train_dataset, collator)
            info = _card_info(model_args, data_args, training_args, recipe_args, teacher, final_student, layer_map,
                              log_history, speed)
            from .model_card import write_model_card

            write_model_card(info, final_dir, overwrite=True)
            result.update(student_parameters=info.student_parameters, teacher_parameters=info.teacher_parameters,
                          speed_ratio=info.speed_ratio)
            s["summary"] = (f"{final_dir / 'README.md'} (student {info.student_parameters:,} / teacher "
                            f"{info.teacher_parameters:,} parameters, {info.speed_ratio:.2f}x faster)")
        with stages.stage("report") as s:
            if recipe_args.report:
                from .run_report import write_report

                from .teacher_head import last_fit_loss

                head_loss = last_fit_loss(result["teacher_head"]) if result.get("teacher_head") else None
                path = write_report(out, info.teacher_name, teacher, final_student, log_history, speed,
                                    training_args, teacher_head_loss=head_loss)
                s["summary"] = str(path)
                result["report"] = str(path)
            else:
                s["summary"] = "skipped (--report to write one)"
        if push:
            from .hub import push_student_to_hub

            with stages.stage("push to hub") as s:
                repo = training_args.hub_model_id or out.name
                commit = push_student_to_hub(final_dir, repo, token=training_args.hub_token,
                                             private=bool(training_args.hub_private_repo))
                s["summary"] = f"{repo}: {commit.commit_url}"
    state.wait_for_everyone()
    return result


def _reinitialise(student, report, seed):
    """The student's architecture with fresh weights (the model class's own initialisation, seeded), for the
    random-initialisation ablation; `report` and the config record say that nothing was copied."""
    from transformers import set_seed

    from . import extraction

    set_seed(seed)
    fresh = type(student)(student.config).to(student.dtype).eval()
    report.copied = {}
    report.randomly_initialised = sorted(fresh.state_dict())
    setattr(fresh.config, extraction.CONFIG_KEY, {**report.config_record(), "student_init": RANDOM_INIT})
    return fresh


def _check_student_init(student, wanted, init_dir):
    """A cached initial student must have been made the way this run asks for."""
    from . import extraction

    found = student.config.to_dict().get(extraction.CONFIG_KEY, {}).get("student_init", "teacher_layers")
    if found != wanted:
        raise ConfigError(f"{init_dir} holds a student with student_init={found}, but this run asks for "
                          f"student_init={wanted}; use another output_dir (or delete {init_dir}).")


def _load_like(teacher, directory):
    """Reload a saved student with the head class of the teacher (DistilBERT for student_type=distilbert)."""
    import transformers

    from .model_utils import CAUSAL_LM, head_kind

    auto = transformers.AutoModelForCausalLM if head_kind(teacher) == CAUSAL_LM else transformers.AutoModelForMaskedLM
    return auto.from_pretrained(directory)


def _speed(teacher, student, dataset, collator, n_batches=4, batch_size=8):
    """Teacher/student inference time of the encoders (no LM head: what a fine-tuned student runs) on a few
    training batches, on the CPU -- what the card reports."""
    import copy

    from .reporting import measure_speed_ratio

    rows = [dataset[i] for i in range(min(len(dataset), n_batches * batch_size))]
    batches = [collator([{"input_ids": r["input_ids"]} for r in rows[i:i + batch_size]])
               for i in range(0, len(rows), batch_size)]
    t_cpu = copy.deepcopy(teacher.base_model).float().cpu()
    s_cpu = copy.deepcopy(student.base_model).float().cpu()
    t, s, ratio = measure_speed_ratio(t_cpu, s_cpu, batches)
    return {"teacher_seconds": t, "student_seconds": s, "ratio": ratio,
            "how": f"encoder forward, CPU, fp32, {len(batches)} batches of {batch_size} training sequences, "
                   "fastest of 5 alternating passes"}


def _card_info(model_args, data_args, training_args, recipe_args, teacher, student, layer_map, log_history, speed):
    from .model_card import StudentCardInfo
    from .reporting import count_parameters

    last = next((r for r in reversed(log_history) if "num_input_tokens_seen" in r), {})
    steps = max((r.get("step", 0) for r in log_history), default=None)
    weights = {n: getattr(training_args, n) for n in ("alpha_ce", "alpha_mlm", "alpha_clm", "alpha_mse",
                                                      "alpha_cos", "alpha_task") if getattr(training_args, n) > 0}
    data = data_args.dataset_name or (Path(data_args.file_path).name if data_args.file_path else "")
    return StudentCardInfo(
        model_name=recipe_args.card_model_name or training_args.hub_model_id or Path(
            training_args.output_dir).name,
        teacher_name=recipe_args.teacher_card_name or model_args.teacher_name,
        teacher_revision=model_args.teacher_revision,
        student_parameters=count_parameters(student), teacher_parameters=count_parameters(teacher),
        architecture=student.config.model_type, layer_map=layer_map, loss_weights=weights,
        temperature=training_args.temperature, datasets=[data] if data else [], train_steps=steps or None,
        tokens_seen=last.get("num_input_tokens_seen") or None, speed_ratio=speed["ratio"],
        speed_measurement=speed["how"], tags=["distillation", "distil_trainer"])


def main(default_config=None, argv=None):
    """Entry point of the recipe scripts: parse YAML + command line, run the pipeline, report errors in one line."""
    import sys

    from .recipe_args import parse_recipe_args

    # Our own handler: basicConfig does nothing once a library (DeepSpeed, torch.distributed) set up the root.
    package_logger = logging.getLogger("distil_trainer")
    if not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)
        package_logger.propagate = False
    try:
        return run_pipeline(*parse_recipe_args(argv, default_config))
    except (ConfigError, FileExistsError, OutputDirInUse) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)
    finally:
        import torch.distributed as dist

        # A clean teardown: without it gloo ranks sometimes abort at interpreter exit.
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
