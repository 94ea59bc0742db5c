"""fmrt.distill.TeacherVelocity: the guided velocity by hand (per-sample interval, null rows,
embedding conditions, an autoguidance guide), no gradients, and bad input."""
import pytest
import torch
from torch import nn

from fmrt.distill import TeacherVelocity

NULL = 4


class Toy(nn.Module):
    """v(z, t | c) = a[c] z + t (c: labels, NULL the unconditional one) or z * mean(c) + t
    (embeddings); records its calls."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.25, 3.0], dtype=torch.float64))
        self.calls = []

    def forward(self, z, t, c):
        self.calls.append((z.shape[0], torch.is_grad_enabled()))
        tt = t.view(-1, *([1] * (z.ndim - 1)))
        if c is None:
            return z + tt
        if c.dtype == torch.long:
            return self.a[c].view_as(tt) * z + tt
        return z * c.flatten(1).mean(1).view_as(tt) + tt


def case():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 2, 3, dtype=torch.float64, generator=g)
    t = torch.tensor([0.9, 0.6, 0.3, 0.0, 0.45], dtype=torch.float64)
    c = torch.tensor([0, 1, 2, NULL, 3])
    return z, t, c


def hand(m, z, t, c, s, lo=0.0, hi=1.0):
    out = []
    for i in range(z.shape[0]):
        vc = m.a[c[i]] * z[i] + t[i]
        vu = m.a[NULL] * z[i] + t[i]
        g = s if lo <= float(t[i]) <= hi else 1.0
        out.append(vu if int(c[i]) == NULL else vu + g * (vc - vu))
    return torch.stack(out).detach()


@pytest.mark.parametrize("s,interval", [(2.0, None), (2.0, (0.0, 0.6)), (0.0, (0.3, 0.45)),
                                        (3.5, (0.6, 0.6))])
def test_guided_velocity_by_hand(s, interval):
    m = Toy()
    z, t, c = case()
    tv = TeacherVelocity(m, guidance_scale=s, interval=interval, null_class=NULL)
    got = tv(z, t, c)
    lo, hi = interval or (0.0, 1.0)
    torch.testing.assert_close(got, hand(m, z, t, c, s, lo, hi).float(), rtol=1e-6, atol=1e-6)
    assert got.dtype == torch.float32 and not got.requires_grad
    assert m.calls == [(10, False)]       # one batched call (cond + uncond), no gradients


def test_interval_bounds_are_inclusive_and_null_rows_are_exact():
    m = Toy()
    z, t, c = case()
    tv = TeacherVelocity(m, guidance_scale=2.0, interval=(0.3, 0.6), null_class=NULL)
    got = tv(z, t, c)
    # t = 0.6 and 0.3 (on the bounds) are guided, 0.9 is not (conditional velocity)
    torch.testing.assert_close(got[0], (m.a[0] * z[0] + t[0]).float().detach())
    for i in (1, 2):
        vc, vu = m.a[c[i]] * z[i] + t[i], m.a[NULL] * z[i] + t[i]
        torch.testing.assert_close(got[i], (vu + 2 * (vc - vu)).float().detach())
    assert torch.equal(got[3], (m.a[NULL] * z[3] + t[3]).float().detach())


def test_scale_one_or_no_condition_is_one_plain_call():
    m = Toy()
    z, t, c = case()
    out = TeacherVelocity(m, guidance_scale=1.0, null_class=NULL)(z, t, c)
    assert torch.equal(out, m(z, t, c).detach()) and m.calls[0] == (5, False)
    out = TeacherVelocity(m, guidance_scale=2.0)(z, t, None)
    assert torch.equal(out, (z + t.view(-1, 1, 1)))


def test_embedding_conditions_use_zeros_as_uncond():
    m = Toy()
    z, t, _ = case()
    e = torch.randn(5, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    e[2] = 0.0                                     # an already-unconditional row
    got = TeacherVelocity(m, guidance_scale=3.0)(z, t, e)
    vu = (t.view(-1, 1, 1)).expand_as(z)
    vc = z * e.flatten(1).mean(1).view(-1, 1, 1) + t.view(-1, 1, 1)
    want = vu + 3.0 * (vc - vu)
    want[2] = vu[2]
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)


class Weak(Toy):
    """A guide: v(z, t | c) = b[c] z + 2 t."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.25, 1.0, -0.5, 0.75, 1.5], dtype=torch.float64))

    def forward(self, z, t, c):
        return super().forward(z, t, c) + t.view(-1, *([1] * (z.ndim - 1)))


@pytest.mark.parametrize("s,interval", [(2.0, None), (3.0, (0.3, 0.6)), (0.0, None)])
def test_autoguided_velocity_by_hand(s, interval):
    """With a guide: g + s (v - g) per row, the guide called with the same classes (no null
    branch: a row with the null label is guided like any other), s only inside the interval."""
    m, w = Toy(), Weak()
    z, t, c = case()
    got = TeacherVelocity(m, guidance_scale=s, interval=interval, guide=w)(z, t, c)
    lo, hi = interval or (0.0, 1.0)
    want = []
    for i in range(5):
        v = m.a[c[i]] * z[i] + t[i]
        g = w.a[c[i]] * z[i] + 2 * t[i]
        k = s if lo <= float(t[i]) <= hi else 1.0
        want.append(g + k * (v - g))
    torch.testing.assert_close(got, torch.stack(want).detach().float(), rtol=1e-6, atol=1e-6)
    assert got.dtype == torch.float32 and not got.requires_grad
    assert m.calls == [(5, False)] and w.calls == [(5, False)]
    # scale 1 is the teacher alone: the guide is not called
    w.calls.clear()
    out = TeacherVelocity(m, guidance_scale=1.0, guide=w)(z, t, c)
    assert torch.equal(out, m(z, t, c).detach()) and w.calls == []


def test_bad_input():
    m = Toy()
    with pytest.raises(TypeError, match="callable"):
        TeacherVelocity(3)
    with pytest.raises(ValueError, match="guidance_scale"):
        TeacherVelocity(m, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        TeacherVelocity(m, guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="guidance_interval"):
        TeacherVelocity(m, interval=(0.7, 0.2))
    z, t, c = case()
    with pytest.raises(ValueError, match="null_class"):
        TeacherVelocity(m, guidance_scale=2.0)(z, t, c)
    from fmrt.models.dit import DiT, DiTConfig
    mf = DiT(DiTConfig.preset("tiny", dim=32, num_layers=1, num_heads=2, ffn_dim=64, freq_dim=32,
                              num_classes=2, meanflow=True))
    with pytest.raises(ValueError, match="MeanFlow"):
        TeacherVelocity(mf)
    with pytest.raises(ValueError, match="guide must be a flow-matching"):
        TeacherVelocity(m, guidance_scale=2.0, guide=mf)
    with pytest.raises(TypeError, match="guide must be callable"):
        TeacherVelocity(m, guidance_scale=2.0, guide=3)
