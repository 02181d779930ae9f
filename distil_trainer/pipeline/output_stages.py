"""Stages run by the main process only, on the saved student: scores, model card, report, push to the Hub."""

import json
from pathlib import Path

from ..atomic import write_text_atomic
from .layout import SCORES_FILE, STUDENT_INIT_DIR, TRAINING_LOG
from .objective import scoring_pooling
from .recipe_args import ConfigError
from .stage import Stage


def load_saved(ctx):
    """Reload what was saved, with full tensors (under ZeRO-3 the trained modules hold only their shards); once
    per run, for the first stage that needs it."""
    from .. import extraction
    from ..model_utils import unpartitioned_loading
    from .model_stages import load_like

    if getattr(ctx, "final_student", None) is not None:
        return
    m, final_dir = ctx.model_args, ctx.final_dir
    with unpartitioned_loading():
        ctx.final_student = load_like(ctx.teacher, final_dir)
        if ctx.trainer is not None and ctx.trainer.is_deepspeed_enabled:
            source = ctx.result.get("teacher_head") or m.teacher_name
            ctx.teacher, _ = extraction.load_teacher(source, m.trust_remote_code,
                                                     revision=None if "teacher_head" in ctx.result else
                                                     m.teacher_revision)
    log = final_dir / TRAINING_LOG
    ctx.log_history = json.loads(log.read_text()) if log.exists() else []


class Score(Stage):
    """Teacher, extracted student and distilled student scored on what the teacher is for (student_scores.py);
    cached in scores.json under a key of the three models' weights, the STS-B source and the held-out text."""

    name = "score"
    inputs = ("teacher", "trainer", "tokenizer", "collator", "masked_lm")
    outputs = ("scores",)
    main_process_only = True

    def enabled(self, ctx):
        return ctx.recipe_args.score

    def before(self, ctx):
        r, d = ctx.recipe_args, ctx.data_args
        if not r.score:
            ctx.scores = None
            return
        if not ctx.masked_lm:
            raise ConfigError("--score scores masked-LM (encoder) students: embeddings and masked-token figures. "
                              "Drop --score for a causal LM.")
        if r.heldout_file and d.file_path and Path(r.heldout_file).resolve() == Path(d.file_path).resolve():
            raise ConfigError(f"heldout_file {r.heldout_file} is the training corpus; give it lines the run does "
                              "NOT train on (e.g. the corpus's last lines, removed from file_path).")
        load_saved(ctx)

    def cache_key(self, ctx):
        from ..data.cache import stable_hash

        r, out = ctx.recipe_args, ctx.out
        teacher = ctx.result.get("teacher_head")
        files = [ctx.final_dir / "model.safetensors", out / STUDENT_INIT_DIR / "model.safetensors"]
        files += [Path(teacher) / "model.safetensors"] if teacher else []
        files += [Path(f) for f in (r.stsb_file, r.heldout_file) if f]
        return stable_hash({"models": [ctx.model_args.teacher_name, ctx.model_args.teacher_revision],
                            "files": [_file_identity(f) for f in files], "stsb_hub": not r.stsb_file,
                            "seed": ctx.training_args.seed, "max_length": ctx.data_args.max_length,
                            "pooling": scoring_pooling(ctx).describe(), "collator": type(ctx.collator).__name__})[:16]

    def skip(self, ctx):
        path = ctx.out / SCORES_FILE
        if path.exists():
            saved = json.loads(path.read_text())
            # Cached only with STS-B: a run that had no STS-B tries again (a file or Hub access may be there now).
            if saved.get("key") == self.cache_key(ctx) and saved["scores"].get("stsb_source"):
                ctx.scores = saved["scores"]
                return f"reused {path}"
        return None

    def run(self, ctx):
        from .model_stages import load_like
        from .student_scores import read_heldout, score_models

        r = ctx.recipe_args
        max_length = ctx.data_args.max_length or 128
        models = {"teacher": ctx.teacher.eval(), "student_init": load_like(ctx.teacher, ctx.out / STUDENT_INIT_DIR),
                  "student": ctx.final_student.eval()}
        rows = read_heldout(r.heldout_file, ctx.tokenizer, max_length) if r.heldout_file else None
        ctx.scores = score_models(models, ctx.teacher, ctx.tokenizer, ctx.collator, stsb_file=r.stsb_file,
                                  heldout_rows=rows, max_length=max_length, pooling=scoring_pooling(ctx))
        path = ctx.out / SCORES_FILE
        write_text_atomic(path, json.dumps({"key": self.cache_key(ctx), "scores": ctx.scores}, indent=2))
        student = ctx.scores["models"]["student"]
        figures = ", ".join(f"{k} {v:.3f}" for k, v in student.items())
        return f"student: {figures or 'nothing to score'} -> {path}"


def _file_identity(path):
    path = Path(path)
    if not path.exists():
        return [str(path), None]
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


class ModelCard(Stage):
    name = "model card"
    inputs = ("teacher", "train_dataset", "collator", "layer_map", "trainer", "scores", "latency")
    outputs = ("final_student", "teacher", "log_history", "speed", "card_info")
    main_process_only = True

    def before(self, ctx):
        load_saved(ctx)

    def run(self, ctx):
        from .model_card import write_model_card
        from .score_text import result_line

        ctx.speed = _speed(ctx.teacher, ctx.final_student, ctx.train_dataset, ctx.collator)
        ctx.card_info = info = _card_info(ctx, ctx.teacher, ctx.final_student, ctx.layer_map, ctx.log_history,
                                          ctx.speed)
        if ctx.scores is not None:
            info.scores = dict(ctx.scores, result_line=result_line(ctx.scores, info.speed_ratio,
                                                                   info.parameter_ratio))
            ctx.result["result_line"] = info.scores["result_line"]
        write_model_card(info, ctx.final_dir, overwrite=True)
        ctx.result.update(student_parameters=info.student_parameters, teacher_parameters=info.teacher_parameters,
                          speed_ratio=info.speed_ratio)
        return (f"{ctx.final_dir / 'README.md'} (student {info.student_parameters:,} / teacher "
                f"{info.teacher_parameters:,} parameters, {info.speed_ratio:.2f}x faster)")


class Report(Stage):
    name = "report"
    inputs = ("card_info", "teacher", "final_student", "log_history", "speed")
    main_process_only = True

    def skip(self, ctx):
        return None if ctx.recipe_args.report else "skipped (--report to write one)"

    def run(self, ctx):
        from .report import write_report
        from .teacher_head import fit_summary

        head = fit_summary(ctx.result["teacher_head"]) if ctx.result.get("teacher_head") else None
        path = write_report(ctx.out, ctx.card_info.teacher_name, ctx.teacher, ctx.final_student, ctx.log_history,
                            ctx.speed, ctx.training_args, teacher_head=head, scores=ctx.card_info.scores,
                            latency=ctx.card_info.latency)
        ctx.result["report"] = str(path)
        return str(path)


class PushToHub(Stage):
    name = "push to hub"
    main_process_only = True

    def enabled(self, ctx):
        return ctx.push

    def run(self, ctx):
        from .hub import push_student_to_hub

        args = ctx.training_args
        repo = args.hub_model_id or ctx.out.name
        commit = push_student_to_hub(ctx.final_dir, repo, token=args.hub_token, private=bool(args.hub_private_repo))
        return f"{repo}: {commit.commit_url}"


def _speed(teacher, student, dataset, collator, n_batches=4, batch_size=8):
    """Teacher/student inference time of the encoders (no LM head: what a fine-tuned student runs) on a few
    training batches, on the CPU -- what the card reports."""
    import copy

    from .report import measure_speed_ratio

    rows = [dataset[i] for i in range(min(len(dataset), n_batches * batch_size))]
    batches = [collator([{"input_ids": r["input_ids"]} for r in rows[i:i + batch_size]])
               for i in range(0, len(rows), batch_size)]
    t_cpu = copy.deepcopy(teacher.base_model).float().cpu()
    s_cpu = copy.deepcopy(student.base_model).float().cpu()
    t, s, ratio = measure_speed_ratio(t_cpu, s_cpu, batches)
    return {"teacher_seconds": t, "student_seconds": s, "ratio": ratio,
            "how": f"encoder forward, CPU, fp32, {len(batches)} batches of {batch_size} training sequences, "
                   "fastest of 5 alternating passes"}


def _card_info(ctx, teacher, student, layer_map, log_history, speed):
    from .model_card import StudentCardInfo
    from .report import count_parameters

    model_args, data_args, training_args = ctx.model_args, ctx.data_args, ctx.training_args
    recipe_args = ctx.recipe_args
    last = next((r for r in reversed(log_history) if "num_input_tokens_seen" in r), {})
    steps = max((r.get("step", 0) for r in log_history), default=None)
    weights = {n: getattr(training_args, n) for n in ("alpha_ce", "alpha_mlm", "alpha_clm", "alpha_mse",
                                                      "alpha_cos", "alpha_task", "alpha_embed", "alpha_embed_relation")
               if getattr(training_args, n) > 0}
    data = data_args.dataset_name or (Path(data_args.file_path).name if data_args.file_path else "")
    return StudentCardInfo(
        model_name=recipe_args.card_model_name or training_args.hub_model_id or Path(
            training_args.output_dir).name,
        teacher_name=recipe_args.teacher_card_name or model_args.teacher_name,
        teacher_revision=model_args.teacher_revision,
        student_parameters=count_parameters(student), teacher_parameters=count_parameters(teacher),
        architecture=student.config.model_type, layer_map=layer_map, loss_weights=weights,
        student_choice=getattr(ctx, "student_choice", None),
        temperature=training_args.temperature, datasets=[data] if data else [], train_steps=steps or None,
        tokens_seen=last.get("num_input_tokens_seen") or None, speed_ratio=speed["ratio"],
        speed_measurement=speed["how"], latency=ctx.latency, tags=["distillation", "distil_trainer"],
        sentence_embedding=_sentence_embedding_note(ctx))


def _sentence_embedding_note(ctx):
    """For the card: how a student saved as a sentence-transformers model pools (None for other students)."""
    from .objective import EMBEDDING, objective, scoring_pooling

    if objective(ctx) != EMBEDDING or not (ctx.final_dir / "modules.json").exists():
        return None
    return f"{scoring_pooling(ctx).describe()}; distilled on the teacher's sentence embeddings"
