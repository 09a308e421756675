"""kerasrt's Triton kernels, at module level so that Inductor can compile them into a graph.

An op's CUDA kernel launches them directly; when AOTInductor traces an engine for a package
it sees them through ``torch.library.wrap_triton`` (``op_library.inlining_kernels``) and
compiles them with the rest of the engine: the package holds their machine code, and a
loading process compiles nothing. Inductor finds a kernel's helpers by name among this module's
globals, which is why no kernel here is a closure.

Importing this module needs Triton; ``op_library.triton_kernels()`` returns None without it.
Activation codes are indices into ``conv_spec.ACTIVATIONS`` ("none", "relu", "clamp",
"silu", "gelu", "gelu_tanh"; convolutions use the first four, which cuDNN's graphs fuse
too); ``LO``/``HI`` bound "clamp". They
are constexpr, not arguments: an AOTInductor compile types a Python float argument as
float64, and float64 clamps made MobileNetV2's kernels 5-30% slower in a package.
"""

import triton
import triton.language as tl

# shapes vary per layer: specializing on them (== 1, % 16) would compile a kernel per layer
_SPLITK_VARYING = ("M", "N", "H", "W", "OH", "OW", "S", "stride_h", "stride_w", "pad_h", "pad_w", "steps")


@triton.jit
def bias_activation(
    acc,
    b_ptr,
    channel,
    channel_ok,
    LO: tl.constexpr,
    HI: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
):
    """acc with bias and activation applied (channels on the accumulator's last axis)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + channel, mask=channel_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = tl.maximum(acc, 0.0)
    elif ACT == 2:
        acc = tl.minimum(tl.maximum(acc, LO), HI)
    elif ACT == 3:
        acc = acc / (1.0 + tl.exp(-acc))
    elif ACT == 4:  # GELU, exact: x * Phi(x)
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACT == 5:  # GELU, tanh approximation: x * sigmoid(2 * sqrt(2 / pi) * (x + 0.044715 x^3))
        acc = acc / (1.0 + tl.exp(-1.5957691216057308 * (acc + 0.044715 * acc * acc * acc)))
    return acc


@triton.jit
def finish_tile(
    acc, rows, channels, rows_ok, channels_ok, N, b_ptr, r_ptr, y_ptr,
    LO: tl.constexpr, HI: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
):  # fmt: skip
    """Adds the residual, applies bias and activation and stores one (pixels x channels) tile
    of a channels-last output with ``N`` channels."""
    out = rows.to(tl.int64)[:, None] * N + channels[None, :]
    ok = rows_ok[:, None] & channels_ok[None, :]
    if HAS_RES:
        acc += tl.load(r_ptr + out, mask=ok, other=0.0).to(tl.float32)
    acc = bias_activation(acc, b_ptr, channels, channels_ok, LO, HI, HAS_BIAS, ACT)
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The (rows, columns) of this program's tile of an (M x N) output, on a 1-D grid: programs
    walk GROUP_M row blocks per column block, so the input rows they share stay in L2."""
    pid = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def pointwise(
    x_ptr, w_ptr, b_ptr, r_ptr, y_ptr,
    M, N, K,  # the product (M x K) @ (K x N): pixels, output channels, input channels
    LO: tl.constexpr, HI: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """act(x @ w^T + residual + bias) over channels-last pixels: ``pointwise_conv``."""
    rm, rn = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m_ok, n_ok = rm < M, rn < N
    rows = rm.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a = tl.load(x_ptr + rows[:, None] * K + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + rn[None, :] * K + rk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc)
    finish_tile(acc, rows, rn, m_ok, n_ok, N, b_ptr, r_ptr, y_ptr, LO, HI, HAS_BIAS, HAS_RES, ACT)


@triton.jit(do_not_specialize=("M", "OH", "OW", "H2", "W2", "stride_h", "stride_w"))
def dual(
    h_ptr, w_ptr, x_ptr, ws_ptr, b_ptr, y_ptr,
    M, N, K1, K2, OH, OW, H2, W2, stride_h, stride_w,
    LO: tl.constexpr, HI: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """act(h @ w^T + x[strided] @ ws^T + bias) in one accumulator: ``dual_conv``."""
    # (M x (K1 + K2)) @ ((K1 + K2) x N): h's pixel rows, then x's at the shortcut's stride
    rm, rn = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    rows = rm.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K1, BLOCK_K):
        a = tl.load(h_ptr + rows[:, None] * K1 + (k0 + rk)[None, :], mask=m_ok[:, None], other=0.0)
        b = tl.load(w_ptr + rn[None, :] * K1 + (k0 + rk)[:, None], mask=n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
    ow = rm % OW
    oh = (rm // OW) % OH
    rows2 = ((rm // (OW * OH)).to(tl.int64) * H2 + oh * stride_h) * W2 + ow * stride_w
    for k0 in range(0, K2, BLOCK_K):
        a = tl.load(x_ptr + rows2[:, None] * K2 + (k0 + rk)[None, :], mask=m_ok[:, None], other=0.0)
        b = tl.load(ws_ptr + rn[None, :] * K2 + (k0 + rk)[:, None], mask=n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
    finish_tile(acc, rows, rn, m_ok, n_ok, N, b_ptr, y_ptr, y_ptr, LO, HI, HAS_BIAS, False, ACT)


@triton.jit(do_not_specialize=("M", "OH", "OW", "H2", "W2", "stride_h", "stride_w"))
def pair(
    x_ptr, w1_ptr, s_ptr, ws_ptr, b1_ptr, r_ptr, y_ptr, w2_ptr, b2_ptr,
    M, C, C2, N1, N2, OH, OW, H2, W2, stride_h, stride_w,
    LO1: tl.constexpr, HI1: tl.constexpr, HAS_B1: tl.constexpr, HAS_RES: tl.constexpr, ACT1: tl.constexpr,
    LO2: tl.constexpr, HI2: tl.constexpr, HAS_B2: tl.constexpr, ACT2: tl.constexpr, HAS_SHORTCUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_C2: tl.constexpr,
    BLOCK_N2: tl.constexpr,
):  # fmt: skip
    """y = act1(x @ w1^T [+ shortcut[strided] @ ws^T] + residual + b1), then act2(y @ w2^T +
    b2) stored over x (C == N2): ``pointwise_pair``. Each program loads its rows of x (and of
    the shortcut) once, before anything is stored, and writes the same rows of x back: no
    other program reads them."""
    # y made BLOCK_N channels at a time: each chunk stored, and multiplied into z's product at once
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    rows = rm.to(tl.int64)
    rc = tl.arange(0, BLOCK_C)
    r2 = tl.arange(0, BLOCK_N2)
    c_ok, n2_ok = rc < C, r2 < N2
    a = tl.load(x_ptr + rows[:, None] * C + rc[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0)
    if HAS_SHORTCUT:  # the projection's input pixels, at its stride
        rs = tl.arange(0, BLOCK_C2)
        s_ok = rs < C2
        ow = rm % OW
        oh = (rm // OW) % OH
        rows2 = ((rm // (OW * OH)).to(tl.int64) * H2 + oh * stride_h) * W2 + ow * stride_w
        a2 = tl.load(s_ptr + rows2[:, None] * C2 + rs[None, :], mask=m_ok[:, None] & s_ok[None, :], other=0.0)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N2), dtype=tl.float32)
    for n0 in range(0, N1, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < N1
        w1 = tl.load(w1_ptr + rn[None, :] * C + rc[:, None], mask=n_ok[None, :] & c_ok[:, None], other=0.0)
        acc1 = tl.dot(a, w1)
        if HAS_SHORTCUT:
            ws = tl.load(
                ws_ptr + rn[None, :] * C2 + rs[:, None], mask=n_ok[None, :] & s_ok[:, None], other=0.0
            )
            acc1 = tl.dot(a2, ws, acc1)
        out = rows[:, None] * N1 + rn[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        if HAS_RES:
            acc1 += tl.load(r_ptr + out, mask=ok, other=0.0).to(tl.float32)
        y = bias_activation(acc1, b1_ptr, rn, n_ok, LO1, HI1, HAS_B1, ACT1).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + out, y, mask=ok)
        w2 = tl.load(w2_ptr + r2[None, :] * N1 + rn[:, None], mask=n2_ok[None, :] & n_ok[:, None], other=0.0)
        acc2 = tl.dot(y, w2, acc2)
    finish_tile(acc2, rows, r2, m_ok, n2_ok, N2, b2_ptr, x_ptr, x_ptr, LO2, HI2, HAS_B2, False, ACT2)


@triton.jit(do_not_specialize=_SPLITK_VARYING)
def splitk(
    x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, part_ptr, count_ptr,
    M, N, C, H, W, OH, OW, S, stride_h, stride_w, pad_h, pad_w, steps,
    LO: tl.constexpr, HI: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """An implicit-GEMM convolution whose reduction is split over programs: ``splitk_conv``."""
    # (M output pixels x R*S*C) @ (R*S*C x N): reduction step k covers channels
    # [c0, c0 + BLOCK_K) of window tap k*BLOCK_K // C; program_id(2) takes its share of steps
    pid_m, pid_n, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    ow = rm % OW
    oh = (rm // OW) % OH
    ih0 = oh * stride_h - pad_h  # the window's top-left input pixel, per output pixel
    iw0 = ow * stride_w - pad_w
    corner = ((rm // (OW * OH)).to(tl.int64) * H + ih0) * W + iw0
    reduction = steps * BLOCK_K
    weights = w_ptr + rn.to(tl.int64)[None, :] * reduction + rk[:, None]
    share = tl.cdiv(steps, SPLIT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, share):  # a loop from 0 with a fixed trip count: Triton pipelines it
        step = part * share + i
        k0 = step * BLOCK_K
        tap = k0 // C
        dh = tap // S
        dw = tap - dh * S
        ih, iw = ih0 + dh, iw0 + dw
        ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & (step < steps)
        shift = (dh * W + dw) * C + k0 - tap * C
        a = tl.load(x_ptr + (corner * C + shift)[:, None] + rk[None, :], mask=ok[:, None], other=0.0)
        b = tl.load(weights + k0, mask=n_ok[None, :] & (step < steps), other=0.0)
        acc = tl.dot(a, b, acc)
    if SPLIT > 1:
        tile = pid_m * tl.num_programs(1) + pid_n
        local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(part_ptr + (tile * SPLIT + part) * (BLOCK_M * BLOCK_N) + local, acc)
        tl.debug_barrier()  # every thread's partial is written before the tile's counter moves
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:  # the last program of the tile finishes it
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for other in tl.static_range(SPLIT):  # unrolled: the loads go out together
                partial = part_ptr + (tile * SPLIT + other) * (BLOCK_M * BLOCK_N) + local
                acc += tl.load(partial, cache_modifier=".cg")
            tl.store(count_ptr + tile, 0)
            finish_tile(acc, rm, rn, m_ok, n_ok, N, b_ptr, r_ptr, y_ptr, LO, HI, HAS_BIAS, HAS_RES, ACT)
    else:
        finish_tile(acc, rm, rn, m_ok, n_ok, N, b_ptr, r_ptr, y_ptr, LO, HI, HAS_BIAS, HAS_RES, ACT)


@triton.jit
def stem(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, H, W, OH, OW, N,  # M output pixels, N output channels
    C: tl.constexpr, R: tl.constexpr, S: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    LO: tl.constexpr, HI: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """A convolution over few input channels, one window row per reduction step: ``stem_conv``."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    ow = rm % OW
    oh = (rm // OW) % OH
    image = (rm // (OW * OH)).to(tl.int64)
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    rk = tl.arange(0, BLOCK_K)  # (window column, channel) of one window row, flattened
    k_ok = rk < S * C
    iw = iw0[:, None] + (rk // C)[None, :]
    col_ok = m_ok[:, None] & k_ok[None, :] & (iw >= 0) & (iw < W)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in tl.static_range(R):
        ih = ih0 + r
        row = ((image * H + ih) * W + iw0) * C
        ok = col_ok & ((ih >= 0) & (ih < H))[:, None]
        a = tl.load(x_ptr + row[:, None] + rk[None, :], mask=ok, other=0.0)
        b = tl.load(
            w_ptr + rn[None, :] * (R * S * C) + r * S * C + rk[:, None],
            mask=n_ok[None, :] & k_ok[:, None],
            other=0.0,
        )
        acc = tl.dot(a, b, acc)
    acc = bias_activation(acc, b_ptr, rn, n_ok, LO, HI, HAS_BIAS, ACT)
    out = rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def depthwise_tiles(
    x_ptr, w_ptr, b_ptr, y_ptr,
    NP, C, H, W, OH, OW,
    sxn, sxh, sxw, syn, syh, syw,
    K: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_T: tl.constexpr, PAD_L: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """A depthwise convolution over (pixels x channels) tiles: ``depthwise_conv``."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok, c_ok = p < NP, c < C
    n = (p // (OH * OW)).to(tl.int64)
    oh = (p // OW) % OH
    ow = p % OW
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in tl.static_range(K):
        ih = oh * STRIDE_H - PAD_T + kh
        for kw in tl.static_range(K):
            iw = ow * STRIDE_W - PAD_L + kw
            inside = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            rows = n * sxn + ih * sxh + iw * sxw
            xv = tl.load(x_ptr + rows[:, None] + c[None, :], mask=inside[:, None] & c_ok[None, :], other=0.0)
            wv = tl.load(w_ptr + c * (K * K) + kh * K + kw, mask=c_ok, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    acc = bias_activation(acc, b_ptr, c, c_ok, LO, HI, HAS_BIAS, ACT)
    out = n * syn + oh * syh + ow * syw
    tl.store(
        y_ptr + out[:, None] + c[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=p_ok[:, None] & c_ok[None, :],
    )


@triton.jit
def depthwise_rows(
    x_ptr, w_ptr, b_ptr, y_ptr,
    H, W, OH, OW, ROW_BLOCKS, sxn, sxh, syn, syh,
    C: tl.constexpr, K: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_T: tl.constexpr, PAD_L: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """A depthwise convolution over rows of flattened (column, channel) elements: ``depthwise_conv``."""
    pid = tl.program_id(0)
    n = (pid // ROW_BLOCKS).to(tl.int64)
    oh = (pid % ROW_BLOCKS) * ROWS + tl.arange(0, ROWS)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ow = j // C
    c = j % C
    row_ok, col_ok = oh < OH, ow < OW
    x_img = x_ptr + n * sxn
    acc = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    for kh in tl.static_range(K):
        ih = oh * STRIDE_H - PAD_T + kh
        h_ok = row_ok & (ih >= 0) & (ih < H)
        for kw in tl.static_range(K):
            iw = ow * STRIDE_W - PAD_L + kw
            w_ok = col_ok & (iw >= 0) & (iw < W)
            wv = tl.load(w_ptr + c * (K * K) + (kh * K + kw), mask=col_ok, other=0.0)
            xv = tl.load(
                x_img + ih[:, None] * sxh + (iw * C + c)[None, :],
                mask=h_ok[:, None] & w_ok[None, :],
                other=0.0,
            )
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    acc = bias_activation(acc, b_ptr, c, col_ok, LO, HI, HAS_BIAS, ACT)
    tl.store(
        y_ptr + n * syn + oh[:, None] * syh + j[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )
