"""Next-token cross-entropy fused with the LM head, chunked over tokens.

``linear_cross_entropy(h, w, labels)`` equals ``F.cross_entropy(F.linear(h, w) * scale, labels)`` (mean over
non-ignored targets) but never holds the (N, V) logits: rows are processed ``chunk`` at a time, and since
the loss is a scalar, the gradients w.r.t. ``h`` and ``w`` are computed in the same pass (softmax minus
one-hot, times the chunk) and only scaled by the incoming gradient in backward. Memory is O(chunk * V)
plus the size of ``h`` and ``w``; FLOPs are those of the plain head (no recomputation).

Per chunk the (rows, V) work is one matmul into a buffer reused by every chunk (a fresh 100+ MB tensor per
chunk costs page faults that slow the matmul on CPU), one fused in-place softmax, and the two
gradient matmuls. The per-row factors (mean, logit scale, ignored rows) are applied to the small operands
(``h`` rows before ``dW``, ``dh`` rows after), not to the (rows, V) block. The row loss is ``-log p[target]``
from the softmax; a row whose target probability is below ``TINY_PROB`` (where fp32 would lose precision)
gets its log-sum-exp recomputed from its logits instead.
"""

from __future__ import annotations

import math

import torch

DEFAULT_CHUNK_ELEMS = 1 << 25  # logits per chunk (128 MB in fp32)
TINY_PROB = 1e-30  # below this the row loss is recomputed exactly (fp32 denormals start at 1.2e-38)


def _softmax_(x: torch.Tensor) -> torch.Tensor:
    """Row softmax over the last dim, in place (the fused kernel reads each row before writing it)."""
    try:
        return torch.ops.aten._softmax.out(x, -1, False, out=x)
    except (RuntimeError, AttributeError, NotImplementedError):  # pragma: no cover - other builds
        return x.copy_(torch.softmax(x, -1))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, labels, scale, ignore_index, chunk):
        n = h.shape[0]
        vocab = w.shape[0]
        want_h = ctx.needs_input_grad[0]
        want_w = ctx.needs_input_grad[1]
        dev = h.device.type
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype  # matmul dtype
        valid_all = labels != ignore_index
        denom = valid_all.sum().clamp(min=1).to(torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if want_h else None
        dw = None  # fp32 (V, d), allocated by the first chunk's matmul
        n_chunks = max(1, math.ceil(n / chunk))
        rows = max(1, math.ceil(n / n_chunks))  # equal chunks: no small (inefficient) last matmul
        with torch.autocast(device_type=dev, enabled=False):
            wc = w.to(cdt)
            buf = h.new_empty((min(rows, n), vocab), dtype=cdt) if n else None
            pbuf = buf if cdt == torch.float32 or buf is None else torch.empty_like(buf, dtype=torch.float32)
            for s in range(0, n, rows):
                hc = h[s : s + rows]
                m = hc.shape[0]
                vc = valid_all[s : s + rows]
                idx = labels[s : s + rows].clamp(min=0).unsqueeze(1)
                hs = hc.to(cdt) if scale is None else hc.to(cdt) * scale
                logits = torch.matmul(hs, wc.t(), out=buf[:m])
                p = logits if pbuf is buf else pbuf[:m].copy_(logits)
                _softmax_(p)
                pt = p.gather(1, idx).squeeze(1)
                row_loss = -torch.log(pt)
                tiny = (pt < TINY_PROB) & vc
                if bool(tiny.any()):  # rare: recompute these rows' log-sum-exp from their logits
                    sel = tiny.nonzero().squeeze(1)
                    lg = torch.matmul(hs[sel], wc.t()).float()
                    row_loss[sel] = torch.logsumexp(lg, dim=-1) - lg.gather(1, idx[sel]).squeeze(1)
                total += row_loss.masked_fill(~vc, 0.0).sum()  # ignored rows may be inf: where, not *
                if want_h or want_w:
                    # d(loss)/d(h @ w.T) = r * (softmax - onehot), r = scale / denom on counted rows, else 0.
                    p.scatter_add_(1, idx, p.new_full((m, 1), -1.0))
                    r = vc.to(torch.float32) / denom
                    if scale is not None:
                        r = r * scale
                    r = r.unsqueeze(1)
                    g = p if cdt == torch.float32 else buf[:m].copy_(p)
                    if want_h:
                        dhc = dh[s : s + m]
                        if dh.dtype == cdt and dhc.is_contiguous():
                            torch.matmul(g, wc, out=dhc)
                            dhc.mul_(r.to(dh.dtype))
                        else:
                            dhc.copy_(torch.matmul(g, wc).float().mul_(r))
                    if want_w:
                        hr = (hc.float() * r).to(cdt)
                        if dw is None:
                            dw = torch.matmul(g.t(), hr).float()
                        elif cdt == torch.float32:
                            dw.addmm_(g.t(), hr)  # in place: no (V, d) temporary per chunk
                        else:
                            dw += torch.matmul(g.t(), hr).float()
                del logits, p
        if want_w and dw is None:  # no rows
            dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        ctx.save_for_backward(dh if want_h else None, dw if want_w else None)
        ctx.w_dtype = w.dtype
        return total / denom

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors  # already divided by the number of counted rows
        if grad.device.type == "cpu" and float(grad) == 1.0:  # the usual loss.backward(): no extra pass
            return dh, (dw.to(ctx.w_dtype) if dw is not None else None), None, None, None, None
        f = grad.to(torch.float32)
        gh = (dh * f.to(dh.dtype)) if dh is not None else None
        gw = (dw * f).to(ctx.w_dtype) if dw is not None else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    *,
    scale: float | None = None,
    ignore_index: int = -100,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> torch.Tensor:
    """Mean cross-entropy of ``(h @ w.T) * scale`` against ``labels``; h (N, d), w (V, d), labels (N,).

    Rows whose label is ``ignore_index`` do not count; with no counted row the loss is 0.
    """
    chunk = max(1, chunk_elems // max(1, w.shape[0]))
    return _LinearCrossEntropy.apply(h, w, labels, scale, ignore_index, chunk)


def shifted_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(B, T) labels -> (B, T) next-token targets: position t gets labels[t+1], the last gets ignore_index.

    Lets the loss use every position's hidden state without slicing (and so copying) the last one away.
    """
    out = labels.new_full(labels.shape, ignore_index)
    out[:, :-1] = labels[:, 1:]
    return out
