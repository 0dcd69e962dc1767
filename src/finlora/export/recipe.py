"""The export recipe: checks, load, merge, write, verify, record; nothing is left at --out
unless every step succeeds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from finlora import atomic
from finlora.export.card import write_usage
from finlora.export.checks import (
    check_adapter_not_empty,
    check_gguf_kind,
    check_mergeable,
    check_out,
)
from finlora.export.load import load_context
from finlora.export.merge import merge
from finlora.export.options import TOLERANCES, ExportOptions, ExportResult, Verification
from finlora.export.records import EXPORT_RECORD, export_record
from finlora.export.verify import CHECKS, verify_gguf, verify_written
from finlora.export.writers import RELOADERS, WRITERS
from finlora.runs import Run


def export_run(
    run_dir: Path,
    options: ExportOptions,
    log: Callable[[str], None] | None = None,
    *,
    trust_remote_code: bool = False,
) -> ExportResult:
    """Merge RUN_DIR's adapter, write it as `options.format` to `options.out`, verify it.

    `trust_remote_code` comes from the command line only: a run whose model or tokenizer maps
    to its own code is refused without it. Raises FinloraError for a missing or unmergeable
    run, an all-zero adapter, a merge that changes nothing, an existing non-empty --out, or a
    failed verification; on any error nothing is left at --out.
    """
    say = log or (lambda _msg: None)
    run = Run.open(Path(run_dir))
    method = check_mergeable(run.dir)
    check_out(run.dir, options.out, options.overwrite)
    check_adapter_not_empty(run.dir)
    if options.format == "gguf":
        check_gguf_kind(run.dir)
    say(f"loading {run.root} ...")
    ctx = load_context(run, method, trust_remote_code)
    v = Verification()
    check = CHECKS[ctx.cfg.task](ctx, options.verify_n)
    v.data = check.description
    reference = check.scores(ctx.model) if options.verify else None
    merged, v.changed_tensors, v.tensors = merge(ctx, options.weights_dtype)
    say(f"merged {ctx.method}: {v.changed_tensors} of {v.tensors} tensors changed")
    with atomic.atomic_dir(options.out) as tmp:
        files = WRITERS[options.format](ctx, merged, tmp, options)
        if reference is not None:
            v.n = check.n
            v.tolerance = options.tolerance or TOLERANCES[_checked_dtype(options)]
            say(f"verifying on {v.n} {check.unit} ({v.data}) ...")
            written = RELOADERS[options.format](ctx, tmp, merged)
            verify_written(check, reference, written, v)
            if options.format == "gguf":
                verify_gguf(check, tmp / files[0], reference, v, options.tensor_type)
        files = sorted([*files, *write_usage(ctx, options, v, tmp, files)])
        atomic.write_json(tmp / EXPORT_RECORD, export_record(ctx, options, files, v))
    files.append(EXPORT_RECORD)
    return ExportResult(
        ctx.cfg.task,
        options.format,
        options.out,
        sorted(files),
        ctx.cfg.method.name,
        options.tensor_type if options.format == "gguf" else options.weights_dtype,
        reference is not None,
        v,
    )


def _checked_dtype(options: ExportOptions) -> str:
    # A GGUF's Hugging Face check runs on the fp32 merged model; its own precision is llama.cpp's.
    return "f32" if options.format == "gguf" else options.weights_dtype
