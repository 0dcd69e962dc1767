"""From a preference run's data section to its records and split: a file of pairs or judged
answers (`finlora.data.preference`), or the packaged synthetic set when data.path is empty."""

from __future__ import annotations

from pathlib import Path

from finlora.config import DataConfig
from finlora.data.examples import Example
from finlora.data.fin_preference import FIN_PREFERENCE_NOTE, fin_preference_set
from finlora.data.preference import PreferenceRecord, load_preference, preference_sha256
from finlora.data.prepare import PreparedInstruct, prompt_texts, split_records
from finlora.data.split import cross_split_duplicates


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
    split = split_records(strata, cfg, seed, description)
    return PreparedInstruct(
        list(records),
        split,
        files,
        description,
        [],
        cross_split_duplicates(prompt_texts(records), split),
        None if files else preference_sha256(records),
    )
