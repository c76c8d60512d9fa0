"""Packing tubes into token-budget batches loses nothing and changes nothing."""
import pytest
import torch

from pipeline.packing import gather_batch, pack_tubes, split_tokens


GRIDS = [(4, 6, 8), (1, 4, 4), (3, 10, 2), (2, 2, 14), (5, 4, 6)]


def test_every_tube_packed_once_within_budget():
    budget = 100
    batches = pack_tubes(GRIDS, budget)
    seen = [(r.item, r.tube) for b in batches for r in b.tubes]
    assert seen == [(i, k) for i, (t, _, _) in enumerate(GRIDS) for k in range(t)]
    for b in batches:
        assert b.patches == sum(r.patches for r in b.tubes)
        assert b.patches <= budget
    # greedy in order: a batch is only closed when the next tube does not fit
    for b, nxt in zip(batches, batches[1:]):
        assert b.patches + nxt.tubes[0].patches > budget


def test_oversized_tube_gets_its_own_batch():
    batches = pack_tubes([(2, 20, 20), (1, 2, 2)], budget=100)
    assert [b.patches for b in batches] == [400, 400, 4]
    assert batches[0].fill_ratio(100) == 4.0


def test_bad_budget():
    with pytest.raises(ValueError, match="budget"):
        pack_tubes(GRIDS, 0)


def test_gather_and_split_round_trip():
    rows = [torch.arange(t * h * w).float().unsqueeze(1) + 1000 * i for i, (t, h, w) in enumerate(GRIDS)]
    pieces = {}
    for b in pack_tubes(GRIDS, budget=90):
        px, grid = gather_batch(b, rows)
        assert px.shape[0] == int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
        assert px.shape[0] == b.patches
        # stand-in for the tower: "merge" every 4 rows by taking the first of each group
        tokens = px[::4]
        for ref, tok in split_tokens(b, tokens):
            pieces[(ref.item, ref.tube)] = tok
    for i, (t, h, w) in enumerate(GRIDS):
        got = torch.cat([pieces[(i, k)] for k in range(t)])
        assert torch.equal(got, rows[i][::4])


def test_split_checks_token_count():
    b = pack_tubes([(1, 4, 4)], 100)[0]
    with pytest.raises(ValueError, match="tokens"):
        split_tokens(b, torch.zeros(3, 8))
