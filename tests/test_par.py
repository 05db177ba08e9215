"""PAR (AFA Eqs. 8-10): hand-computable cases and fast == reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods.afa.par import PAR, conv_neighbours, neighbour_offsets, position_kernel, reference_par

DILATIONS = (1, 2, 4, 8, 12, 24)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread (a shared 2-core machine): restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hand_position_kernel(dilations, w):
    """softmax(-(pos / std(pos) / w)^2) with pos = d (axes) or d*sqrt(2) (diagonals)."""
    pos = []
    for d in dilations:
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if (dy, dx) != (0, 0):
                    pos.append(d * (math.sqrt(2) if dy and dx else 1.0))
    pos = np.array(pos)
    logits = -((pos / (pos.std(ddof=1) + 1e-8) / w) ** 2)
    e = np.exp(logits - logits.max())
    return e / e.sum()


def test_neighbourhood_is_48_rings_in_row_major_order():
    offsets = neighbour_offsets(DILATIONS)
    assert len(offsets) == 48
    assert offsets[:8] == [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    assert offsets[-1] == (24, 24)


def test_position_kernel_matches_hand_computation():
    np.testing.assert_allclose(position_kernel(DILATIONS, 0.3).numpy(), hand_position_kernel(DILATIONS, 0.3), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("impl", ["sparse", "slice", "gather"])
def test_constant_image_reduces_to_position_kernel(impl):
    """|I_n - I| = 0 everywhere -> softmax of the image term is uniform (1/48), so the kernel
    is 1/48 + w2 * softmax(position term) at every pixel."""
    par = PAR(DILATIONS, num_iter=1, w1=0.3, w2=0.01, impl=impl)
    kernel = par.kernel(torch.full((1, 3, 20, 17), 0.4))
    expected = torch.from_numpy(1 / 48 + 0.01 * hand_position_kernel(DILATIONS, 0.3)).float()
    assert kernel.shape == (1, 48, 20, 17)
    torch.testing.assert_close(kernel, expected.view(1, 48, 1, 1).expand_as(kernel), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", ["sparse", "slice", "gather"])
def test_mass_grows_by_one_plus_w2_per_iteration(impl):
    """Each pixel's kernel sums to 1 + w2 (softmax + w2 * softmax); without renormalisation a
    constant mask is multiplied by (1 + w2) per iteration (replicate padding keeps it constant)."""
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    par = PAR(DILATIONS, num_iter=3, w2=0.01, impl=impl)
    torch.testing.assert_close(par.kernel(image).sum(1), torch.full((2, 16, 16), 1.01))
    out = par(torch.full((2, 3, 16, 16), 0.5), torch.full((2, 2, 16, 16), 2.0))
    torch.testing.assert_close(out, torch.full_like(out, 2.0 * 1.01**3))


@pytest.mark.parametrize("impl", ["sparse", "slice", "gather"])
def test_one_iteration_on_a_3x3_by_hand(impl):
    """Dilation 1, w2 = 0, constant image: kernel 1/8 on the 8 ring neighbours (clamped at the
    border). A one-hot mask at the centre: every border pixel has the centre among its
    neighbours exactly once -> 1/8; the centre has it zero times -> 0."""
    par = PAR((1,), num_iter=1, w2=0.0, impl=impl)
    mask = torch.zeros(1, 1, 3, 3)
    mask[0, 0, 1, 1] = 1.0
    out = par(torch.ones(1, 3, 3, 3), mask)[0, 0]
    expected = torch.full((3, 3), 1 / 8)
    expected[1, 1] = 0.0
    torch.testing.assert_close(out, expected)


def test_replicate_gather_by_hand():
    """Dilation 2 on a 3x3 ramp: neighbours outside the image take the nearest border value."""
    x = torch.arange(9.0).view(1, 1, 3, 3)
    nbr = conv_neighbours(x, (2,))[0, 0]  # (8, 3, 3), ring order
    # pixel (0, 0): offsets (-2,-2)->(0,0)=0, (-2,0)->(0,0)=0, (-2,2)->(0,2)=2, (0,-2)->0,
    # (0,2)->(0,2)=2, (2,-2)->(2,0)=6, (2,0)->(2,0)=6, (2,2)->(2,2)=8
    assert nbr[:, 0, 0].tolist() == [0, 0, 2, 0, 2, 6, 6, 8]
    # pixel (1, 1): everything clamps to the corners / edges
    assert nbr[:, 1, 1].tolist() == [0, 1, 2, 3, 5, 6, 7, 8]


@pytest.mark.parametrize("impl", ["sparse", "slice", "gather"])
def test_fast_matches_reference_on_random_input(impl):
    """Fast PAR == the straightforward conv formulation within 1e-5 (non-square, dilations
    larger than the image, masks resized up to the images' size, several iterations)."""
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 37, 42, generator=gen)
    masks = torch.rand(2, 5, 19, 21, generator=gen)
    par = PAR(DILATIONS, num_iter=10, w1=0.3, w2=0.01, impl=impl)
    out = par(images, masks)
    ref = reference_par(images, masks, DILATIONS, num_iter=10, w1=0.3, w2=0.01)
    assert out.shape == ref.shape == (2, 5, 37, 42)  # the images' size, not the masks'
    assert (out - ref).abs().max().item() < 1e-5


def two_column_case() -> tuple[torch.Tensor, torch.Tensor]:
    """The issue's minimal case: image 1x3x4x4, columns 0-1 = 0 and 2-3 = 1; masks 1x1x2x2
    [[1, 0], [0, 0]]."""
    images = torch.zeros(1, 3, 4, 4)
    images[..., 2:] = 1.0
    return images, torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)


def test_masks_are_resized_up_to_the_images_with_aligned_corners():
    """Authors' first step: bilinear, align_corners=True, 2x2 -> 4x4. Corners map onto corners,
    so sample positions are 0, 1/3, 2/3, 1: row 0 = (1, 2/3, 1/3, 0), row 1 = 2/3 of row 0,
    row 2 = 1/3 of row 0, row 3 = 0."""
    from methods.afa.par import resize_masks

    _, masks = two_column_case()
    row = torch.tensor([1.0, 2 / 3, 1 / 3, 0.0])
    expected = torch.stack([row, row * 2 / 3, row / 3, row * 0])[None, None]
    torch.testing.assert_close(resize_masks(masks, (4, 4)), expected)


@pytest.mark.parametrize("impl", ["sparse", "slice", "gather", "reference"])
def test_par_refines_at_image_resolution_by_hand(impl):
    """The issue's minimal case, dilations (1,), 1 iteration, w1 = 0.3, w2 = 0.01 -> 1x1x4x4.

    Masks after the resize: row 0 (1, 2/3, 1/3, 0), row 1 (2/3, 4/9, 2/9, 0) (see above).
    Position term (dilation 1): pos = 1 on the 4 axes, sqrt(2) on the 4 diagonals, unbiased
    std 0.2214 -> logits -(1 / 0.2214 / 0.3)^2 = -226.7 vs -453.4: softmax 1/4 on each axis,
    ~0 on the diagonals, so w2 * pos = 0.0025 on the axes.
    Ring order (-1,-1), (-1,0), (-1,1), (0,-1), (0,1), (1,-1), (1,0), (1,1), replicate padding:

    * (0,0): all 8 neighbours have image 0 = its own -> image softmax 1/8 each; kernel
      0.1275 on axes, 0.125 on diagonals. Mask neighbours 1, 1, 2/3, 1, 2/3, 2/3, 2/3, 4/9:
      0.125 (1 + 2/3 + 2/3 + 4/9) + 0.1275 (1 + 1 + 2/3 + 2/3) = 0.34722 + 0.425 = 0.77222.
    * (0,1): the 3 neighbours in column 2 differ by 1; unbiased std over the 8 (3 ones, 5
      zeros) = sqrt(1.875 / 7) = 0.5175 -> their logit -(1 / 0.5175 / 0.3)^2 = -41.5 (~0), the
      other 5 share the softmax (0.2 each). Kernel: (-1,-1) 0.2, (-1,0) 0.2025, (0,-1)
      0.2025, (0,1) 0.0025, (1,-1) 0.2, (1,0) 0.2025, others 0. Masks 1, 2/3, 1, 1/3, 2/3,
      4/9: 0.2 + 0.135 + 0.2025 + 0.00083 + 0.13333 + 0.09 = 0.76167.
    * (0,2): mirror image: the 3 neighbours in column 1 differ; kernel (-1,0) 0.2025, (-1,1)
      0.2, (0,-1) 0.0025, (0,1) 0.2025, (1,0) 0.2025, (1,1) 0.2. Masks 1/3, 0, 2/3, 0, 2/9, 0:
      0.2025 (1/3 + 2/9) + 0.0025 (2/3) = 0.11250 + 0.00167 = 0.11417.
    * (0,3): as (0,0) (all neighbours 1 = its own). Masks 1/3, 0, 0, 1/3, 0, 2/9, 0, 0:
      0.125 (1/3 + 2/9) + 0.1275 (1/3) = 0.06944 + 0.0425 = 0.11194.
    """
    images, masks = two_column_case()
    if impl == "reference":
        out = reference_par(images, masks, (1,), num_iter=1, w1=0.3, w2=0.01)
    else:
        out = PAR((1,), num_iter=1, w1=0.3, w2=0.01, impl=impl)(images, masks)
    assert out.shape == (1, 1, 4, 4)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.77222, 0.76167, 0.11417, 0.11194]), atol=2e-5, rtol=0)


def test_apply_resizes_masks_to_the_kernel():
    """A kernel prepared on 4x4 images refines 2x2 masks exactly as forward does."""
    images, masks = two_column_case()
    par = PAR((1,), num_iter=1)
    torch.testing.assert_close(par.apply(par.prepare(images), masks), par(images, masks))


def test_shared_kernel_equals_separate_calls():
    gen = torch.Generator().manual_seed(4)
    images = torch.rand(1, 3, 24, 24, generator=gen)
    a, b = torch.rand(1, 2, 24, 24, generator=gen), torch.rand(1, 3, 24, 24, generator=gen)
    par = PAR(num_iter=4)
    kernel = par.prepare(images)
    joint = par.apply(kernel, torch.cat([a, b], 1))
    torch.testing.assert_close(joint[:, :2], par(images, a))
    torch.testing.assert_close(joint[:, 2:], par(images, b))


def test_gradients_flow_through_the_slice_path():
    images = torch.rand(1, 3, 12, 12)
    masks = torch.rand(1, 2, 12, 12, requires_grad=True)
    out = PAR(num_iter=2)(images, masks)
    out.sum().backward()
    assert masks.grad is not None and torch.isfinite(masks.grad).all()


def test_gather_gradients_equal_the_slice_gradients():
    """The gather path (auto on GPU, with or without gradients) differentiates like the
    slices: same output and same mask gradient (float64, 1e-12)."""
    gen = torch.Generator().manual_seed(4)
    images = torch.rand(1, 3, 15, 11, generator=gen, dtype=torch.float64)
    weights = torch.rand(1, 3, 15, 11, generator=gen, dtype=torch.float64)
    outs, grads = [], []
    for impl in ("slice", "gather"):
        masks = torch.rand(1, 3, 8, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64).requires_grad_()
        par = PAR(DILATIONS, num_iter=3, impl=impl)
        out = par.apply(par.prepare(images, torch.float64), masks)
        (out * weights).sum().backward()
        outs.append(out.detach())
        grads.append(masks.grad)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-12)


@pytest.mark.slow
def test_fast_par_is_at_least_5x_faster_than_reference():
    """The issue's bar at image resolution (benchmarks/perf_par.py measures the full B=2,
    256 px case with 64 x 64 masks upsampled)."""
    import time

    gen = torch.Generator().manual_seed(5)
    images, masks = torch.rand(1, 3, 128, 128, generator=gen), torch.rand(1, 21, 32, 32, generator=gen)
    par = PAR(DILATIONS, num_iter=10)

    def best(fn, reps=3):
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.no_grad():
        fast = best(lambda: par(images, masks))
        ref = best(lambda: reference_par(images, masks, DILATIONS, 10))
    assert ref / fast >= 5.0, (ref, fast)
