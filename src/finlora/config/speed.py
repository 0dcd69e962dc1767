"""The `speed:` section: how a run computes, apart from what it computes."""

from __future__ import annotations

from dataclasses import dataclass

from finlora.config.fields import check_choice, check_positive, fail, opt

ATTENTIONS = ("auto", "eager", "sdpa")


@dataclass
class SpeedConfig:
    """How a run computes: switches of time and memory; loss and scores stay, to float rounding."""

    group_by_length: bool = opt(
        True,
        "Training batches of rows of similar length (sorted within shuffled windows, batch "
        "order shuffled), so little compute goes to padding; false: plain shuffled batches.",
    )
    trim_padding: bool = opt(
        True,
        "Scoring (validation, evaluate, predict) cuts the rows, sorted by length, into batches "
        "where their lengths jump, when that saves more padded tokens than a pass costs.",
    )
    label_logits_only: bool = opt(
        True,
        "The output head only at the positions that predict label (or answer) tokens; "
        "prediction with one-token labels also only for those tokens, whose softmax needs no "
        "vocabulary-wide normalizer. false: the whole head at every position.",
    )
    shared_prompt_scoring: bool = opt(
        True,
        "Labels of several tokens: read each prompt once and continue every label from its "
        "cached keys and values, instead of one (prompt + label) row per label.",
    )
    attention: str = opt(
        "auto",
        "The attention kernel: eager or sdpa. auto: eager on a CPU, where SDPA is slow for "
        "the short sequences of sentence classification; sdpa elsewhere.",
    )
    bf16_frozen_weights: bool = opt(
        True,
        "Under bf16 autocast, store the frozen linear weights in bf16 instead of casting them "
        "at every forward pass (autocast caches casts only for weights that train).",
    )
    bf16_head: bool = opt(
        True,
        "Under bf16 autocast, a frozen output head gets its own bf16 weight (untied from the "
        "fp32 input embeddings) instead of a cast of the whole vocabulary matrix every pass.",
    )
    cast_norms_once: bool = opt(
        False,
        "Under bf16 autocast, scoring casts each norm output to bf16 once instead of once per "
        "projection that reads it (q, k, v; gate, up). Off: with fuse_projections the stacked "
        "matrix multiplies cast once anyway, and alone it measured slower on an AMX CPU.",
    )
    # auto's budgets keep the FPB recipe under 2.5 GB; docs/benchmarks.md has the measurements.
    max_batch_tokens: int | str | None = opt(
        "auto",
        "Padded tokens per forward and backward pass: a longer batch runs as micro-batches "
        "whose gradients add up to the whole batch's (the same update), bounding peak "
        "activation memory. At least 16; null: no bound; auto: 448 in fp32, 512 under bf16.",
    )
    fused_lora: bool = opt(
        True,
        "LoRA layers add B·A·x to the base output inside its matrix multiply (one pass over "
        "the output instead of three). false keeps PEFT's layer; same function and state dict.",
    )
    fused_decoder: bool = opt(
        True,
        "Llama-family decoder layers train as two hand-written autograd operations (attention, "
        "MLP): stacked q/k/v and gate/up matrix multiplies that also compute x·A of every LoRA "
        "layer, each tensor cast once. Layers it does not cover, and compiled ones, keep the "
        "modules' forward.",
    )
    compile: bool = opt(
        False,
        "torch.compile each decoder layer (dynamic shapes), fusing the elementwise work "
        "between matrix multiplies. A minute or more of compiling first; no gain on an fp32 CPU.",
    )
    lean_mlp: bool = opt(
        True,
        "SiLU-gated (Llama-style) MLPs recompute the SiLU in the backward pass instead of "
        "keeping it: about an eighth less activation memory.",
    )
    lean_attention: bool = opt(
        True,
        "Scoring runs Llama-family eager attention in fewer passes over memory: rotary "
        "embedding, mask and softmax in place, no per-head copies of k and v.",
    )
    gradient_checkpointing: bool = opt(
        False,
        "Keep only each layer's input in the forward pass and recompute the rest in the "
        "backward pass: a small fraction of the activation memory, for about a third more "
        "compute.",
    )
    gradient_checkpointing_every: int = opt(
        1,
        "With gradient_checkpointing, recompute only every n-th layer: 2 keeps about half the "
        "memory saving for about half the extra compute.",
    )
    threads: int | None = opt(None, "CPU threads for PyTorch; null: PyTorch's default.")
    merge_for_inference: bool = opt(
        True,
        "Prediction and evaluation fold a LoRA or IA3 adapter into the weights first (fewer "
        "operations); false keeps the adapter layers as trained.",
    )
    fuse_projections: bool = opt(
        True,
        "Prediction and evaluation stack the projections that read one input (q, k, v; gate, "
        "up) into one matrix multiply each, without copying a weight.",
    )
    eval_batch_size: int = opt(32, "Rows per batch when scoring and generating.")

    def validate(self, prefix: str) -> None:
        for name in ("eval_batch_size", "gradient_checkpointing_every"):
            check_positive(f"{prefix}.{name}", getattr(self, name))
        budget = self.max_batch_tokens
        too_small = isinstance(budget, int) and budget < 16
        if too_small or (isinstance(budget, str) and budget != "auto"):
            fail(f"{prefix}.max_batch_tokens", f"must be at least 16, auto or null (got {budget})")
        if self.threads is not None and self.threads <= 0:
            fail(f"{prefix}.threads", f"must be a positive integer or null (got {self.threads})")
        check_choice(f"{prefix}.attention", self.attention, ATTENTIONS)
