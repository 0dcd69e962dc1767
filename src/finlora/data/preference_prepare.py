"""From a preference run's data section to its records and split: a file of pairs or judged
answers (`finlora.data.preference`), or the packaged synthetic set when data.path is empty."""

from __future__ import annotations

from pathlib import Path

from finlora.config import DataConfig
from finlora.data.examples import Example
from finlora.data.fin_preference import FIN_PREFERENCE_NOTE, fin_preference_set
from finlora.data.preference import PreferenceRecord, load_preference, preference_sha256
from finlora.data.prepare import PreparedInstruct
from finlora.data.split import cross_split_duplicates, stratified_split
from finlora.errors import FinloraError


def _kind(record: PreferenceRecord) -> str:
    if record.paired:
        return "pair"
    return "desirable" if record.desirable else "undesirable"


def prepare_preference(cfg: DataConfig, seed: int) -> PreparedInstruct:
    """Load preference records (data.path, or the packaged set when empty) and split them,
    keeping pairs, desirable and undesirable records in proportion where each has enough."""
    if cfg.path:
        path = Path(cfg.path).expanduser()
        records = load_preference(path)
        files, description = [path], str(path)
    else:
        records = fin_preference_set()
        files, description = [], FIN_PREFERENCE_NOTE
    strata = [Example(r.response, _kind(r)) for r in records]
    try:
        split = stratified_split(strata, cfg.test_fraction, cfg.val_fraction, seed)
    except FinloraError:
        flat = [Example(e.text, "all") for e in strata]
        try:
            split = stratified_split(flat, cfg.test_fraction, cfg.val_fraction, seed)
        except FinloraError:
            raise FinloraError(
                f"{description}: {len(records)} record(s) are too few to hold some out for "
                "validation and test (data.test_fraction, data.val_fraction)"
            ) from None
    prompts = [Example(str([(m.role, m.content) for m in r.prompt_messages]), "") for r in records]
    return PreparedInstruct(
        list(records),
        split,
        files,
        description,
        [],
        cross_split_duplicates(prompts, split),
        None if files else preference_sha256(records),
    )
