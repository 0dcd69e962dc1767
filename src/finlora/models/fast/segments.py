"""Packed rows' records, one per row, for attention (`train.packing` on the fused path).

A packed row of T tokens holding several records computes, under a block-diagonal mask, the
scores of every token against every other: T x T per row, most of them masked away. Laid out
one record per row (padded to the longest record), attention computes the blocks alone. Only
attention needs that layout: the projections and the MLP act on each token alone, so they stay
on the packed rows, without the padding.

The layout is a gather of the packed rows' tokens and its inverse. A padding slot copies some
real token: a causal mask keeps it from every real query (it comes after them), and what the
padding queries compute is dropped on the way back, so their gradient is zero.
"""

from __future__ import annotations

import torch


class Segments:
    """The records of packed rows (B, T), one per row of a (S, L) layout."""

    def __init__(self, position_ids: torch.Tensor) -> None:
        b, t = position_ids.shape
        flat = position_ids.reshape(-1)
        n = flat.numel()
        # A record starts at each row's first token and wherever the positions restart.
        starts = torch.ones(n, dtype=torch.bool, device=flat.device)
        starts[1:] = flat[1:] != flat[:-1] + 1
        starts[::t] = True
        first = starts.nonzero().squeeze(1)  # (S,) where each record starts
        record = starts.cumsum(0) - 1  # (N,) the record of each token
        lengths = torch.diff(first, append=first.new_tensor([n]))
        self.rows, self.length = int(first.numel()), int(lengths.max())
        self.packed_rows, self.packed_length = b, t
        offset = torch.arange(n, device=flat.device) - first[record]
        # inverse[token]: the token's slot in the layout; index[slot]: the token a slot copies
        # (a padding slot: the record's first token, as good as any).
        self.inverse = record * self.length + offset
        self.index = first.repeat_interleave(self.length)
        self.index[self.inverse] = torch.arange(n, device=flat.device)
        self.real = torch.zeros(self.rows * self.length, dtype=torch.bool, device=flat.device)
        self.real[self.inverse] = True

    @classmethod
    def worth_it(cls, position_ids: torch.Tensor | None) -> Segments | None:
        """The layout when some row is packed and its attention (S·L² scores) costs less than
        the packed rows' (B·T²), else None."""
        if position_ids is None or position_ids.dim() != 2:
            return None
        segments = cls(position_ids)
        if segments.rows == segments.packed_rows:
            return None
        laid_out = segments.rows * segments.length**2
        return segments if laid_out < segments.packed_rows * segments.packed_length**2 else None

    def laid_out(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, C) packed tokens -> (S·L, C), each padding slot a copy of a real token."""
        return tokens.index_select(0, self.index)

    def laid_out_grad(self, grads: torch.Tensor) -> torch.Tensor:
        """(N, C) gradients of packed tokens -> (S·L, C), zero at the padding slots (whose
        outputs nothing reads)."""
        return self.laid_out(grads).mul_(self.real[:, None])

    def per_token(self, x: torch.Tensor) -> torch.Tensor:
        """(B or 1, T, ...), one value per packed token (rotary cos, sin) -> (S, L, ...)."""
        b, t = self.packed_rows, self.packed_length
        flat = x.expand(b, t, *x.shape[2:]).reshape(b * t, *x.shape[2:])
        return flat.index_select(0, self.index).view(self.rows, self.length, *x.shape[2:])

    def packed(self, slots: torch.Tensor) -> torch.Tensor:
        """(S·L, C) -> (N, C): each packed token's slot; the padding slots are left out."""
        return slots.index_select(0, self.inverse)

    def causal(self, dtype: torch.dtype) -> torch.Tensor:
        """(1, 1, L, L) additive causal mask: a record's padding comes after its tokens, so
        causality alone keeps it from them."""
        blocked = torch.ones(self.length, self.length, dtype=torch.bool, device=self.index.device)
        mask = torch.zeros(self.length, self.length, dtype=dtype, device=self.index.device)
        return mask.masked_fill_(blocked.triu_(1), torch.finfo(dtype).min)[None, None]
