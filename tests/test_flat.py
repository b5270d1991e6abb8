"""FLAT encoder: relative span distances, position fusion and attention against direct transcriptions."""

import math

import pytest
import torch

from nerco_dist.model import flat
from nerco_dist.model.flat import (FlatEncoder, GatheredScores, RelativeMultiHeadAttention, RelativePositionFusion,
                                   RelativePositions, sinusoid_table)


def relative_distances(heads: torch.Tensor, tails: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The paper's four (B, L, L) distances d_hh, d_ht, d_th, d_tt, each ``x_i - y_j``, computed directly:
    the reference for the fusion, which derives them from d_hh and the span widths."""
    h, t = heads.unsqueeze(-1), tails.unsqueeze(-1)
    hT, tT = heads.unsqueeze(-2), tails.unsqueeze(-2)
    return h - hT, h - tT, t - hT, t - tT


def test_reference_relative_distances_on_a_hand_computed_lattice():
    # 南京市长江大桥: characters 0..6, then words 南京市 (0,2), 长江 (3,4), 长江大桥 (3,6)
    heads = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 3, 3]])
    tails = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 2, 4, 6]])
    hh, ht, th, tt = (d[0] for d in relative_distances(heads, tails))
    # token 7 (南京市) against token 9 (长江大桥): h7-h9 = 0-3, h7-t9 = 0-6, t7-h9 = 2-3, t7-t9 = 2-6
    assert (hh[7, 9], ht[7, 9], th[7, 9], tt[7, 9]) == (-3, -6, -1, -4)
    # token 9 against token 7 is the mirror image
    assert (hh[9, 7], ht[9, 7], th[9, 7], tt[9, 7]) == (3, 1, 6, 4)
    # character 4 (江) against word 长江 (3,4): inside the word
    assert (hh[4, 8], ht[4, 8], th[4, 8], tt[4, 8]) == (1, 0, 1, 0)
    # between characters all four distances are i - j
    for d in (hh, ht, th, tt):
        assert torch.equal(d[:7, :7], torch.arange(7)[:, None] - torch.arange(7)[None, :])


def test_sinusoid_table_values():
    table = sinusoid_table(3, 6)
    assert table.shape == (7, 6)
    half = 3
    for d in (-3, 0, 2):
        for k in range(half):
            freq = math.exp(-k * math.log(10000.0) / (half - 1))
            assert table[d + 3, k].item() == pytest.approx(math.sin(d * freq), abs=1e-6)
            assert table[d + 3, half + k].item() == pytest.approx(math.cos(d * freq), abs=1e-6)


def random_lattice(B=3, L=17, n=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    heads = torch.randint(0, n, (B, L), generator=g)
    tails = (heads + torch.randint(0, 4, (B, L), generator=g)).clamp(max=n - 1)
    return heads, tails


@pytest.mark.parametrize("fusion", ["four", "two"])
def test_position_fusion_equals_linear_over_concatenation(fusion):
    torch.manual_seed(0)
    m = RelativePositionFusion(16, fusion).double()
    heads, tails = random_lattice()
    distances = relative_distances(heads, tails)
    if fusion == "two":
        distances = (distances[0], distances[3])
    table = sinusoid_table(40, 16).double()
    expected = torch.relu(m.linear(torch.cat([table[d + 40] for d in distances], dim=-1)))
    torch.testing.assert_close(m(heads, tails).dense(), expected, rtol=0, atol=1e-12)


@torch.no_grad()
def test_attention_equals_transformer_xl_formula():
    torch.manual_seed(0)
    H, nh, dh, B, L = 12, 3, 4, 2, 6
    att = RelativeMultiHeadAttention(H, nh, dh, attn_dropout=0.0).double()
    for p in att.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(B, L, H, dtype=torch.float64)
    rel = torch.randn(B, L, L, H, dtype=torch.float64)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    out = att(x, RelativePositions(rel.reshape(-1, H), torch.arange(B * L * L).view(B, L, L)), mask)
    # direct transcription: A_ij = (q_i + u)·k_j + (q_i + v)·(W_R R_ij + b_R), scaled, masked softmax
    q = att.query(x).view(B, L, nh, dh)
    k = att.key(x).view(B, L, nh, dh)
    v = att.value(x).view(B, L, nh, dh)
    r = att.position(rel).view(B, L, L, nh, dh)
    expected = torch.zeros(B, L, nh * dh, dtype=torch.float64)
    for b in range(B):
        for h in range(nh):
            for i in range(L):
                scores = torch.tensor([((q[b, i, h] + att.u[h]) @ k[b, j, h] + (q[b, i, h] + att.v[h]) @ r[b, i, j, h])
                                       / math.sqrt(dh) if mask[b, j] else -math.inf for j in range(L)])
                p = torch.softmax(scores.double(), 0)
                expected[b, i, h * dh:(h + 1) * dh] = (p[:, None] * v[b, :, h]).sum(0)
    torch.testing.assert_close(out, att.out(expected), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk_bytes", [flat.CHUNK_BYTES, 440, 1000])  # one chunk; one query each; two each
def test_gathered_scores_match_dense_rows_and_their_gradients(monkeypatch, chunk_bytes):
    """The position scores from table rows against the dense product over R (gathered by F.embedding), in
    float64, with gradients; the index repeats rows, as a batch's pairs do."""
    monkeypatch.setattr(flat, "CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(0)
    N, heads, H, L, rows = 7, 3, 5, 11, 13
    query = torch.randn(N, heads, H, dtype=torch.float64, generator=g, requires_grad=True)
    table = torch.randn(rows, H, dtype=torch.float64, generator=g, requires_grad=True)
    index = torch.randint(0, rows, (N, L), generator=g)
    out = GatheredScores.apply(query, table, index)
    expected = query @ torch.nn.functional.embedding(index, table).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=g)
    mine = torch.autograd.grad(out, (query, table), grad)
    reference = torch.autograd.grad(expected, (query, table), grad)
    for a, b in zip(mine, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(GatheredScores.apply, (query, table, index))



def test_padding_does_not_change_outputs():
    torch.manual_seed(0)
    enc = FlatEncoder(hidden=16, heads=2, head_dim=8).eval()
    heads, tails = random_lattice(B=1, L=9, n=6)
    x = torch.randn(1, 9, 16)
    alone = enc(x, heads, tails, torch.ones(1, 9, dtype=torch.bool))
    pad = 5
    padded = enc(torch.cat([x, torch.randn(1, pad, 16)], 1), torch.cat([heads, torch.zeros(1, pad, dtype=torch.long)], 1),
                 torch.cat([tails, torch.zeros(1, pad, dtype=torch.long)], 1),
                 torch.tensor([[True] * 9 + [False] * pad]))
    torch.testing.assert_close(padded[:, :9], alone, rtol=1e-5, atol=1e-5)


def test_residual_connections_are_real():
    """With every sublayer's output weights at zero, a layer is LayerNorm(LayerNorm(x)): the input passes through."""
    enc = FlatEncoder(hidden=8, heads=2, head_dim=4, layers=1).eval()
    layer = enc.layers[0]
    for lin in (layer.attention.out, layer.ff[3]):
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
    x = torch.randn(2, 5, 8)
    heads, tails = random_lattice(B=2, L=5, n=5)
    out = enc(x, heads, tails, torch.ones(2, 5, dtype=torch.bool))
    ln = torch.nn.functional.layer_norm
    torch.testing.assert_close(out, ln(ln(x, (8,)), (8,)), rtol=1e-5, atol=1e-5)
