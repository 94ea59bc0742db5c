"""Flash attention (non-causal) with a forward-mode tangent, layout `[B, S, H, D]` (any strides).

Forward, per query row (s = scale q k^T + mask, P = softmax(s), never stored):
    O = sum_j p_j v_j / l,   l = sum_j p_j,   p_j = exp(s_j - m) with a running max m.
Forward-mode tangent (HAS_TANGENT), with ds = scale (dq k^T + q dk^T):
    dO = P dV + (P o (ds - rowsum(P o ds))) V
       = (sum_j p_j (dv_j + ds_j v_j)) / l - O (sum_j p_j ds_j) / l,
accumulated in the same pass as O (acc_o = sum p v, acc_t = sum p (dv + ds v), acc_s = sum p ds)
with the same running-max rescaling; nothing of size S_q x S_k is stored. Given the forward's O
and LSE (USE_LSE: what the autograd jvp rule has), p = exp(s - LSE) is already normalised and
the kernel computes only dO = sum p (dv + ds v) - O sum p ds.
Backward (FlashAttention-2): delta = rowsum(dO o O); a kernel over key blocks computes
dV = P^T dO, dK = scale dS^T Q, and a kernel over query blocks computes dQ = scale dS K, with
dS = P o (dO V^T - delta) and P recomputed from the saved log-sum-exp (no atomics).

Masks: an optional boolean key padding mask `[B, S_k]` (True = keep) and an optional mask
broadcastable to `[B, H, S_q, S_k]`, additive (float) or boolean (True = keep), read through
(possibly zero) strides. A row whose keys are all masked gives O = 0, dO = 0 and zero gradients
(the reference gives NaN there). Internally logits are in log2 units (exp2); the saved LSE is
`log2(sum exp2(s log2(e)))`, i.e. the natural LSE times log2(e), fp32 `[B, H, S_q]`.
fp32 accumulation; fp16 / bf16 inputs go to tensor cores as they are (fp32 in the interpreter,
which has no bf16 arithmetic); fp32 inputs use 3xTF32 dots on GPU (about fp32 accuracy; exact
fp32 dots in the interpreter).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MASK_NONE, MASK_ADD, MASK_BOOL = 0, 1, 2


@triton.jit
def _masked_logits(s, b, h, offs_m, offs_n, S_q, S_k,
                   kpm_ptr, kpm_sb, kpm_sn, mask_ptr, m_sb, m_sh, m_sm, m_sn,
                   HAS_KPM: tl.constexpr, MASK_MODE: tl.constexpr, MASKED: tl.constexpr):
    """s (log2 units) [BM, BN] with the masks applied: -inf where a key is dropped. MASKED is
    False when S_k is a multiple of BN and there is no mask (nothing to do: the hot path)."""
    LOG2E_: tl.constexpr = 1.4426950408889634
    if MASKED:
        keep = (offs_n < S_k)[None, :]
        if HAS_KPM:
            kp = tl.load(kpm_ptr + b * kpm_sb + offs_n * kpm_sn, mask=offs_n < S_k, other=0)
            keep = keep & (kp != 0)[None, :]
        if MASK_MODE != 0:
            mptr = (mask_ptr + b * m_sb + h * m_sh + offs_m[:, None] * m_sm
                    + offs_n[None, :] * m_sn)
            inb = (offs_m < S_q)[:, None] & (offs_n < S_k)[None, :]
            if MASK_MODE == 1:
                s = s + tl.load(mptr, mask=inb, other=0.0).to(tl.float32) * LOG2E_
            else:
                keep = keep & (tl.load(mptr, mask=inb, other=0) != 0)
        s = tl.where(keep, s, float("-inf"))
    return s


@triton.jit
def _attn_fwd_kernel(
        q_ptr, k_ptr, v_ptr, tq_ptr, tk_ptr, tv_ptr, o_ptr, to_ptr, lse_ptr,
        kpm_ptr, mask_ptr,
        q_sb, q_ss, q_sh, q_sd, k_sb, k_ss, k_sh, k_sd, v_sb, v_ss, v_sh, v_sd,
        tq_sb, tq_ss, tq_sh, tq_sd, tk_sb, tk_ss, tk_sh, tk_sd, tv_sb, tv_ss, tv_sh, tv_sd,
        o_sb, o_ss, o_sh,
        kpm_sb, kpm_sn, m_sb, m_sh, m_sm, m_sn,
        H, S_q, S_k, D, scale,
        HAS_TANGENT: tl.constexpr, USE_LSE: tl.constexpr, HAS_KPM: tl.constexpr, MASK_MODE: tl.constexpr,
        MASKED: tl.constexpr, F32_DOT: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (i, b*H + h): query rows [i BM, (i+1) BM) of head h of batch b.
    O (and with HAS_TANGENT the tangent dO, see the module docstring) in o's dtype, LSE (log2
    units) fp32. o / to: contiguous `[B, S_q, H, D]` (shared strides). USE_LSE (with
    HAS_TANGENT): O and LSE are the forward's, read, not written; p = exp2(s - LSE) is already
    normalised, so only the tangent is computed: dO = sum p (dv + ds v) - O sum p ds (five
    matmuls per key block instead of six, no rescaling)."""
    LOG2E_: tl.constexpr = 1.4426950408889634
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < S_q
    d_ok = offs_d < D
    qk_scale = scale * LOG2E_

    qrow = offs_m.to(tl.int64)[:, None]
    q = tl.load(q_ptr + b * q_sb + h * q_sh + qrow * q_ss + offs_d[None, :] * q_sd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if F32_DOT:
        q = q.to(tl.float32)
    if HAS_TANGENT:
        tq = tl.load(tq_ptr + b * tq_sb + h * tq_sh + qrow * tq_ss + offs_d[None, :] * tq_sd,
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        tq = tq.to(tl.float32) if F32_DOT else tq.to(q.dtype)

    if USE_LSE:  # the forward's LSE: p comes out normalised, no running max
        m_i = tl.load(lse_ptr + pid_bh * S_q + offs_m, mask=m_ok, other=float("inf"))
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc_o = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_TANGENT:
        acc_t = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        acc_s = tl.zeros([BLOCK_M], tl.float32)

    for n0 in range(0, S_k, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < S_k
        nrow = offs_n.to(tl.int64)[None, :]
        ncol = offs_n.to(tl.int64)[:, None]
        kd_mask = d_ok[:, None] & n_ok[None, :]
        kT = tl.load(k_ptr + b * k_sb + h * k_sh + nrow * k_ss + offs_d[:, None] * k_sd,
                     mask=kd_mask, other=0.0)
        v = tl.load(v_ptr + b * v_sb + h * v_sh + ncol * v_ss + offs_d[None, :] * v_sd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if F32_DOT:
            kT = kT.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kT, input_precision=PREC) * qk_scale
        s = _masked_logits(s, b, h, offs_m, offs_n, S_q, S_k, kpm_ptr, kpm_sb, kpm_sn,
                           mask_ptr, m_sb, m_sh, m_sm, m_sn, HAS_KPM, MASK_MODE, MASKED)
        if USE_LSE:
            p = tl.exp2(s - m_i[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc_o = acc_o * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        if HAS_TANGENT:
            tkT = tl.load(tk_ptr + b * tk_sb + h * tk_sh + nrow * tk_ss + offs_d[:, None] * tk_sd,
                          mask=kd_mask, other=0.0)
            tv = tl.load(tv_ptr + b * tv_sb + h * tv_sh + ncol * tv_ss
                         + offs_d[None, :] * tv_sd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            tkT = tkT.to(kT.dtype)
            tv = tv.to(v.dtype)
            ds = tl.dot(tq, kT, input_precision=PREC)
            ds = tl.dot(q, tkT, ds, input_precision=PREC) * scale
            pds = p * ds
            if USE_LSE:
                acc_s += tl.sum(pds, 1)
                acc_t = tl.dot(p.to(v.dtype), tv, acc_t, input_precision=PREC)
            else:
                acc_s = acc_s * alpha + tl.sum(pds, 1)
                acc_t = acc_t * alpha[:, None] + tl.dot(p.to(v.dtype), tv, input_precision=PREC)
            acc_t = tl.dot(pds.to(v.dtype), v, acc_t, input_precision=PREC)

    optr = b * o_sb + h * o_sh + qrow * o_ss + offs_d[None, :]
    od_mask = m_ok[:, None] & d_ok[None, :]
    if USE_LSE:  # dO = acc_t - O acc_s with the forward's O
        o = tl.load(o_ptr + optr, mask=od_mask, other=0.0).to(tl.float32)
        t = acc_t - o * acc_s[:, None]
        tl.store(to_ptr + optr, t.to(to_ptr.dtype.element_ty), mask=od_mask)
    else:
        empty = l_i == 0.0
        inv_l = 1.0 / tl.where(empty, 1.0, l_i)
        o = acc_o * inv_l[:, None]
        tl.store(o_ptr + optr, o.to(o_ptr.dtype.element_ty), mask=od_mask)
        if HAS_TANGENT:
            t = acc_t * inv_l[:, None] - o * (acc_s * inv_l)[:, None]
            tl.store(to_ptr + optr, t.to(to_ptr.dtype.element_ty), mask=od_mask)
        # fully masked rows: LSE = +inf, so the backward's exp2(s - lse) is 0 there
        lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(lse_ptr + pid_bh * S_q + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, o_sb, o_ss, o_sh, do_sb, do_ss, do_sh,
                           do_sd, H, S_q, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[b, h, m] = sum_d dO[b, m, h, d] O[b, m, h, d] (fp32)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m < S_q)[:, None] & (offs_d < D)[None, :]
    row = offs_m.to(tl.int64)[:, None]
    o = tl.load(o_ptr + b * o_sb + h * o_sh + row * o_ss + offs_d[None, :], mask=msk, other=0.0)
    do = tl.load(do_ptr + b * do_sb + h * do_sh + row * do_ss + offs_d[None, :] * do_sd,
                 mask=msk, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + pid_bh * S_q + offs_m, delta, mask=offs_m < S_q)


@triton.jit
def _attn_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, kpm_ptr, mask_ptr,
        q_sb, q_ss, q_sh, q_sd, k_sb, k_ss, k_sh, k_sd, v_sb, v_ss, v_sh, v_sd,
        do_sb, do_ss, do_sh, do_sd, g_sb, g_ss, g_sh,
        kpm_sb, kpm_sn, m_sb, m_sh, m_sm, m_sn,
        H, S_q, S_k, D, scale,
        HAS_KPM: tl.constexpr, MASK_MODE: tl.constexpr, MASKED: tl.constexpr,
        F32_DOT: tl.constexpr,
        PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr):
    """Program (j, b*H + h): key rows [j BN, (j+1) BN): dV = P^T dO, dK = scale dS^T Q with
    P = exp2(s - lse), dS = P o (dO V^T - delta), looping over all query blocks.
    dk / dv: contiguous `[B, S_k, H, D]` (shared strides g_*)."""
    LOG2E_: tl.constexpr = 1.4426950408889634
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < S_k
    d_ok = offs_d < D
    nd_mask = n_ok[:, None] & d_ok[None, :]
    nrow = offs_n.to(tl.int64)[:, None]
    k = tl.load(k_ptr + b * k_sb + h * k_sh + nrow * k_ss + offs_d[None, :] * k_sd,
                mask=nd_mask, other=0.0)
    v = tl.load(v_ptr + b * v_sb + h * v_sh + nrow * v_ss + offs_d[None, :] * v_sd,
                mask=nd_mask, other=0.0)
    if F32_DOT:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk_scale = scale * LOG2E_
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for m0 in range(0, S_q, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < S_q
        mrow = offs_m.to(tl.int64)[:, None]
        md_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + b * q_sb + h * q_sh + mrow * q_ss + offs_d[None, :] * q_sd,
                    mask=md_mask, other=0.0)
        do = tl.load(do_ptr + b * do_sb + h * do_sh + mrow * do_ss + offs_d[None, :] * do_sd,
                     mask=md_mask, other=0.0)
        if F32_DOT:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        else:
            do = do.to(v.dtype)
        lse = tl.load(lse_ptr + pid_bh * S_q + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(delta_ptr + pid_bh * S_q + offs_m, mask=m_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = _masked_logits(s, b, h, offs_m, offs_n, S_q, S_k, kpm_ptr, kpm_sb, kpm_sn,
                           mask_ptr, m_sb, m_sh, m_sm, m_sn, HAS_KPM, MASK_MODE, MASKED)
        p = tl.exp2(s - lse[:, None])
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PREC)
    gptr = b * g_sb + h * g_sh + nrow * g_ss + offs_d[None, :]
    tl.store(dk_ptr + gptr, (dk * scale).to(dk_ptr.dtype.element_ty), mask=nd_mask)
    tl.store(dv_ptr + gptr, dv.to(dv_ptr.dtype.element_ty), mask=nd_mask)


@triton.jit
def _attn_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, kpm_ptr, mask_ptr,
        q_sb, q_ss, q_sh, q_sd, k_sb, k_ss, k_sh, k_sd, v_sb, v_ss, v_sh, v_sd,
        do_sb, do_ss, do_sh, do_sd, g_sb, g_ss, g_sh,
        kpm_sb, kpm_sn, m_sb, m_sh, m_sm, m_sn,
        H, S_q, S_k, D, scale,
        HAS_KPM: tl.constexpr, MASK_MODE: tl.constexpr, MASKED: tl.constexpr,
        F32_DOT: tl.constexpr,
        PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr):
    """Program (i, b*H + h): query rows [i BM, (i+1) BM): dQ = scale dS K, looping over all key
    blocks. dq: contiguous `[B, S_q, H, D]` (strides g_*)."""
    LOG2E_: tl.constexpr = 1.4426950408889634
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < S_q
    d_ok = offs_d < D
    md_mask = m_ok[:, None] & d_ok[None, :]
    mrow = offs_m.to(tl.int64)[:, None]
    q = tl.load(q_ptr + b * q_sb + h * q_sh + mrow * q_ss + offs_d[None, :] * q_sd,
                mask=md_mask, other=0.0)
    do = tl.load(do_ptr + b * do_sb + h * do_sh + mrow * do_ss + offs_d[None, :] * do_sd,
                 mask=md_mask, other=0.0)
    if F32_DOT:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    else:
        do = do.to(q.dtype)
    lse = tl.load(lse_ptr + pid_bh * S_q + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(delta_ptr + pid_bh * S_q + offs_m, mask=m_ok, other=0.0)
    qk_scale = scale * LOG2E_
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, S_k, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < S_k
        nrow = offs_n.to(tl.int64)[None, :]
        dn_mask = d_ok[:, None] & n_ok[None, :]
        kT = tl.load(k_ptr + b * k_sb + h * k_sh + nrow * k_ss + offs_d[:, None] * k_sd,
                     mask=dn_mask, other=0.0)
        vT = tl.load(v_ptr + b * v_sb + h * v_sh + nrow * v_ss + offs_d[:, None] * v_sd,
                     mask=dn_mask, other=0.0)
        if F32_DOT:
            kT = kT.to(tl.float32)
            vT = vT.to(tl.float32)
        s = tl.dot(q, kT, input_precision=PREC) * qk_scale
        s = _masked_logits(s, b, h, offs_m, offs_n, S_q, S_k, kpm_ptr, kpm_sb, kpm_sn,
                           mask_ptr, m_sb, m_sh, m_sm, m_sn, HAS_KPM, MASK_MODE, MASKED)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, vT, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PREC)
    gptr = b * g_sb + h * g_sh + mrow * g_ss + offs_d[None, :]
    tl.store(dq_ptr + gptr, (dq * scale).to(dq_ptr.dtype.element_ty), mask=md_mask)


# ---------------------------------------------------------------------------------------------
# host launchers (arguments already checked by fmrt.ops)
# ---------------------------------------------------------------------------------------------

def _interpreted(t: torch.Tensor) -> bool:
    return not t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _config(q: torch.Tensor, kind: str):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages, F32_DOT, PREC) for kind "fwd" (primal),
    "jvp" (output + tangent), "tangent" (tangent from the forward's LSE), "dkdv" or "dq". GPU tiles were chosen so that the sm_90 builds of
    the bf16 kernels do not spill registers (checked by compiling for sm_90 ahead of time); they
    are not tuned on a device yet."""
    D = q.shape[-1]
    BD = max(16, triton.next_power_of_2(D))
    f32 = q.dtype == torch.float32
    if _interpreted(q):
        return 16, 16, BD, 4, 1, True, "ieee"
    # fp32: 3xTF32 dots (about fp32 accuracy); "ieee" fp32 dots crash LLVM's SLP vectorizer in
    # triton 3.9 for the jvp kernel on sm_90 (assertion in scheduleBlock) or spill heavily
    prec = "tf32x3" if f32 else "tf32"
    i = 0 if BD <= 64 else (1 if BD <= 128 else 2)
    bm, bn, w, st = {
        "fwd": ((128, 64, 4, 3), (128, 64, 8, 3), (64, 32, 8, 2)),
        "jvp": ((128, 64, 8, 3), (128, 32, 8, 2), (64, 16, 8, 2)),
        "tangent": ((128, 64, 8, 3), (128, 64, 8, 2), (64, 16, 8, 2)),
        "dkdv": ((64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 8, 1)),
        "dq": ((64, 64, 4, 2), (64, 64, 8, 2), (32, 32, 8, 1)),
    }[kind][i]
    if f32:  # fp32 tiles take twice the registers and shared memory: with BLOCK_N 32 at
        # D = 128 the jvp's would need 260 KB of shared memory and the tangent's 224 KB, 3 KB
        # under the H100 / H200's 227 KB per block (checked with benchmarks/aot_compile.py):
        # both take BLOCK_N 16 there, and 4 warps: with 8 both hit an illegal memory access on
        # an H200 under triton 3.6 (benchmarks/gpu_diag_attention.py, results/
        # NVIDIA_H200_diag_attention_fp32_d128.json; 4 warps gave 1e-6 relative error)
        wide_tangent = kind in ("jvp", "tangent") and BD >= 128
        bm = min(bm, 32 if kind == "dkdv" else 64)
        bn, w = min(bn, 16 if wide_tangent else 32), 4 if wide_tangent else 8
    return bm, bn, BD, w, st, f32, prec


def _masked(S_k: int, block_n: int, has_kpm: bool, mode: int) -> bool:
    return S_k % block_n != 0 or has_kpm or mode != MASK_NONE


def _mask_args(q, k, key_padding_mask, mask):
    """(kpm tensor, mask tensor, HAS_KPM, MASK_MODE, kpm strides, mask strides)."""
    B, S_q, H, _ = q.shape
    S_k = k.shape[1]
    kpm_t, kpm_st, has_kpm = q, (0, 0), False
    if key_padding_mask is not None:
        kpm_t = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool \
            else key_padding_mask
        kpm_st, has_kpm = (kpm_t.stride(0), kpm_t.stride(1)), True
    mask_t, mask_st, mode = q, (0, 0, 0, 0), MASK_NONE
    if mask is not None:
        m = mask
        while m.ndim < 4:
            m = m.unsqueeze(0)
        m = m.expand(B, H, S_q, S_k)
        if m.dtype == torch.bool:
            m, mode = m.view(torch.uint8), MASK_BOOL
        else:
            mode = MASK_ADD
        mask_t, mask_st = m, tuple(m.stride())
    return kpm_t, mask_t, has_kpm, mode, kpm_st, mask_st


def attention_fwd(q, k, v, scale: float, key_padding_mask: Optional[torch.Tensor] = None,
                  mask: Optional[torch.Tensor] = None,
                  tangents: Optional[tuple] = None):
    """One pass: (O, tangent or None, LSE); O and the tangent contiguous `[B, S_q, H, D]` in q's
    dtype, LSE fp32 `[B, H, S_q]` (log2 units). tangents: (tq, tk, tv) shaped like q, k, v."""
    B, S_q, H, D = q.shape
    o = torch.empty((B, S_q, H, D), dtype=q.dtype, device=q.device)
    to = torch.empty_like(o) if tangents is not None else None
    lse = torch.empty((B, H, S_q), dtype=torch.float32, device=q.device)
    _launch_fwd(q, k, v, tangents, o, to, lse, False, scale, key_padding_mask, mask)
    return o, to, lse


def attention_tangent(q, k, v, o, lse, tangents: tuple, scale: float,
                      key_padding_mask: Optional[torch.Tensor] = None,
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The output tangent alone, from the forward's O (contiguous) and LSE: contiguous
    `[B, S_q, H, D]` in q's dtype."""
    to = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _launch_fwd(q, k, v, tangents, o, to, lse, True, scale, key_padding_mask, mask)
    return to


def _launch_fwd(q, k, v, tangents, o, to, lse, use_lse: bool, scale, key_padding_mask, mask):
    B, S_q, H, D = q.shape
    S_k = k.shape[1]
    has_t = tangents is not None
    kind = "tangent" if use_lse else ("jvp" if has_t else "fwd")
    BM, BN, BD, warps, stages, f32, prec = _config(q, kind)
    tq, tk, tv = tangents if has_t else (q, k, v)
    kpm_t, mask_t, has_kpm, mode, kpm_st, mask_st = _mask_args(q, k, key_padding_mask, mask)
    grid = (triton.cdiv(S_q, BM), B * H)
    _attn_fwd_kernel[grid](
        q, k, v, tq, tk, tv, o, to if has_t else o, lse, kpm_t, mask_t,
        *q.stride(), *k.stride(), *v.stride(), *tq.stride(), *tk.stride(), *tv.stride(),
        o.stride(0), o.stride(1), o.stride(2), *kpm_st, *mask_st,
        H, S_q, S_k, D, float(scale),
        HAS_TANGENT=has_t, USE_LSE=use_lse, HAS_KPM=has_kpm, MASK_MODE=mode,
        MASKED=_masked(S_k, BN, has_kpm, mode), F32_DOT=f32, PREC=prec,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, num_warps=warps, num_stages=stages)


def attention_bwd(do, q, k, v, o, lse, scale: float,
                  key_padding_mask: Optional[torch.Tensor] = None,
                  mask: Optional[torch.Tensor] = None):
    """FlashAttention-2 backward: (dQ, dK, dV), contiguous, in the dtypes of q, k, v.
    o: the forward's contiguous output; lse: its LSE; do: any strides."""
    B, S_q, H, D = q.shape
    S_k = k.shape[1]
    delta = torch.empty((B, H, S_q), dtype=torch.float32, device=q.device)
    BD = max(16, triton.next_power_of_2(D))
    BMD = 16 if _interpreted(q) else 64
    _attn_bwd_delta_kernel[(triton.cdiv(S_q, BMD), B * H)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), *do.stride(), H, S_q, D,
        BLOCK_M=BMD, BLOCK_D=BD)
    dq = torch.empty((B, S_q, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, S_k, H, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, S_k, H, D), dtype=v.dtype, device=q.device)
    kpm_t, mask_t, has_kpm, mode, kpm_st, mask_st = _mask_args(q, k, key_padding_mask, mask)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    for kind in ("dkdv", "dq"):
        BM, BN, BD, warps, stages, f32, prec = _config(q, kind)
        common = dict(HAS_KPM=has_kpm, MASK_MODE=mode, MASKED=_masked(S_k, BN, has_kpm, mode),
                      F32_DOT=f32, PREC=prec, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
                      num_warps=warps, num_stages=stages)
        if kind == "dkdv":
            _attn_bwd_dkdv_kernel[(triton.cdiv(S_k, BN), B * H)](
                q, k, v, do, lse, delta, dk, dv, kpm_t, mask_t, *strides,
                dk.stride(0), dk.stride(1), dk.stride(2), *kpm_st, *mask_st,
                H, S_q, S_k, D, float(scale), **common)
        else:
            _attn_bwd_dq_kernel[(triton.cdiv(S_q, BM), B * H)](
                q, k, v, do, lse, delta, dq, kpm_t, mask_t, *strides,
                dq.stride(0), dq.stride(1), dq.stride(2), *kpm_st, *mask_st,
                H, S_q, S_k, D, float(scale), **common)
    return dq, dk, dv
