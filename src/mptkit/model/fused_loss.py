"""Next-token cross-entropy fused with the LM head, chunked over tokens.

``linear_cross_entropy(h, w, labels)`` equals ``F.cross_entropy(F.linear(h, w) * scale, labels)`` (mean over
non-ignored targets) but never holds the (N, V) logits: rows are processed ``chunk`` at a time, and since
the loss is a scalar, the gradients w.r.t. ``h`` and ``w`` are computed in the same pass (softmax minus
one-hot, times the chunk) and only scaled by the incoming gradient in backward. Memory is O(chunk * V)
plus the size of ``h`` and ``w``; FLOPs are those of the plain head (no recomputation).
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_ELEMS = 1 << 25  # logits per chunk (128 MB in fp32)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, labels, scale, ignore_index, chunk):
        n = h.shape[0]
        want_h = ctx.needs_input_grad[0]
        want_w = ctx.needs_input_grad[1]
        valid_all = labels != ignore_index
        count = valid_all.sum()
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if want_h else None
        dw = None  # fp32 (V, d), allocated by the first chunk's matmul
        for s in range(0, n, chunk):
            hc = h[s : s + chunk]
            lc = labels[s : s + chunk]
            vc = valid_all[s : s + chunk]
            logits = torch.matmul(hc, w.t())
            if scale is not None:
                logits = logits.mul_(scale)
            logits = logits.float()
            idx = lc.clamp(min=0).unsqueeze(1)
            tgt = logits.gather(1, idx).squeeze(1)
            # One pass of exp over the chunk: softmax in place, log-sum-exp from its normaliser.
            mx = logits.amax(dim=-1, keepdim=True)
            g = logits.sub_(mx).exp_()
            ssum = g.sum(dim=-1, keepdim=True)
            lse = (mx + torch.log(ssum)).squeeze(1)
            total += ((lse - tgt) * vc).sum()
            if want_h or want_w:
                # d(sum of row losses)/d(pre-scale logits) = (softmax - onehot) * scale on counted rows,
                # in two passes: g * (f / sum), then -f at the target (f = scale on counted rows, else 0).
                f = vc.to(g.dtype).unsqueeze(1)
                if scale is not None:
                    f = f * scale
                g.mul_(f / ssum)
                g.scatter_add_(1, idx, -f)
                g = g.to(w.dtype)
                if want_h:
                    dh[s : s + chunk] = torch.matmul(g, w).to(h.dtype)
                if want_w:
                    if dw is None:
                        dw = torch.matmul(g.t(), hc.to(g.dtype)).float()
                    elif g.dtype == torch.float32 and hc.dtype == torch.float32:
                        dw.addmm_(g.t(), hc)  # in place: no (V, d) temporary per chunk
                    else:
                        dw += torch.matmul(g.t(), hc.to(g.dtype)).float()
                del g
            del logits
        denom = count.clamp(min=1).to(torch.float32)
        if want_w and dw is None:  # no rows
            dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        ctx.save_for_backward(dh if want_h else None, dw if want_w else None, denom)
        ctx.w_dtype = w.dtype
        return total / denom

    @staticmethod
    def backward(ctx, grad):
        dh, dw, denom = ctx.saved_tensors
        f = grad.to(torch.float32) / denom
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
