"""Pixel-adaptive refinement (PAR), AFA paper Sec. 3.4, Eqs. 8-10, as in the authors' code.

Resolution (authors' ``wetr/PAR.py``): the *masks* are first resized to the *images'* size
(bilinear, ``align_corners=True``) and refinement runs at the images' resolution, so the
output has the images' H x W whatever the masks' size. (Callers choose the resolution by the
size of the images they pass: AFA passes images at half the crop size.)

For every pixel, the neighbourhood N is the 8-way ring at each dilation in
``dilations`` (default (1, 2, 4, 8, 12, 24) -> 48 neighbours), with replicate padding at the
borders. The kernel over the 48 neighbours is

    k_rgb(n) = mean_rgb( -( |I_n - I| / (std_48(I_n) + 1e-8) / w1 )^2 )       (Eq. 8, image)
    k_pos(n) = -( pos_n / (std_48(pos) + 1e-8) / w1 )^2                          (Eq. 8, position)
    kappa(n) = softmax_48(k_rgb)(n) + w2 * softmax_48(k_pos)(n)                   (Eq. 9)

with ``std_48`` the unbiased standard deviation over the neighbours (per pixel and channel
for the image) and ``pos_n`` the neighbour's distance (d on the axes, d*sqrt(2) on the
diagonals). The masks are then iterated ``num_iter`` times:

    M_t(p) = sum_n kappa(p, n) * M_{t-1}(nbr_n(p))                                (Eq. 10)

with no renormalisation: the kernel's mass is 1 + w2, so a constant mask grows by that factor
per iteration. Code vs paper: the paper writes separate smoothness factors for the two
terms (w1, w2) and a weight w3; the code uses w1 in both terms and names the weight w2. Both
use 0.3 for the smoothness, so ``w_pos=None`` (= w1) matches either.

Two implementations with identical results:

* :class:`PAR` (fast, used everywhere): the kernel is computed once per call (all n
  neighbours in one gather from the replicate-padded image, with indices that depend only
  on the size and are cached) and can be shared by several maps of the same image
  (:meth:`PAR.prepare` / :meth:`PAR.apply`); Eq. 10 is a sparse matrix (n entries per pixel,
  columns in the replicate-padded grid) applied ``num_iter`` times with a CSR product: no
  (B, K, n, H, W) neighbour tensor, no convolutions, the output written once per
  iteration. ``impl="gather"`` reads the same n neighbours per pixel with one index gather
  from the padded masks and sums them weighted, a handful of kernel launches per iteration
  (the (B, K, H*W, n) neighbour tensor is materialised: memory for launches).
  ``impl="slice"`` accumulates the n shifted views of the padded masks instead, n launches
  per iteration. ``impl="auto"`` (default) picks the sparse product on CPU (the slices when
  gradients are needed there) and the gather on GPU, where the slices' ~500 launches per
  call left the device idle most of an AFA step (measured on an H200, AFA README).
* :func:`reference_par`: the straightforward formulation (per iteration, replicate-pad per
  dilation and gather neighbours with a fixed one-hot dilated convolution, stack the 48
  neighbours, multiply by the kernel and sum). Kept for tests and as the benchmark baseline
  (``benchmarks/perf_par.py``).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_DILATIONS: tuple[int, ...] = (1, 2, 4, 8, 12, 24)

# The 8-way ring in row-major order of the 3x3 window without its centre: (dy, dx) unit steps.
RING: tuple[tuple[int, int], ...] = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """The (dy, dx) offsets of the neighbourhood: the ring at each dilation, dilation-major."""
    return [(dy * d, dx * d) for d in dilations for dy, dx in RING]


def neighbour_distances(dilations: Sequence[int]) -> torch.Tensor:
    """(n,) Euclidean distance of each neighbour: d on the axes, d*sqrt(2) on the diagonals."""
    return torch.tensor([math.hypot(dy, dx) for dy, dx in neighbour_offsets(dilations)], dtype=torch.float32)


def position_kernel(dilations: Sequence[int], w: float) -> torch.Tensor:
    """(n,) softmax over the neighbours of ``-(pos / (std(pos) + 1e-8) / w)^2`` (Eq. 8/9,
    position term). Constant over pixels, since every pixel has the same neighbour set."""
    pos = neighbour_distances(dilations)
    logits = -((pos / (pos.std() + 1e-8) / w) ** 2)
    return logits.softmax(0)


@dataclass(frozen=True)
class _CSRStructure:
    crow: torch.Tensor  # (HW + 1,) row pointers: n entries per pixel
    cols: torch.Tensor  # (HW * n,) padded-grid column of each entry, sorted within a row
    order: torch.Tensor  # (n,) neighbour index (offset order) of each entry slot of a row
    pad_index: torch.Tensor  # (Hp * Wp,) source pixel of each padded-grid cell (replicate)
    padded_size: int
    pad: int


@functools.lru_cache(maxsize=32)
def _padded_csr_structure(
    H: int, W: int, offsets: tuple[tuple[int, int], ...], device: torch.device
) -> _CSRStructure:
    """Index structure of the PAR operator on an (H, W) grid; depends only on the shape.

    Row = pixel, column = a cell of the grid replicate-padded by the largest offset. A
    neighbour's column is ``base(pixel) + dy * Wp + dx``: monotone in ``dy * Wp + dx``, so
    sorting the offsets once gives sorted, distinct columns in every row (a valid CSR matrix
    with exactly n entries per row, built without any per-call sort)."""
    p = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    Hp, Wp = H + 2 * p, W + 2 * p
    flat = torch.tensor([dy * Wp + dx for dy, dx in offsets], dtype=torch.int64)
    shift, order = flat.sort()
    base = ((torch.arange(H) + p).view(H, 1) * Wp + (torch.arange(W) + p).view(1, W)).reshape(-1)
    cols = (base[:, None] + shift[None]).reshape(-1)
    crow = torch.arange(0, H * W * len(offsets) + 1, len(offsets), dtype=torch.int64)
    ys = (torch.arange(Hp) - p).clamp(0, H - 1)
    xs = (torch.arange(Wp) - p).clamp(0, W - 1)
    pad_index = (ys.view(-1, 1) * W + xs.view(1, -1)).reshape(-1)
    return _CSRStructure(
        crow.to(device), cols.to(device), order.to(device), pad_index.to(device), Hp * Wp, p
    )


@dataclass
class PARKernel:
    """The Eq. 9 kernel of a batch of images at one size, ready to refine any number of maps
    of that size (:meth:`PAR.apply`). ``values`` (B, H*W, n): per pixel, its n neighbours'
    weights in the entry order of the CSR structure (neighbours sorted by padded column)."""

    values: torch.Tensor
    structure: _CSRStructure
    size: tuple[int, int]

    def dense(self) -> torch.Tensor:
        """(B, n, H, W) in the offset order of :func:`neighbour_offsets`."""
        B, _, n = self.values.shape
        inverse = torch.empty_like(self.structure.order)
        inverse[self.structure.order] = torch.arange(n, device=inverse.device)
        return self.values[..., inverse].permute(0, 2, 1).reshape(B, n, *self.size)


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The authors' first step of PAR: masks (B, K, h, w) -> (B, K, *size), bilinear with
    ``align_corners=True`` (corner pixels map onto corner pixels); unchanged if already
    that size."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks, size=tuple(size), mode="bilinear", align_corners=True)


class PAR(nn.Module):
    """Pixel-adaptive refinement (Eqs. 8-10); fast implementation, see the module docstring.

    ``forward(images, masks)``: ``images`` (B, 3, H, W) in [0, 1], ``masks`` (B, K, h, w) of
    any size, resized to (H, W) (bilinear, ``align_corners=True``, as the authors' code) ->
    refined masks (B, K, H, W) at the images' size. To refine several maps on the same
    images, compute the kernel once with :meth:`prepare` and call :meth:`apply` per map. No
    parameters."""

    def __init__(
        self,
        dilations: Sequence[int] = DEFAULT_DILATIONS,
        num_iter: int = 10,
        w1: float = 0.3,
        w2: float = 0.01,
        w_pos: float | None = None,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if impl not in ("auto", "sparse", "slice", "gather"):
            raise ValueError(f"PAR impl must be 'auto', 'sparse', 'slice' or 'gather', not {impl!r}")
        self.impl = impl
        self.dilations = tuple(int(d) for d in dilations)
        self.offsets = tuple(neighbour_offsets(self.dilations))
        # The CSR entry order within a row: offsets by (dy, dx), whatever the image size.
        self._sorted_offsets = sorted(self.offsets)
        self.num_iter = int(num_iter)
        self.w1, self.w2 = float(w1), float(w2)
        self.w_pos = float(w1 if w_pos is None else w_pos)
        self.register_buffer("pos_kernel", position_kernel(self.dilations, self.w_pos), persistent=False)

    def extra_repr(self) -> str:
        return f"dilations={self.dilations}, num_iter={self.num_iter}, w1={self.w1}, w2={self.w2}, w_pos={self.w_pos}, impl={self.impl!r}"

    def prepare(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> PARKernel:
        """Eq. 8-9 kernel for images (B, 3, H, W) in [0, 1], at their own size (the size every
        map refined with it is brought to). One gather of all n neighbours from the padded
        image."""
        images = images.to(dtype)
        B, C, H, W = images.shape
        st = _padded_csr_structure(H, W, self.offsets, images.device)
        p = st.pad
        padded = F.pad(images, (p, p, p, p), mode="replicate")
        # Neighbours in CSR entry order (offsets sorted by padded column = by (dy, dx)).
        nbr = torch.stack([padded[..., p + dy : p + dy + H, p + dx : p + dx + W] for dy, dx in self._sorted_offsets], 2)
        n = nbr.shape[2]
        # Unbiased std over the neighbours per pixel and channel (code), in two passes.
        std = (nbr - nbr.mean(2, keepdim=True)).square_().sum(2, keepdim=True).div_(n - 1).sqrt_()
        diff = (nbr - images.unsqueeze(2)).abs_().div_(std + 1e-8)
        logits = diff.square_().mean(1).div_(-(self.w1**2))  # (B, n, H, W)
        pos = self.pos_kernel.to(device=images.device, dtype=dtype)[st.order].view(1, n, 1, 1)
        kernel = logits.softmax(1).add_(pos, alpha=self.w2)
        values = kernel.permute(0, 2, 3, 1).reshape(B, H * W, n)
        return PARKernel(values, st, (H, W))

    def kernel(self, images: torch.Tensor) -> torch.Tensor:
        """Eq. 9 kernel (B, n, H, W) (offset order) of images (B, 3, H, W)."""
        return self.prepare(images).dense()

    def apply(self, kernel: PARKernel, masks: torch.Tensor) -> torch.Tensor:
        """Eq. 10, ``num_iter`` times, on masks (B, K, h, w): resized to the kernel's (H, W)
        first (:func:`resize_masks`) -> (B, K, H, W)."""
        masks = resize_masks(masks, kernel.size)
        needs_grad = torch.is_grad_enabled() and (masks.requires_grad or kernel.values.requires_grad)
        # auto: the CSR product on CPU (cache-friendly); on accelerators one gather per
        # iteration (launch count, not arithmetic, bounds PAR there).
        impl = self.impl if self.impl != "auto" else ("sparse" if masks.device.type == "cpu" else "gather")
        if impl == "gather":
            return self._propagate_gather(masks, kernel)
        if impl == "slice" or needs_grad:
            return self._propagate_slices(masks, kernel.dense().to(masks.dtype))
        return self._propagate_sparse(masks, kernel)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.apply(self.prepare(images, masks.dtype), masks)

    def _propagate_slices(self, masks: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """Replicate-pad once per iteration, accumulate the n shifted views (autograd-safe)."""
        H, W = masks.shape[-2:]
        p = max(self.dilations)
        ks = kernel.unsqueeze(2).unbind(1)  # n views (B, 1, H, W), broadcast over K
        for _ in range(self.num_iter):
            padded = F.pad(masks, (p, p, p, p), mode="replicate")
            out = torch.zeros_like(masks)
            for k, (dy, dx) in zip(ks, self.offsets):
                out = out.addcmul(padded[..., p + dy : p + dy + H, p + dx : p + dx + W], k)
            masks = out
        return masks

    def _propagate_gather(self, masks: torch.Tensor, kernel: PARKernel) -> torch.Tensor:
        """Eq. 10 by gathering: per iteration, replicate-pad the flattened masks
        (``pad_index``), gather each pixel's n neighbours (the CSR ``cols``) as (B, K, HW, n)
        and sum them weighted by the kernel's values (same entry order). Autograd-safe."""
        B, K, H, W = masks.shape
        st = kernel.structure
        values = kernel.values.to(masks.dtype).unsqueeze(1)  # (B, 1, HW, n)
        x = masks.reshape(B, K, H * W)
        for _ in range(self.num_iter):
            padded = x.index_select(2, st.pad_index)  # (B, K, Hp * Wp)
            x = (padded.index_select(2, st.cols).view(B, K, H * W, -1) * values).sum(3)
        return x.view(B, K, H, W)

    def _propagate_sparse(self, masks: torch.Tensor, kernel: PARKernel) -> torch.Tensor:
        """Eq. 10 as a sparse product per image, ``x <- M @ x[pad_index]`` with ``M``
        (HW, Hp*Wp) the CSR matrix of the kernel and ``x`` (HW, K): the output is written once
        per iteration (instead of n times) and the neighbours are read from cache."""
        B, K, H, W = masks.shape
        st = kernel.structure
        values = kernel.values.to(masks.dtype)
        out = []
        for b in range(B):
            with warnings.catch_warnings():  # "CSR support is in beta": it works, stay quiet
                warnings.simplefilter("ignore", UserWarning)
                matrix = torch.sparse_csr_tensor(
                    st.crow, st.cols, values[b].reshape(-1), size=(H * W, st.padded_size), check_invariants=False
                )
            x = masks[b].reshape(K, H * W).t().contiguous()  # (HW, K): rows are pixels
            for _ in range(self.num_iter):
                x = matrix @ x.index_select(0, st.pad_index)
            out.append(x.t().reshape(K, H, W))
        return torch.stack(out)


def _one_hot_ring(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(8, 1, 3, 3) one-hot 3x3 kernels, one per ring neighbour (RING order)."""
    weight = torch.zeros(8, 1, 3, 3, dtype=dtype, device=device)
    for i, (dy, dx) in enumerate(RING):
        weight[i, 0, 1 + dy, 1 + dx] = 1.0
    return weight


def conv_neighbours(x: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """(B, K, H, W) -> (B, K, n, H, W) by per-dilation replicate padding and a fixed one-hot
    dilated 3x3 convolution (the straightforward gather)."""
    B, K, H, W = x.shape
    flat = x.reshape(B * K, 1, H, W)
    weight = _one_hot_ring(x.dtype, x.device)
    parts = [F.conv2d(F.pad(flat, (d, d, d, d), mode="replicate"), weight, dilation=d) for d in dilations]
    return torch.cat(parts, dim=1).reshape(B, K, -1, H, W)


def reference_par(
    images: torch.Tensor,
    masks: torch.Tensor,
    dilations: Sequence[int] = DEFAULT_DILATIONS,
    num_iter: int = 10,
    w1: float = 0.3,
    w2: float = 0.01,
    w_pos: float | None = None,
) -> torch.Tensor:
    """Straightforward PAR (Eqs. 8-10): masks resized to the images' size (bilinear,
    ``align_corners=True``), conv-gathered neighbours, the (B, K, n, H, W) neighbour tensor
    materialised every iteration. Same contract as :class:`PAR`: images (B, 3, H, W), masks
    (B, K, h, w) -> (B, K, H, W)."""
    images = images.to(masks.dtype)
    masks = resize_masks(masks, tuple(images.shape[-2:]))
    nbr = conv_neighbours(images, dilations)
    std = nbr.std(dim=2, keepdim=True)
    rgb = -(((nbr - images.unsqueeze(2)).abs() / (std + 1e-8) / w1) ** 2)
    pos = neighbour_distances(dilations).to(masks)
    pos_logits = -((pos / (pos.std() + 1e-8) / (w1 if w_pos is None else w_pos)) ** 2)
    kernel = rgb.mean(1).softmax(1) + w2 * pos_logits.softmax(0).view(1, -1, 1, 1)
    for _ in range(num_iter):
        masks = (conv_neighbours(masks, dilations) * kernel.unsqueeze(1)).sum(2)
    return masks
