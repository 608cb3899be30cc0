"""The sampler's counter-based noise: finite everywhere, uniform, and no two (seed, position) pairs or tokens sharing
it. The frequency checks of test_sampling.py see the noise only through a few thousand draws; these look at the
hash itself."""
import math

import torch

from lmdp.engine.sampler import gumbel_from_bits, gumbel_noise, row_key


def test_every_hash_value_gives_finite_noise_in_order():
    """The top cell once rounded to u = 1 in float32: +inf noise, which wins a draw whatever the filters said."""
    g = gumbel_from_bits(torch.arange(1 << 23, dtype=torch.long) << 9)
    assert torch.isfinite(g).all()
    assert (g[1:] > g[:-1]).all() and g[0] < -2.5 and g[-1] > 16     # -log(-log(u)), u strictly inside (0, 1)
    # the low 9 bits are dropped: they never move the noise
    assert torch.equal(gumbel_from_bits(torch.tensor([0x12345600, 0x123457FF])),
                       gumbel_from_bits(torch.tensor([0x12345600, 0x12345600])))


def test_row_keys_are_distinct_and_their_bits_balanced():
    pairs = [(seed, n) for seed in (0, 1, 2, 7, 2 ** 40, 2 ** 40 + 1, 2 ** 62 + 5) for n in range(512)]
    keys = torch.tensor([row_key(seed, n) for seed, n in pairs])
    assert keys.unique().numel() == len(pairs) and (keys >= 0).all() and (keys < 2 ** 32).all()
    bits = torch.stack([(keys >> b) & 1 for b in range(32)]).float().mean(1)
    assert ((bits - 0.5).abs() < 0.05).all(), bits      # 3584 keys: a fair bit is within 0.05 of 1/2 (6 sigma)


def test_noise_is_uniform_and_unshared_across_tokens_and_positions():
    keys = torch.tensor([row_key(3, n) for n in range(256)])
    g = gumbel_noise(keys, torch.arange(1024)[None])
    u = torch.exp(-torch.exp(-g.double())).flatten()
    n, bins = u.numel(), 256
    counts = torch.bincount((u * bins).long().clamp(max=bins - 1), minlength=bins).double()
    chi2 = ((counts - n / bins) ** 2 / (n / bins)).sum().item()
    # chi-square with 255 degrees of freedom: mean 255, sd 22.6; 400 is beyond 6 sd
    assert chi2 < 400, chi2
    # 262144 draws of 23 bits: about 4000 values repeat by chance, far fewer than a weak hash repeats
    assert u.unique().numel() > n - 8000
    # neighbouring tokens and positions do not move together
    centred = u.view(256, 1024) - 0.5
    for a, b in ((centred[:, 1:], centred[:, :-1]), (centred[1:], centred[:-1])):
        corr = (a * b).mean() / (a * a).mean()
        assert abs(corr.item()) < 6 / math.sqrt(a.numel()), corr


def test_the_noise_stream_is_pinned():
    """A seeded request repeats across versions too: the keys and the noise of a few (seed, position, token)
    triples are written down here, so a change to either hash (a constant, a shift, an operator) shows up as a
    failure, not as every seeded user's outputs quietly changing."""
    pairs = [(0, 0), (1, 0), (0, 1), (7, 3), (2 ** 63 - 1, 0), (2 ** 63 - 1, 4095), (123456789, 2 ** 20)]
    assert [row_key(s, n) for s, n in pairs] == [1054058087, 3300504729, 915188374, 3970084045, 980908197,
                                                 248875914, 2479940421]
    keys = torch.tensor([row_key(s, n) for s, n in pairs[:3]])
    expected = torch.tensor([[0.29175794, 0.69100159, 1.27580881, 1.29399657],
                             [0.61493146, 5.64287424, 2.53506541, -0.09836466],
                             [1.22481823, 1.47869146, 0.62178814, 0.17929491]])
    assert torch.allclose(gumbel_noise(keys, torch.tensor([[0, 1, 2, 151935]])), expected, rtol=0, atol=1e-6)


def test_noise_is_minus_log_minus_log_of_the_cell_centre():
    """Each 32-bit value's top 23 bits pick a cell of (0, 1); the noise is -log(-log(u)) at the cell's centre."""
    g = torch.Generator().manual_seed(0)
    bits = torch.cat([torch.randint(0, 2 ** 32, (4096,), generator=g), torch.tensor([0, 511, 512, 2 ** 32 - 1])])
    u = ((bits // 512).double() + 0.5) / 2 ** 23
    expected = -torch.log(-torch.log(u))
    assert torch.allclose(gumbel_from_bits(bits).double(), expected, rtol=1e-6, atol=1e-6)


def test_a_row_of_nan_logits_still_draws_a_real_token_id():
    """A broken model's NaN logits must not make the sampler return vocab_size (an id past the embedding table,
    which on the GPU is a device-side assert that takes every request down)."""
    import torch

    from lmdp.engine.sampler import Sampler
    from lmdp.engine.sequence import SamplingParams, Sequence
    vocab = 64
    sampler = Sampler(vocab, torch.device('cpu'))
    logits = torch.randn(3, vocab)
    logits[0] = float('nan')
    logits[1, 7] = float('nan')
    params = [SamplingParams(max_new_tokens=4, greedy=False, temperature=1.0, top_k=k, seed=1) for k in (0, 0, 5)]
    seqs = [Sequence(i, [1, 2, 3], 3, p) for i, p in enumerate(params)]
    tokens, _ = sampler(logits, sampler.prepare(seqs))
    assert ((tokens >= 0) & (tokens < vocab)).all(), tokens
    assert tokens[1] == 7          # the NaN is the row's maximum, as argmax takes it
