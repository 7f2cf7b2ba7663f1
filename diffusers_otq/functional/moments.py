"""Input second moments of Linear/Conv2d layers, accumulated without storing activations.

A layer computes ``y = W x`` on *input rows* ``x`` of length ``n`` (the row view of its weight): the last
dimension of a Linear input, or for a Conv2d one unfolded patch ``(in/groups) * kh * kw`` per output position
and group. :func:`input_rows` produces those rows; :func:`accumulate_moments` adds their weighted statistics

    sum_x[g, j]   += w * sum_rows x_j,      sum_sq[g, j] += w * sum_rows x_j^2,      count += w * rows
    gram[i][g]    += w * sum_rows x_[a_i:b_i]^T x_[a_i:b_i]      (diagonal blocks of X^T X)
    gram_sum[g]   += w * sum_rows x,         gram_count += w * rows   (over the rows the Gram used)

to float64 accumulators in place (the first moments give the layer's mean input, for bias correction and the
input covariance). The Gram blocks use at most ``max_rows`` rows per call, taken with a fixed
stride and an offset that rotates with a call counter, so the result is a pure function of the inputs and the
call order. Every sum is computed in float32 per call and added in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


__all__ = [
    "ConvGeometry",
    "InputMoments",
    "NonFiniteInput",
    "accumulate_moments",
    "gram_block_sizes",
    "input_moments",
    "input_rows",
]

_UNFOLD_ELEMENTS = 1 << 24  # unfold at most this many values at once (bounds the scratch of a conv)


class NonFiniteInput(ValueError):
    """A layer input holds NaN or Inf values."""


@dataclass(frozen=True)
class ConvGeometry:
    """What :func:`input_rows` needs of an ``nn.Conv2d`` (its constructor arguments)."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    groups: int
    padding_mode: str = "zeros"
    reversed_padding: tuple[int, ...] = ()


def gram_block_sizes(width: int, max_block: int) -> list[int]:
    """Sizes of the diagonal Gram blocks of an input of ``width``: one block up to ``max_block``, else equal
    blocks of at most ``max_block`` (3072 with 2048 -> [1536, 1536]; 12288 with 2048 -> 6 x 2048)."""
    if width <= max_block:
        return [width]
    count = -(-width // max_block)
    base, extra = divmod(width, count)
    return [base + 1] * extra + [base] * (count - extra)


def input_rows(x: torch.Tensor, in_features: int, conv: ConvGeometry | None = None) -> torch.Tensor:
    """(G, N, n) float32 input rows of a Linear (G = 1) or a Conv2d (G = groups) fed with ``x``.

    Args:
        x: the layer's input: (..., in_features) for a Linear, (B, C, H, W) or (C, H, W) for a Conv2d.
        in_features: ``n`` for a Linear; ignored for a conv (n = C / groups * kh * kw).
        conv: the conv's geometry, or None for a Linear.
    """
    if conv is None:
        return x.detach().reshape(1, -1, in_features).to(torch.float32)
    x = x.detach().to(torch.float32)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    padding = conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv.reversed_padding, mode=conv.padding_mode)
        padding = (0, 0)
    elif isinstance(padding, str):  # "same"/"valid": reuse the conv's own padding amounts
        x = F.pad(x, conv.reversed_padding) if padding == "same" else x
        padding = (0, 0)
    batch, channels = x.shape[:2]
    per_item = channels * conv.kernel_size[0] * conv.kernel_size[1] * max(1, x.shape[2] * x.shape[3])
    step = max(1, _UNFOLD_ELEMENTS // per_item)
    parts = []
    for start in range(0, batch, step):
        cols = F.unfold(x[start : start + step], conv.kernel_size, conv.dilation, padding, conv.stride)  # (b, C*k, L)
        b, width, positions = cols.shape
        cols = cols.view(b, conv.groups, width // conv.groups, positions)
        parts.append(cols.permute(1, 0, 3, 2).reshape(conv.groups, b * positions, width // conv.groups))
    return torch.cat(parts, dim=1)


def _padded(x: torch.Tensor, conv: ConvGeometry) -> torch.Tensor:
    """(B, C, H', W') float32 input with the conv's padding applied explicitly."""
    x = x.detach().to(torch.float32)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if conv.padding_mode != "zeros":
        return F.pad(x, conv.reversed_padding, mode=conv.padding_mode)
    if isinstance(conv.padding, str):
        return F.pad(x, conv.reversed_padding) if conv.padding == "same" else x
    ph, pw = conv.padding
    return F.pad(x, (pw, pw, ph, ph)) if ph or pw else x


def _conv_moments(xp: torch.Tensor, conv: ConvGeometry) -> tuple[torch.Tensor, torch.Tensor, int, tuple[int, int]]:
    """Per-patch-element sums over every output position, without unfolding.

    Returns:
        ``(sum_x (G, n), sum_sq (G, n), positions, (Ho, Wo))`` with ``n = C / G * kh * kw`` in unfold order.
    """
    batch, channels, height, width = xp.shape
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    out_h = (height - dh * (kh - 1) - 1) // sh + 1
    out_w = (width - dw * (kw - 1) - 1) // sw + 1
    images = xp.sum(dim=0)  # (C, H', W'): the batch sum commutes with every window sum
    squared = xp.square().sum(dim=0)
    sums = xp.new_zeros(channels, kh, kw)
    squares = xp.new_zeros(channels, kh, kw)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + sh * (out_h - 1) + 1, sh)
            cols = slice(j * dw, j * dw + sw * (out_w - 1) + 1, sw)
            sums[:, i, j] = images[:, rows, cols].sum(dim=(1, 2))
            squares[:, i, j] = squared[:, rows, cols].sum(dim=(1, 2))
    shape = (conv.groups, channels // conv.groups * kh * kw)
    return sums.reshape(shape), squares.reshape(shape), batch * out_h * out_w, (out_h, out_w)


def _conv_patches(
    xp: torch.Tensor, conv: ConvGeometry, index: torch.Tensor, out_w: int, per_item: int
) -> torch.Tensor:
    """(G, N, n) unfolded patches of the output positions ``index`` (flat over batch, rows, columns)."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    item, rest = index // per_item, index % per_item
    top, left = (rest // out_w) * sh, (rest % out_w) * sw
    rows = top[:, None] + torch.arange(kh, device=xp.device) * dh  # (N, kh)
    cols = left[:, None] + torch.arange(kw, device=xp.device) * dw  # (N, kw)
    patches = xp[item[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (N, kh, kw, C)
    n, channels = patches.shape[0], patches.shape[-1]
    patches = patches.permute(0, 3, 1, 2).reshape(n, conv.groups, channels // conv.groups * kh * kw)
    return patches.transpose(0, 1)


@dataclass(frozen=True)
class InputMoments:
    """The unweighted statistics of one layer input, ready to be added to any number of accumulators.

    Layers fed with the same tensor (an attention's query, key and value projections) share one
    :func:`input_moments`; each adds it with :meth:`add_to`. ``sums``/``squares`` are (G, n) float32 sums over
    all ``total`` rows; the Gram part covers ``rows_used`` of them: ``scatters`` are the float32 diagonal blocks
    (G, b, b) of ``sum (x - m)(x - m)^T`` about the float32 ``shift`` m (G, n), and ``row_sum`` (G, n) float64 is
    ``sum x`` over those rows (None when no Gram was asked for).
    """

    sums: torch.Tensor
    squares: torch.Tensor
    total: int
    scatters: tuple[torch.Tensor, ...] | None = None
    shift: torch.Tensor | None = None
    row_sum: torch.Tensor | None = None
    rows_used: int = 0

    def add_to(
        self,
        weight: float,
        sum_x: torch.Tensor,
        sum_sq: torch.Tensor,
        count: torch.Tensor,
        gram: Sequence[torch.Tensor] | None,
        gram_sum: torch.Tensor,
        gram_count: torch.Tensor,
    ) -> None:
        """Add ``weight`` times these statistics to the float64 accumulators, in place (see
        :func:`accumulate_moments` for the fields).

        The Gram blocks get ``sum x x^T = S + s m^T + m s^T - N m m^T`` (S the scatter about m, s the row sum):
        the float32 scatter is well conditioned, and the shift back is one rank-3 float64 update per block.
        """
        if weight == 0 or self.total == 0:
            return
        sum_x.add_(self.sums, alpha=weight)
        sum_sq.add_(self.squares, alpha=weight)
        count += weight * self.total
        if gram is None or self.scatters is None:
            return
        assert self.shift is not None and self.row_sum is not None
        shift = self.shift.to(torch.float64)
        start = 0
        for block, scatter in zip(gram, self.scatters, strict=True):
            width = scatter.shape[-1]
            m, s = shift[:, start : start + width], self.row_sum[:, start : start + width]
            left = torch.stack([s, m, m], dim=2)  # (G, b, 3)
            right = torch.stack([m, s, -self.rows_used * m], dim=1)  # (G, 3, b)
            block.add_(scatter, alpha=weight)
            block.baddbmm_(left, right, alpha=weight)
            start += width
        gram_sum.add_(self.row_sum, alpha=weight)
        gram_count += weight * self.rows_used


def input_moments(
    x: torch.Tensor,
    in_features: int,
    conv: ConvGeometry | None,
    gram_blocks: Sequence[int] | None,
    max_rows: int,
    call_index: int,
) -> InputMoments:
    """The statistics of one layer input ``x`` (see :class:`InputMoments`), computed once.

    Args:
        x: the layer's input ((..., in_features) for a Linear, (B, C, H, W) for a Conv2d).
        in_features: ``n`` of a Linear (ignored for a conv).
        conv: the conv's geometry, or None for a Linear.
        gram_blocks: diagonal Gram block sizes (summing to n), or None to skip the Gram.
        max_rows: at most this many rows enter the Gram (every ``ceil(rows / max_rows)``-th row).
        call_index: rotates the offset of that stride, so successive calls use different rows.

    Raises:
        NonFiniteInput: ``x`` holds NaN or Inf.
    """
    if conv is None:
        rows = x.detach().reshape(-1, in_features).to(torch.float32)
        total = rows.shape[0]
        sums, squares = rows.sum(dim=0, keepdim=True), rows.square().sum(dim=0, keepdim=True)
    else:
        xp = _padded(x, conv)
        sums, squares, total, (_, out_w) = _conv_moments(xp, conv)
    if total and not bool(torch.isfinite(squares).all()):  # NaN or Inf anywhere in x reaches its sum of squares
        raise NonFiniteInput("the input holds NaN or Inf values")
    if gram_blocks is None or total == 0:
        return InputMoments(sums, squares, total)
    stride = -(-total // max_rows)
    index = torch.arange(call_index % stride, total, stride, device=x.device)
    if conv is None:
        subset = rows[index].unsqueeze(0)  # (1, N, n)
    else:
        subset = _conv_patches(xp, conv, index, out_w, total // xp.shape[0])
    # Scatter about the call's own mean (float32, well conditioned); InputMoments.add_to shifts it back in
    # float64. Accumulating x x^T in float32 directly would lose the covariance to cancellation when the mean
    # dominates.
    row_sum = subset.sum(dim=1, dtype=torch.float64)  # (G, n)
    shift = (row_sum / subset.shape[1]).to(torch.float32)  # (G, n)
    centred = subset - shift[:, None, :]
    scatters, start = [], 0
    for width in gram_blocks:
        part = centred[:, :, start : start + width]
        scatters.append(torch.bmm(part.transpose(1, 2), part))
        start += width
    return InputMoments(sums, squares, total, tuple(scatters), shift, row_sum, subset.shape[1])


def accumulate_moments(
    x: torch.Tensor,
    in_features: int,
    conv: ConvGeometry | None,
    weight: float,
    sum_x: torch.Tensor,
    sum_sq: torch.Tensor,
    count: torch.Tensor,
    gram: Sequence[torch.Tensor] | None,
    gram_sum: torch.Tensor,
    gram_count: torch.Tensor,
    max_rows: int,
    call_index: int,
) -> None:
    """Add the weighted statistics of one layer input ``x`` to the float64 accumulators, in place.

    The result equals accumulating over :func:`input_rows` (the tests check it), but a conv's input is never
    unfolded as a whole: its moments are sums over shifted windows, and only the Gram's rows are gathered.
    Equivalent to ``input_moments(...).add_to(...)``.

    Args:
        x, in_features, conv, max_rows, call_index: as for :func:`input_moments`.
        weight: weight of this call (e.g. a timestep weight); 0 adds nothing.
        sum_x: (G, n) float64, += weight * sum over rows of x.
        sum_sq: (G, n) float64, += weight * sum over rows of x^2.
        count: () float64, += weight * rows.
        gram: diagonal blocks (G, b_i, b_i) float64 with sum b_i = n, or None to skip the Gram.
        gram_sum: (G, n) float64, += weight * sum of the rows used for the Gram.
        gram_count: () float64, += weight * (rows used for the Gram).

    Raises:
        NonFiniteInput: ``x`` holds NaN or Inf values (nothing is added).
    """
    if weight == 0:
        return
    blocks = None if gram is None else [block.shape[-1] for block in gram]
    moments = input_moments(x, in_features, conv, blocks, max_rows, call_index)
    moments.add_to(weight, sum_x, sum_sq, count, gram, gram_sum, gram_count)
