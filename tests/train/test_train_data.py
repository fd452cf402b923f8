"""BatchStream reads the sampler's order by position (no per-epoch index list); the batches must be exactly the
sampler's own iteration order, rank by rank, across epoch boundaries, and resume at the exact sample."""

from __future__ import annotations

from mptkit.data.shards import ResumableSampler
from mptkit.train.data import BatchStream


def _expected(n, seed, rank, world, bs, epochs):
    s = ResumableSampler(n, seed=seed, shuffle=True, rank=rank, world_size=world)
    out = []
    for e in range(epochs):
        s.set_epoch(e)
        order = list(iter(s))
        out += [order[i:i + bs] for i in range(0, len(order) - bs + 1, bs)]
    return out


def test_positional_batches_equal_sampler_iteration():
    n, seed, world, bs = 103, 7, 3, 4
    for rank in range(world):
        stream = BatchStream(list(range(n)), ResumableSampler(n, seed=seed, rank=rank, world_size=world), bs)
        want = _expected(n, seed, rank, world, bs, epochs=3)
        got = [stream.next_indices() for _ in range(len(want))]
        assert got == want
        assert stream.epoch == 2


def test_resume_mid_epoch_continues_exactly():
    n, bs = 50, 4
    a = BatchStream(list(range(n)), ResumableSampler(n, seed=1), bs)
    for _ in range(7):
        a.next_indices()
    state = a.state_dict()
    rest_a = [a.next_indices() for _ in range(20)]
    b = BatchStream(list(range(n)), ResumableSampler(n, seed=1), bs)
    b.load_state_dict(state)
    assert [b.next_indices() for _ in range(20)] == rest_a
