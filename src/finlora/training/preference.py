"""The preference objective (task preference) in finlora's training loop: the reference model's
log-probabilities, measured once before the first step; each batch's DPO, ORPO or KTO loss
(`preference_loss`); and validation by loss and implicit reward.

The reference model is the run's starting model: the base model, or the adapter the run
continues (`finlora train --from RUN`) as that run trained it. Its log-probabilities never
change, so they are measured once, for every training and validation answer, before the first
step, and kept with the features (`PreferenceFeature.reference`). That is the simplest correct
choice: no second adapter to keep frozen and switch to, no second copy of the model, no
reference pass at every step (a third of DPO's compute), and it holds for every method, freeze
and full tuning too, whose trained weights are the model's own and cannot be switched off. A
new adapter of LoRA (B = 0), IA3 or a bottleneck adapter starts as the identity, so the model
before its first step is the base model; and PiSSA or OLoRA must not be switched off to get it
(their adapter holds part of the base weight). Only the virtual-token methods (prompt, prefix,
p-tuning) start away from the base model: for them the new adapter is disabled (PEFT's
`disable_adapter`). A resumed run measures the reference again before its checkpoint is loaded,
from the same starting weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from finlora.config import RunConfig, SpeedConfig
from finlora.config.preference import REFERENCE_OBJECTIVES
from finlora.data.preference import check_objective
from finlora.distributed import World
from finlora.models import Placement
from finlora.scoring import autocast, is_prompt_learning, label_logits
from finlora.tasks.classify import IGNORE, Batch, sorted_batches, token_budget_chunks
from finlora.tasks.preference import PreferenceCodec, PreferenceFeature
from finlora.training.preference_loss import (
    dpo_losses,
    kto_kl,
    kto_losses,
    orpo_odds_terms,
    pair_metrics,
    unpaired_metrics,
)
from finlora.training.step import backward

Log = Callable[[str], None]
Row = tuple[Sequence[int], Sequence[int]]


def answer_logps(model: Any, batch: Batch, fast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's answer log-probability summed over its answer tokens (R,), in fp32, and how
    many answer tokens it has (R,)."""
    # Imported here: trl costs every run's start about 0.1 s, and only preference runs need it.
    from trl.trainer.utils import selective_log_softmax

    logits = label_logits(model, batch, "causal", fast)  # (R, L, V)
    real = batch.targets != IGNORE  # (R, L)
    # TRL's gather of log-softmax values, a row at a time: no second (R, L, V) tensor. In fp32,
    # where its log-sum-exp path is exact (in bf16 it would take a whole log-softmax a row).
    logp = selective_log_softmax(logits.float(), batch.targets.clamp(min=0))  # (R, L)
    return (logp * real).sum(-1), real.sum(-1)


@torch.no_grad()
def score_rows(
    model: Any,
    codec: PreferenceCodec,
    rows: Sequence[Row],
    speed: SpeedConfig,
    device: torch.device,
    dtype: torch.dtype | None,
) -> list[float]:
    """The answer log-probability of each (prompt, answer) row, in order, batched by length."""
    out = [0.0] * len(rows)
    for idx in sorted_batches([len(p) + len(a) for p, a in rows], speed.eval_batch_size):
        batch = codec.rows_batch([rows[i] for i in idx]).to(device)
        with autocast(device, dtype):
            logp, _ = answer_logps(model, batch, speed.label_logits_only)
        for i, value in zip(idx, logp.tolist(), strict=True):
            out[i] = value
    return out


@contextlib.contextmanager
def _starting_model(model: Any, fresh: bool) -> Iterator[None]:
    """The model as the reference: in eval mode, and a new virtual-token adapter disabled."""
    was_training = model.training
    model.eval()
    off = fresh and is_prompt_learning(model)
    try:
        with model.disable_adapter() if off else contextlib.nullcontext():
            yield
    finally:
        model.train(was_training)


def _where(placement: Placement) -> tuple[torch.device, torch.dtype | None]:
    return placement.device, placement.dtype


def _rows(features: Sequence[PreferenceFeature]) -> list[Row]:
    return [row for f in features for row in f.rows()]


def _split(values: Sequence[float], features: Sequence[PreferenceFeature]) -> list[list[float]]:
    """Flat per-row values back into one list per feature."""
    out, at = [], 0
    for f in features:
        out.append(list(values[at : at + len(f.answers)]))
        at += len(f.answers)
    return out


class PreferenceObjective:
    """DPO, ORPO or KTO (`cfg.preference`) over preference features."""

    def __init__(self, cfg: RunConfig, codec: Any, data: Any) -> None:
        assert isinstance(codec, PreferenceCodec)
        check_objective(data.examples, cfg.preference.objective)
        self.section = cfg.preference
        self.codec = codec
        self.fresh = cfg.method.start_from is None
        self.kto = self.section.objective == "kto"
        self.speed = cfg.speed
        self._loss = {"dpo": self._dpo, "orpo": self._orpo, "kto": self._kto}[
            self.section.objective
        ]

    # ---- before the first step ------------------------------------------------------------

    def prepare(
        self,
        model: Any,
        train: list[Any],
        validation: list[Any],
        placement: Placement,
        log: Log,
    ) -> tuple[list[Any], list[Any]]:
        """The features with their reference log-probabilities (and, for KTO, each prompt's
        mismatched answer: the previous record's). ORPO needs none for training, only for
        the validation's implicit rewards."""
        if self.kto:
            train, validation = self._mismatch(train), self._mismatch(validation)
        needed = self.section.objective in REFERENCE_OBJECTIVES
        measured = self._measure(model, [*(train if needed else []), *validation], placement)
        where = "the base model" if self.fresh else "the adapter the run starts from"
        log(f"preference: reference log-probabilities of {len(measured)} record(s), from {where}")
        if needed:
            train = measured[: len(train)]
        return train, measured[len(measured) - len(validation) :]

    def _mismatch(self, features: list[PreferenceFeature]) -> list[PreferenceFeature]:
        return [
            dataclasses.replace(f, mismatched=self.codec.mismatched(f, features[i - 1]))
            for i, f in enumerate(features)
        ]

    def _measure(
        self, model: Any, features: list[PreferenceFeature], placement: Placement
    ) -> list[PreferenceFeature]:
        rows = _rows(features)
        extra = [(f.prompt, f.mismatched) for f in features] if self.kto else []
        with _starting_model(model, self.fresh):
            logps = score_rows(model, self.codec, [*rows, *extra], self.speed, *_where(placement))
        per_feature = _split(logps[: len(rows)], features)
        mismatched: list[float | None] = [*logps[len(rows) :]] or [None] * len(features)
        return [
            dataclasses.replace(f, reference=tuple(r), mismatched_reference=m)
            for f, r, m in zip(features, per_feature, mismatched, strict=True)
        ]

    # ---- a batch ---------------------------------------------------------------------------

    def accumulate(
        self,
        model: Any,
        codec: Any,
        features: list[Any],
        cfg: RunConfig,
        placement: Placement,
        world: World | None = None,
    ) -> tuple[float, int]:
        """Accumulate one batch's gradients; returns its loss and real tokens.

        As `finlora.training.step.accumulate_batch` does: micro-batches of at most
        `speed.max_batch_tokens` padded tokens, each loss a share of the whole batch's mean (so
        the gradients add up to the batch's), each process its rows of the batch."""
        world = world or World()
        totals = _totals(features)
        kl = self._batch_kl(model, features, placement, world) if self.kto else None
        mine = world.rows(features)
        loss_sum, real = 0.0, 0
        budget = placement.batch_tokens(cfg.speed.max_batch_tokens)
        for chunk in token_budget_chunks([codec.width(f) for f in mine], budget):
            part = [mine[i] for i in chunk]
            batch = codec.training_batch(part).to(placement.device)
            with autocast(placement.device, placement.dtype):
                logp, tokens = answer_logps(model, batch, cfg.speed.label_logits_only)
            loss = self._loss(part, logp, tokens, totals, kl)
            backward(model, cfg, loss, len(part) / len(features))
            loss_sum += loss.item()
            real += batch.real_tokens
        loss_sum, whole = world.sum([loss_sum, real], placement.device)
        return loss_sum, int(whole)

    def _batch_kl(
        self, model: Any, features: list[PreferenceFeature], placement: Placement, world: World
    ) -> torch.Tensor:
        """KTO's KL estimate over the whole batch, every process's rows (no gradient)."""
        mine = world.rows(features)
        rows = [(f.prompt, f.mismatched) for f in mine]
        logps = score_rows(model, self.codec, rows, self.speed, *_where(placement))
        diff = sum(
            p - float(f.mismatched_reference or 0.0) for p, f in zip(logps, mine, strict=True)
        )
        total, n = world.sum([diff, len(mine)], placement.device)
        return torch.tensor(max(total / n, 0.0), device=placement.device)

    def _references(self, part: Sequence[PreferenceFeature], device: torch.device) -> torch.Tensor:
        values = [r for f in part for r in (f.reference or ())]
        assert len(values) == sum(len(f.answers) for f in part), "reference not measured"
        return torch.tensor(values, dtype=torch.float32, device=device)

    def _dpo(
        self, part: Any, logp: torch.Tensor, tokens: torch.Tensor, totals: Any, _kl: Any
    ) -> torch.Tensor:
        ref = self._references(part, logp.device)
        lengths = (tokens[0::2], tokens[1::2])
        losses = dpo_losses(logp[0::2], logp[1::2], ref[0::2], ref[1::2], self.section, lengths)
        return losses.sum() / totals[0]

    def _orpo(
        self, part: Any, logp: torch.Tensor, tokens: torch.Tensor, totals: Any, _kl: Any
    ) -> torch.Tensor:
        # The chosen answers' cross-entropy, over the batch's chosen answer tokens (the
        # prompts are not trained, as in every finlora task), minus beta times the mean log
        # odds-ratio term.
        nll = -logp[0::2].sum() / totals[2]
        means = logp / tokens.clamp(min=1)
        odds = orpo_odds_terms(means[0::2], means[1::2])
        return nll - self.section.beta * odds.sum() / totals[0]

    def _kto(
        self, part: Any, logp: torch.Tensor, tokens: torch.Tensor, totals: Any, kl: Any
    ) -> torch.Tensor:
        ref = self._references(part, logp.device)
        desirable = PreferenceCodec.desirable(part).to(logp.device)
        losses = kto_losses(logp, ref, desirable, kl, self.section)
        return losses.sum() / totals[1]

    # ---- validation -----------------------------------------------------------------------

    @torch.no_grad()
    def validate(
        self,
        model: Any,
        codec: Any,
        features: Sequence[Any],
        speed: SpeedConfig,
        placement: Placement,
        world: World | None = None,
    ) -> dict[str, float]:
        """The objective's loss over the validation features as one batch, and the implicit
        rewards against the reference (`pair_metrics`, `unpaired_metrics`). Every process
        scores every feature (validation sets are small), so all report the same figures."""
        if not features:
            return {}
        was_training = model.training
        model.eval()
        try:
            rows = _rows(features)
            extra = [(f.prompt, f.mismatched) for f in features] if self.kto else []
            logps = score_rows(model, codec, [*rows, *extra], speed, *_where(placement))
        finally:
            model.train(was_training)
        kl = None
        if self.kto:
            mism = torch.tensor(logps[len(rows) :])
            kl = kto_kl(mism, torch.tensor([float(f.mismatched_reference) for f in features]))
        logp = torch.tensor(logps[: len(rows)])
        tokens = torch.tensor([len(a) for f in features for a in f.answers])
        loss = self._loss(features, logp, tokens, _totals(features), kl)
        metrics = {"val_loss": float(loss), **self._rewards(features, logps[: len(rows)])}
        return metrics

    def _rewards(
        self, features: Sequence[PreferenceFeature], logps: list[float]
    ) -> dict[str, float]:
        per = _split(logps, features)
        pairs = [i for i, f in enumerate(features) if f.paired]
        single = [i for i, f in enumerate(features) if not f.paired]
        beta = self.section.beta
        found = {
            **pair_metrics(
                [per[i] for i in pairs],
                [features[i].reference or () for i in pairs],
                [[len(a) for a in features[i].answers] for i in pairs],
                beta,
            ),
            **unpaired_metrics(
                [per[i][0] for i in single],
                [(features[i].reference or (0.0,))[0] for i in single],
                [features[i].desirable[0] for i in single],
                beta,
            ),
        }
        keep = ("reward_accuracy", "reward_margin", "logp_accuracy", "unpaired_reward_accuracy")
        return {f"val_{k}": v for k, v in found.items() if k in keep}

    def epoch_metrics(self, train_loss: float) -> dict[str, float]:
        """What an epoch's row says of training (a preference loss has no perplexity)."""
        return {"train_loss": train_loss}


def _totals(features: Sequence[PreferenceFeature]) -> tuple[int, int, int]:
    """(pairs, answers, chosen answer tokens) of a whole batch: each micro-batch's loss is its
    share of the batch's mean over these."""
    pairs = sum(1 for f in features if f.paired)
    answers = sum(len(f.answers) for f in features)
    chosen = sum(len(f.answers[0]) for f in features if f.paired)
    return max(pairs, 1), max(answers, 1), max(chosen, 1)
