"""The records' layout of packed rows (`Segments`): where each record's tokens go, and back."""

from __future__ import annotations

import torch

from finlora.models.fast.segments import Segments

# Two packed rows of 7: records of 3, 2 and 2 tokens; of 4, then padding (a run of its own).
POSITIONS = torch.tensor([[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 0, 1, 2]])


def test_each_record_gets_a_row_padded_to_the_longest() -> None:
    segments = Segments(POSITIONS)
    assert (segments.rows, segments.length) == (5, 4)
    tokens = torch.arange(14.0)[:, None]  # each packed token's own number
    laid_out = segments.laid_out(tokens).view(5, 4)
    real = segments.real.view(5, 4)
    rows = [laid_out[i][real[i]].tolist() for i in range(5)]
    assert rows == [[0, 1, 2], [3, 4], [5, 6], [7, 8, 9, 10], [11, 12, 13]]
    assert real.sum(1).tolist() == [3, 2, 2, 4, 3]


def test_the_way_back_gives_every_token_its_own_slot() -> None:
    segments = Segments(POSITIONS)
    tokens = torch.randn(14, 3)
    assert torch.equal(segments.packed(segments.laid_out(tokens)), tokens)
    grads = segments.laid_out_grad(torch.ones(14, 3))
    assert grads.sum() == 14 * 3  # padding slots carry no gradient
    assert torch.equal(grads[~segments.real], torch.zeros(6, 3))


def test_per_token_values_follow_their_tokens() -> None:
    segments = Segments(POSITIONS)
    cos = POSITIONS[..., None].float().expand(2, 7, 2)  # the rotary tables read the positions
    laid_out = segments.per_token(cos)  # (S, L, 2)
    real = segments.real.view(5, 4)
    for row in range(5):
        n = int(real[row].sum())
        assert laid_out[row, :n, 0].tolist() == list(range(n))  # positions restart per record


def test_the_causal_mask_keeps_padding_behind_every_real_query() -> None:
    mask = Segments(POSITIONS).causal(torch.float32)[0, 0]
    assert mask.shape == (4, 4)
    assert torch.equal(mask.triu(1) < 0, torch.ones(4, 4, dtype=torch.bool).triu(1))
    assert (mask.tril() == 0).all()


def test_only_packed_rows_whose_layout_computes_fewer_scores_take_it() -> None:
    assert Segments.worth_it(None) is None
    assert Segments.worth_it(torch.arange(7)[None]) is None  # one record: nothing to gain
    assert Segments.worth_it(POSITIONS) is not None  # 5·4² scores against 2·7²
    # A 12-token record beside a row of six 2-token ones: 7·12² is more than 2·12².
    uneven = torch.tensor([list(range(12)), [0, 1] * 6])
    assert Segments.worth_it(uneven) is None
