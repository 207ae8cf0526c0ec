"""`refine` on real photos: structure comes back, colours stay (or return with CPL), float32 is exact
enough, and the 2-D summed-area-table trap of SPEC §5 is real."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from skimage import data

from spl.filters import box_filter
from spl.losses import color_preservation_loss, structure_preservation_loss
from spl.refine import refine


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """These loops run hundreds of small ops; on a shared 2-core machine OpenMP barriers stall whenever
    another process holds a core, so the module runs single-threaded (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def photo(size: int) -> torch.Tensor:
    """skimage's astronaut (512²) at size², (1, 3, size, size) float64 in [-1, 1]."""
    image = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].double() / 127.5 - 1
    if size != image.shape[-1]:
        image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return image.clamp(-1, 1)


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    half = int(3 * sigma)
    t = torch.arange(-half, half + 1, dtype=image.dtype)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = image.shape[1]
    x = F.pad(image, (half, half, half, half), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def tinted_blur(source: torch.Tensor) -> torch.Tensor:
    """A colour change (warm tint) plus a Gaussian blur: the kind of edit SPL should repair."""
    tint = torch.tensor([1.15, 0.95, 0.7], dtype=source.dtype).view(1, 3, 1, 1)
    return gaussian_blur((source + 1) * tint - 1, sigma=2.0).clamp(-1, 1)


def gradient_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of the horizontal and vertical finite differences of the gray images."""
    def diffs(x: torch.Tensor) -> torch.Tensor:
        g = x.double().mean(1)
        horizontal, vertical = g[..., :, 1:] - g[..., :, :-1], g[..., 1:, :] - g[..., :-1, :]
        return torch.cat([horizontal.flatten(), vertical.flatten()])

    da, db = diffs(a), diffs(b)
    da, db = da - da.mean(), db - db.mean()
    return float((da * db).sum() / (da.norm() * db.norm()))


def chroma(x: torch.Tensor) -> torch.Tensor:
    """(Cb, Cr) − 0.5 of an image in [-1, 1] (SPEC §5 formulas)."""
    x = (x.double() + 1) / 2
    y = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    return torch.stack([0.564 * (x[:, 2] - y), 0.713 * (x[:, 0] - y)], dim=1)


def chroma_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((chroma(a) - chroma(b)).abs().mean())


@pytest.fixture(scope="module")
def photo_pair() -> tuple[torch.Tensor, torch.Tensor]:
    source = photo(160).float()
    return source, tinted_blur(source.double()).float()


def test_refine_restores_structure_and_keeps_new_colours(photo_pair: tuple[torch.Tensor, ...]) -> None:
    source, edited = photo_pair
    refined = refine(source, edited)                                   # SPEC defaults: λ_s = 1e4, CPL off
    assert refined.shape == edited.shape and refined.dtype == torch.float32
    assert refined.min() >= -1 and refined.max() <= 1

    before, after = gradient_correlation(edited, source), gradient_correlation(refined, source)
    assert after > before + 0.2, (before, after)
    assert structure_preservation_loss(source, refined) < 0.2 * structure_preservation_loss(source, edited)
    # CPL off: the tint survives, the colours stay far closer to the edit than to the source.
    assert chroma_distance(refined, edited) < 0.25 * chroma_distance(refined, source)


def test_refine_with_cpl_moves_colours_back(photo_pair: tuple[torch.Tensor, ...]) -> None:
    source, edited = photo_pair
    without = refine(source, edited)
    with_cpl = refine(source, edited, color_weight=1e3)
    assert chroma_distance(with_cpl, source) < 0.5 * chroma_distance(without, source)
    assert color_preservation_loss(source, with_cpl) < 0.25 * color_preservation_loss(source, edited)
    assert gradient_correlation(with_cpl, source) > gradient_correlation(edited, source) + 0.2


@pytest.mark.parametrize("color_weight", [0.0, 50.0])
def test_refine_equals_autograd_sgd_loop(color_weight: float) -> None:
    """Closed-form gradients inside `refine` = torch SGD on the autograd loss (float64, with a mask)."""
    torch.manual_seed(0)
    source = torch.rand(1, 3, 20, 24, dtype=torch.float64) * 2 - 1
    edited = (0.5 * source + 0.3 * torch.rand_like(source)).clamp(-1, 1)
    mask = torch.rand(20, 24, dtype=torch.float64)
    x = edited.clone().requires_grad_()
    optimizer = torch.optim.SGD([x], lr=1.0, momentum=0.9)
    for _ in range(8):
        optimizer.zero_grad()
        loss = 1e4 * structure_preservation_loss(source, x, mask, radius=2)
        if color_weight:
            loss = loss + color_weight * color_preservation_loss(source, x, mask)
        loss.backward()
        optimizer.step()
    expected = x.detach().clamp(-1, 1)
    actual = refine(source, edited, mask, color_weight=color_weight, iterations=8, radius=2)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)


def test_refine_trivial_cases_and_dtype() -> None:
    source = photo(32)
    edited = (source * 1.3).clamp(-1, 1).to(torch.bfloat16)
    assert refine(source, edited, iterations=0).equal(edited)
    assert refine(source, edited, structure_weight=0).equal(edited)
    out = refine(source, edited, iterations=3)
    assert out.dtype == torch.bfloat16 and out.shape == edited.shape
    assert refine(source, edited.double(), iterations=3).dtype == torch.float64
    with pytest.raises(ValueError, match="source"):
        refine(source[..., :16], edited)


def test_refine_zeroes_nan_gradients() -> None:
    """SPEC §5: NaN gradients are set to 0, so a NaN pixel (whose statistics are NaN in the windows that
    see it) cannot leak into the other pixels through the SGD update."""
    source = photo(32)
    edited = source.flip(-1).clone()
    edited[0, :, 5, 7] = float("nan")
    out = refine(source, edited, iterations=5)
    nan = torch.isnan(out)
    assert nan.sum() == 3 and nan[0, :, 5, 7].all()          # only the NaN pixel itself, never updated


# ----------------------------------------------------------------------------- float32 precision (SPEC §5)
def summed_area_box_filter(x: torch.Tensor, radius: int) -> torch.Tensor:
    """The trap: clipped box mean from ONE 2-D summed-area table (four corner lookups)."""
    height, width = x.shape[-2:]
    table = F.pad(x.cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    i, j = torch.arange(height), torch.arange(width)
    i0, i1 = (i - radius).clamp(min=0)[:, None], (i + radius + 1).clamp(max=height)[:, None]
    j0, j1 = (j - radius).clamp(min=0), (j + radius + 1).clamp(max=width)
    sums = table[..., i1, j1] - table[..., i0, j1] - table[..., i1, j0] + table[..., i0, j0]
    return sums / ((i1 - i0) * (j1 - j0)).to(x.dtype)


def refine_with_box(source: torch.Tensor, edited: torch.Tensor, box, iterations: int) -> torch.Tensor:
    """SPEC §5 refine written directly with a given box filter and autograd (λ_s = 1e4, no CPL)."""
    i = ((source + 1) / 2).mean(1, keepdim=True)
    mean_i, mean_ii = box(i, 5), box(i * i, 5)
    x = edited.clone().requires_grad_()
    optimizer = torch.optim.SGD([x], lr=1.0, momentum=0.9)
    for _ in range(iterations):
        optimizer.zero_grad()
        p = ((x + 1) / 2).mean(1, keepdim=True)
        mean_p, mean_pp, mean_ip = box(p, 5), box(p * p, 5), box(i * p, 5)
        cov = mean_ip - mean_i * mean_p
        a = (cov / (mean_ii - mean_i**2 + 1e-4)).detach()
        b = (mean_p - a * mean_i).detach()
        a_r = (cov / (mean_pp - mean_p**2 + 1e-4)).detach()
        b_r = (mean_i - a_r * mean_p).detach()
        d = (mean_pp + a * a * mean_ii + b * b - 2 * a * mean_ip - 2 * b * mean_p + 2 * a * b * mean_i
             + mean_ii + a_r * a_r * mean_pp + b_r * b_r - 2 * a_r * mean_ip - 2 * b_r * mean_i
             + 2 * a_r * b_r * mean_p)
        (1e4 * d.mean()).backward()
        x.grad.nan_to_num_(nan=0.0)
        optimizer.step()
    return x.detach().clamp(-1, 1)


@pytest.fixture(scope="module")
def pair_512() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """512² photo, an edit, and the float64 result of 100 refine iterations."""
    source = photo(512)
    edited = tinted_blur(source)
    return source, edited, refine(source, edited, iterations=100)


def test_refine_float32_matches_float64_at_512(pair_512: tuple[torch.Tensor, ...]) -> None:
    source, edited, reference = pair_512
    refined = refine(source.float(), edited.float(), iterations=100)
    assert (refined.double() - reference).abs().max() < 1e-3


def test_summed_area_table_in_float32_is_the_trap(pair_512: tuple[torch.Tensor, ...]) -> None:
    """SPEC §5: with one 2-D summed-area table, float32 variances are garbage at 512² and refine diverges
    from float64, while the same code in float64 agrees with `refine` (so the formula is not the cause)."""
    source, edited, _ = pair_512
    gray = ((source + 1) / 2).mean(1, keepdim=True)
    exact_var = box_filter(gray * gray, 5) - box_filter(gray, 5) ** 2
    g32 = gray.float()
    sat_var = summed_area_box_filter(g32 * g32, 5) - summed_area_box_filter(g32, 5) ** 2
    ours_var = box_filter(g32 * g32, 5) - box_filter(g32, 5) ** 2
    sat_var_error = (sat_var.double() - exact_var).abs().max()
    ours_var_error = (ours_var.double() - exact_var).abs().max()
    assert sat_var_error > 1e-4 > 10 * ours_var_error, (sat_var_error, ours_var_error)   # ε = 1e-4

    iterations = 20
    crop = (..., slice(0, 256), slice(0, 256))                         # float64 check on a quarter
    sat64 = refine_with_box(source[crop], edited[crop], summed_area_box_filter, iterations)
    torch.testing.assert_close(sat64, refine(source[crop], edited[crop], iterations=iterations),
                               rtol=0, atol=1e-9)
    sat32 = refine_with_box(source.float(), edited.float(), summed_area_box_filter, iterations)
    ours32 = refine(source.float(), edited.float(), iterations=iterations)
    reference20 = refine(source, edited, iterations=iterations)
    sat_error = (sat32.double() - reference20).abs().max()
    ours_error = (ours32.double() - reference20).abs().max()
    assert sat_error > 0.1 and sat_error > 100 * ours_error, (sat_error, ours_error)
