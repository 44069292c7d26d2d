"""The gated cells' pointwise math for the Triton engine (``fastbirnn.reference`` is the spec).

Everything here is elementwise on fp32 tiles; the engine (``gated_kernels``) does the dots,
the time loop, lengths and both directions. Each forward returns, besides the new state,
the four values its backward needs; ``cell_forward`` adds the previous state as a fifth:
the five "saved" slots the engine stores for the backward.

    LSTM (gates i, f, g, o):  c = f c_prev + i g;  h = o tanh(c)       saved i, f, g, o, c_prev
    GRU  (gates r, z, n):     n = tanh(x_n + r hn);  h = (1-z) n + z h  saved r, z, n, hn, h_prev
                              with hn = W_hn h_prev + b_hn (b_hn stays inside r * (...))
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastbirnn.triton.forward import _activation

# Gates per cell, in nn.LSTM's / nn.GRU's order; the kernels' GATES constexpr picks the cell.
GATES = {"lstm": 4, "gru": 3}
# Values per hidden unit and step that the forward saves for the backward (fp32).
SAVED_SLOTS = 5


@triton.jit
def _sigmoid(z):
    # exp(-z) overflows to inf for very negative z, and 1 / inf = 0: no NaN.
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(z):
    return _activation(z, 0)


@triton.jit
def lstm_forward(zi, zf, zg, zo, c_prev):
    i = _sigmoid(zi)
    f = _sigmoid(zf)
    g = _tanh(zg)
    o = _sigmoid(zo)
    c = f * c_prev + i * g
    return o * _tanh(c), c, i, f, g, o


@triton.jit
def lstm_backward(dh, dc, i, f, g, o, c_prev):
    """dh, dc: gradients w.r.t. this step's h and c. Returns the gates' pre-activation
    gradients and the gradient w.r.t. c_prev."""
    tc = _tanh(f * c_prev + i * g)  # recomputed: cheaper than saving a sixth slot
    dc = dc + dh * o * (1.0 - tc * tc)
    dzi = dc * g * i * (1.0 - i)
    dzf = dc * c_prev * f * (1.0 - f)
    dzg = dc * i * (1.0 - g * g)
    dzo = dh * tc * o * (1.0 - o)
    return dzi, dzf, dzg, dzo, dc * f


@triton.jit
def gru_forward(zr, zz, xn, hn, h_prev):
    """zr, zz: pre-activations (input and hidden parts summed); xn: the input part of the
    new gate, hn: its hidden part with b_hn."""
    r = _sigmoid(zr)
    z = _sigmoid(zz)
    n = _tanh(xn + r * hn)
    return (1.0 - z) * n + z * h_prev, r, z, n


@triton.jit
def gru_backward(dh, r, z, n, hn, h_prev):
    """Returns the pre-activation gradients of r, z and of n's input part, the gradient of
    n's hidden part (r * dn: what reaches W_hn and b_hn), and dh_prev's pointwise term."""
    dzn = dh * (1.0 - z) * (1.0 - n * n)
    dzr = dzn * hn * r * (1.0 - r)
    dzz = dh * (h_prev - n) * z * (1.0 - z)
    return dzr, dzz, dzn, dzn * r, dh * z


# ---- one interface for the engine: GATES (constexpr, 4 or 3) picks the cell ---------------


@triton.jit
def cell_forward(a0, a1, a2, a3, h_prev, c_prev, GATES: tl.constexpr):
    """The step from the gate accumulators. LSTM: a0..a3 are i, f, g, o's pre-activations.
    GRU: a0, a1 are r and z's, a2 is n's hidden part (with b_hn), a3 its input part.
    Returns h, c (c_prev for GRU) and the five saved slots."""
    if GATES == 4:
        h, c, i, f, g, o = lstm_forward(a0, a1, a2, a3, c_prev)
        return h, c, i, f, g, o, c_prev
    else:
        h, r, z, n = gru_forward(a0, a1, a3, a2, h_prev)
        return h, c_prev, r, z, n, a2, h_prev


@triton.jit
def cell_backward(dh, dc, s0, s1, s2, s3, s4, GATES: tl.constexpr):
    """From the gradient w.r.t. this step's h (and c) and the saved slots: the gradients of
    the gates' input parts (dz0..dz3; dz3 unused for GRU), of gate 2's hidden part (differs
    from dz2 only for GRU), dh_prev's pointwise term, and dc_prev (dc for GRU)."""
    if GATES == 4:
        dzi, dzf, dzg, dzo, dc_prev = lstm_backward(dh, dc, s0, s1, s2, s3, s4)
        return dzi, dzf, dzg, dzo, dzg, tl.zeros_like(dh), dc_prev
    else:
        dzr, dzz, dzn, dhn, direct = gru_backward(dh, s0, s1, s2, s3, s4)
        return dzr, dzz, dzn, dzn, dhn, direct, dc
