"""Flash attention with a fused forward-mode tangent (JVP), for MeanFlow.

Layout `[B, S, H, D]` with arbitrary strides on B, S, H (the last dim must be contiguous),
non-causal, an optional additive bias (`[B, H, S_q, S_k]`, broadcast dims given stride 0) or a
per-key bias `[B, S_k]` (key padding: 0 keep, -inf drop). Softmax in base 2 (`exp2`), fp32
accumulators, one rounding on store.

Forward (+ tangent), one pass over the keys per block of queries, online softmax:
    S = scale * Q K^T + bias,  P = softmax(S),  O = P V,  LSE = logsumexp2(S * log2 e)
    dS = scale * (dQ K^T + Q dK^T)
    dO = P dV + (P o (dS - rowsum(P o dS))) V
With the running max m and the unnormalised p = exp(S - m), the kernel accumulates
    l = sum p,  acc = p V,  g = sum p dS,  acc_t = (p o dS) V + p dV
all rescaled by exp(m_old - m_new) like the primal, and finishes with
    O = acc / l,  dO = acc_t / l - (g / l) O.
Nothing of size S_q x S_k is stored.

Backward of the primal (FA2): delta = rowsum(dO o O) (preprocess kernel), then
    P = exp2(S log2 e - LSE),  dV = P^T dO,  dP = dO V^T,  dS = P o (dP - delta),
    dK = scale dS^T Q,  dQ = scale dS K
in two kernels (one over key blocks for dK, dV; one over query blocks for dQ): no atomics.

Rows whose keys are all masked give O = 0 and dO = 0 (the math reference gives NaN).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

BIAS_NONE, BIAS_FULL, BIAS_KEY = 0, 1, 2


@triton.jit
def _load_bias(Bias, b64, h64, offs_m, cols, m_mask, n_mask, sbb, sbh, sbm, sbn,
               BIAS_KIND: tl.constexpr):
    """The additive bias tile [BLOCK_M, BLOCK_N] in base-2 units (fp32)."""
    if BIAS_KIND == 1:
        ptrs = (Bias + b64 * sbb + h64 * sbh + offs_m[:, None].to(tl.int64) * sbm
                + cols[None, :].to(tl.int64) * sbn)
        bias = tl.load(ptrs, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        return bias.to(tl.float32) * 1.4426950408889634
    else:
        bias = tl.load(Bias + b64 * sbb + cols.to(tl.int64) * sbn, mask=n_mask, other=0.0)
        return bias.to(tl.float32)[None, :] * 1.4426950408889634


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, TQ, TK, TV, Bias, Out, TOut, Lse,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh,
    stqb, stqs, stqh, stkb, stks, stkh, stvb, stvs, stvh,
    sbb, sbh, sbm, sbn,
    sob, sos, soh, stob, stos, stoh,
    H, S_q, S_k, D, qk_scale, sm_scale,
    BIAS_KIND: tl.constexpr, HAS_TANGENT: tl.constexpr, UPCAST: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """O (and dO when HAS_TANGENT) for one block of queries of one (b, h); LSE in base 2."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // H).to(tl.int64)
    h64 = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < S_q
    d_mask = offs_d < D
    rows64 = offs_m[:, None].to(tl.int64)
    md_mask = m_mask[:, None] & d_mask[None, :]

    q = tl.load(Q + b64 * sqb + h64 * sqh + rows64 * sqs + offs_d[None, :], mask=md_mask,
                other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b64 * skb + h64 * skh
    v_base = V + b64 * svb + h64 * svh
    if HAS_TANGENT:
        tq = tl.load(TQ + b64 * stqb + h64 * stqh + rows64 * stqs + offs_d[None, :],
                     mask=md_mask, other=0.0)
        if UPCAST:
            tq = tq.to(tl.float32)
        tk_base = TK + b64 * stkb + h64 * stkh
        tv_base = TV + b64 * stvb + h64 * stvh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_TANGENT:
        g_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_t = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, S_k, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < S_k
        cols64 = cols.to(tl.int64)
        kt_mask = d_mask[:, None] & n_mask[None, :]
        nd_mask = n_mask[:, None] & d_mask[None, :]
        kT = tl.load(k_base + cols64[None, :] * sks + offs_d[:, None], mask=kt_mask, other=0.0)
        v = tl.load(v_base + cols64[:, None] * svs + offs_d[None, :], mask=nd_mask, other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kT, input_precision=PREC) * qk_scale
        if BIAS_KIND != 0:
            s += _load_bias(Bias, b64, h64, offs_m, cols, m_mask, n_mask, sbb, sbh, sbm, sbn,
                            BIAS_KIND)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        if HAS_TANGENT:
            tkT = tl.load(tk_base + cols64[None, :] * stks + offs_d[:, None], mask=kt_mask,
                          other=0.0)
            tv = tl.load(tv_base + cols64[:, None] * stvs + offs_d[None, :], mask=nd_mask,
                         other=0.0)
            if UPCAST:
                tkT = tkT.to(tl.float32)
                tv = tv.to(tl.float32)
            ds = (tl.dot(tq, kT, input_precision=PREC)
                  + tl.dot(q, tkT, input_precision=PREC)) * sm_scale
            pds = p * ds
            g_i = g_i * alpha + tl.sum(pds, 1)
            acc_t = (acc_t * alpha[:, None]
                     + tl.dot(pds.to(v.dtype), v, input_precision=PREC)
                     + tl.dot(p.to(tv.dtype), tv, input_precision=PREC))
        m_i = m_new

    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(Out + b64 * sob + h64 * soh + rows64 * sos + offs_d[None, :],
             o.to(Out.dtype.element_ty), mask=md_mask)
    lse_ptrs = Lse + pid_bh.to(tl.int64) * S_q + offs_m
    tl.store(lse_ptrs, m_fin + tl.math.log2(l_safe), mask=m_mask)
    if HAS_TANGENT:
        to = acc_t / l_safe[:, None] - (g_i / l_safe)[:, None] * o
        tl.store(TOut + b64 * stob + h64 * stoh + rows64 * stos + offs_d[None, :],
                 to.to(TOut.dtype.element_ty), mask=md_mask)


@triton.jit
def _attn_bwd_preprocess(Out, DOut, Delta, sob, sos, soh, sdb, sds, sdh, H, S_q, D,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[b, h, m] = sum_d dO * O (fp32)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // H).to(tl.int64)
    h64 = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < S_q
    msk = m_mask[:, None] & (offs_d < D)[None, :]
    rows64 = offs_m[:, None].to(tl.int64)
    o = tl.load(Out + b64 * sob + h64 * soh + rows64 * sos + offs_d[None, :], mask=msk,
                other=0.0).to(tl.float32)
    do = tl.load(DOut + b64 * sdb + h64 * sdh + rows64 * sds + offs_d[None, :], mask=msk,
                 other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * S_q + offs_m, tl.sum(o * do, 1), mask=m_mask)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, Bias, DOut, Lse, Delta, DK, DV,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sbb, sbh, sbm, sbn, sdb, sds, sdh,
    sgkb, sgks, sgkh, sgvb, sgvs, sgvh,
    H, S_q, S_k, D, qk_scale, sm_scale,
    BIAS_KIND: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV for one block of keys of one (b, h), looping over the query blocks."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // H).to(tl.int64)
    h64 = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < S_k
    d_mask = offs_d < D
    cols64 = offs_n[:, None].to(tl.int64)
    nd_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(K + b64 * skb + h64 * skh + cols64 * sks + offs_d[None, :], mask=nd_mask,
                other=0.0)
    v = tl.load(V + b64 * svb + h64 * svh + cols64 * svs + offs_d[None, :], mask=nd_mask,
                other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_base = Q + b64 * sqb + h64 * sqh
    do_base = DOut + b64 * sdb + h64 * sdh
    row_base = pid_bh.to(tl.int64) * S_q
    for start_m in range(0, S_q, BLOCK_M):
        offs_m = start_m + offs_m0
        m_mask = offs_m < S_q
        rows64 = offs_m.to(tl.int64)
        qT = tl.load(q_base + rows64[None, :] * sqs + offs_d[:, None],
                     mask=d_mask[:, None] & m_mask[None, :], other=0.0)
        do = tl.load(do_base + rows64[:, None] * sds + offs_d[None, :],
                     mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            qT = qT.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(Lse + row_base + offs_m, mask=m_mask, other=0.0)
        delta = tl.load(Delta + row_base + offs_m, mask=m_mask, other=0.0)
        sT = tl.dot(k, qT, input_precision=PREC) * qk_scale
        if BIAS_KIND != 0:
            sT += tl.trans(_load_bias(Bias, b64, h64, offs_m, offs_n, m_mask, n_mask,
                                      sbb, sbh, sbm, sbn, BIAS_KIND))
        pT = tl.math.exp2(sT - lse[None, :])
        pT = tl.where(n_mask[:, None] & m_mask[None, :], pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PREC)
    dk *= sm_scale
    tl.store(DK + b64 * sgkb + h64 * sgkh + cols64 * sgks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + b64 * sgvb + h64 * sgvh + cols64 * sgvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=nd_mask)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, Bias, DOut, Lse, Delta, DQ,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sbb, sbh, sbm, sbn, sdb, sds, sdh,
    sgqb, sgqs, sgqh,
    H, S_q, S_k, D, qk_scale, sm_scale,
    BIAS_KIND: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ for one block of queries of one (b, h), looping over the key blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // H).to(tl.int64)
    h64 = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < S_q
    d_mask = offs_d < D
    rows64 = offs_m[:, None].to(tl.int64)
    md_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + b64 * sqb + h64 * sqh + rows64 * sqs + offs_d[None, :], mask=md_mask,
                other=0.0)
    do = tl.load(DOut + b64 * sdb + h64 * sdh + rows64 * sds + offs_d[None, :], mask=md_mask,
                 other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_base = pid_bh.to(tl.int64) * S_q
    lse = tl.load(Lse + row_base + offs_m, mask=m_mask, other=0.0)
    delta = tl.load(Delta + row_base + offs_m, mask=m_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b64 * skb + h64 * skh
    v_base = V + b64 * svb + h64 * svh
    for start_n in range(0, S_k, BLOCK_N):
        cols = start_n + offs_n0
        n_mask = cols < S_k
        cols64 = cols.to(tl.int64)
        dn_mask = d_mask[:, None] & n_mask[None, :]
        kT = tl.load(k_base + cols64[None, :] * sks + offs_d[:, None], mask=dn_mask, other=0.0)
        vT = tl.load(v_base + cols64[None, :] * svs + offs_d[:, None], mask=dn_mask, other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
            vT = vT.to(tl.float32)
        s = tl.dot(q, kT, input_precision=PREC) * qk_scale
        if BIAS_KIND != 0:
            s += _load_bias(Bias, b64, h64, offs_m, cols, m_mask, n_mask, sbb, sbh, sbm, sbn,
                            BIAS_KIND)
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(m_mask[:, None] & n_mask[None, :], p, 0.0)
        dp = tl.dot(do, vT, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PREC)
    dq *= sm_scale
    tl.store(DQ + b64 * sgqb + h64 * sgqh + rows64 * sgqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=md_mask)


# ---------------------------------------------------------------------------------------------
# host launchers (inputs checked by fmrt.ops; last dim contiguous is ensured here)
# ---------------------------------------------------------------------------------------------

def _interpret() -> bool:
    return not torch.cuda.is_available()


def _lastdim(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _bias_args(bias: Optional[torch.Tensor], kind: int, like: torch.Tensor):
    if kind == BIAS_NONE or bias is None:
        return like, (0, 0, 0, 0)
    if kind == BIAS_FULL:
        return bias, tuple(bias.stride())
    return bias, (bias.stride(0), 0, 0, bias.stride(1))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def fwd_config(D: int, tangent: bool) -> dict:
    """Block sizes: 16 under the interpreter (CPU), real tiles on the GPU."""
    block_d = max(16, triton.next_power_of_2(D))
    if _interpret():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=4, num_stages=1)
    if tangent:
        bm, bn = (64, 64) if block_d <= 64 else (64, 32)
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=4 if block_d <= 64 else 8,
                    num_stages=2 if block_d <= 128 else 1)
    bm, bn = (128, 64) if block_d <= 128 else (64, 32)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=8 if block_d >= 128 else 4,
                num_stages=3 if block_d <= 64 else 2)


def bwd_config(D: int) -> dict:
    block_d = max(16, triton.next_power_of_2(D))
    if _interpret():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=4, num_stages=1)
    b = 64 if block_d <= 128 else 32
    return dict(BLOCK_M=b, BLOCK_N=b, BLOCK_D=block_d, num_warps=4 if block_d <= 64 else 8,
                num_stages=2)


def attention_fwd(q, k, v, bias, bias_kind: int, scale: float, tq=None, tk=None, tv=None):
    """(out, lse[, tangent_out]): out `[B, S_q, H, D]` in q's dtype (contiguous), lse
    `[B, H, S_q]` fp32 in base 2; the tangent when tq, tk, tv (all given) are."""
    q, k, v = _lastdim(q), _lastdim(k), _lastdim(v)
    B, S_q, H, D = q.shape
    S_k = k.shape[1]
    has_t = tq is not None
    out = torch.empty((B, S_q, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, S_q), dtype=torch.float32, device=q.device)
    if has_t:
        tq, tk, tv = (_lastdim(t.to(q.dtype)) for t in (tq, tk, tv))
        tout = torch.empty_like(out)
    else:
        tq, tk, tv, tout = q, k, v, out
    if out.numel() == 0:
        return (out, lse, tout) if has_t else (out, lse)
    bias_t, bstr = _bias_args(bias, bias_kind, q)
    cfg = fwd_config(D, has_t)
    grid = (triton.cdiv(S_q, cfg["BLOCK_M"]), B * H)
    _attn_fwd_kernel[grid](
        q, k, v, tq, tk, tv, bias_t, out, tout, lse,
        *_strides3(q), *_strides3(k), *_strides3(v),
        *_strides3(tq), *_strides3(tk), *_strides3(tv),
        *bstr, *_strides3(out), *_strides3(tout),
        H, S_q, S_k, D, scale * LOG2E, scale,
        BIAS_KIND=bias_kind, HAS_TANGENT=has_t, UPCAST=_interpret() or q.dtype == torch.float32,
        PREC=_precision(q.dtype), **cfg)
    return (out, lse, tout) if has_t else (out, lse)


def attention_bwd(dout, q, k, v, bias, bias_kind: int, out, lse, scale: float):
    """(dq, dk, dv), contiguous, in the inputs' dtypes."""
    q, k, v, out, dout = (_lastdim(t) for t in (q, k, v, out, dout))
    dout = dout.to(q.dtype)
    B, S_q, H, D = q.shape
    S_k = k.shape[1]
    dq = torch.empty((B, S_q, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, S_k, H, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, S_k, H, D), dtype=v.dtype, device=q.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    cfg = bwd_config(D)
    delta = torch.empty((B, H, S_q), dtype=torch.float32, device=q.device)
    _attn_bwd_preprocess[(triton.cdiv(S_q, cfg["BLOCK_M"]), B * H)](
        out, dout, delta, *_strides3(out), *_strides3(dout), H, S_q, D,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"])
    bias_t, bstr = _bias_args(bias, bias_kind, q)
    common = (*_strides3(q), *_strides3(k), *_strides3(v), *bstr, *_strides3(dout))
    flags = dict(BIAS_KIND=bias_kind, UPCAST=_interpret() or q.dtype == torch.float32,
                 PREC=_precision(q.dtype), **cfg)
    _attn_bwd_dkdv[(triton.cdiv(S_k, cfg["BLOCK_N"]), B * H)](
        q, k, v, bias_t, dout, lse, delta, dk, dv, *common, *_strides3(dk), *_strides3(dv),
        H, S_q, S_k, D, scale * LOG2E, scale, **flags)
    _attn_bwd_dq[(triton.cdiv(S_q, cfg["BLOCK_M"]), B * H)](
        q, k, v, bias_t, dout, lse, delta, dq, *common, *_strides3(dq),
        H, S_q, S_k, D, scale * LOG2E, scale, **flags)
    return dq, dk, dv
