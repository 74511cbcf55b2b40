"""Rotation and resizing in plain torch: exact quarter turns, known pixel positions, aspect ratio."""
import math

import pytest
import torch

from bilevel.problems.data import resize, rotate


def centre_of_mass(img: torch.Tensor) -> tuple[float, float]:
    rows = torch.arange(img.shape[-2], dtype=img.dtype)
    cols = torch.arange(img.shape[-1], dtype=img.dtype)
    m = img.sum()
    return float((img.sum(-1) * rows).sum() / m), float((img.sum(-2) * cols).sum() / m)


def test_four_quarter_turns_return_the_image():
    x = torch.rand(3, 1, 28, 28)
    y = x
    for _ in range(4):
        y = rotate(y, 90)
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def test_quarter_turn_is_rot90_counter_clockwise():
    x = torch.rand(2, 3, 28, 28)
    torch.testing.assert_close(rotate(x, 90), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate(x, -90), torch.rot90(x, -1, dims=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate(x, 0), x)


def test_known_pixel_moves_counter_clockwise():
    # one lit pixel above the centre (row 5, col 14) of a 28x28 grid (centre 13.5, 13.5): a quarter turn
    # counter-clockwise takes "up" to "left", i.e. to (row 13, col 5)
    x = torch.zeros(28, 28)
    x[5, 14] = 1.0
    y = rotate(x[None], 90)[0]
    assert y[13, 5] == pytest.approx(1.0, abs=1e-5)
    assert float(y.sum()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("degrees", [15, 45, -30, 75])
def test_blob_centre_follows_the_rotation(degrees):
    # 29x29 has its centre on pixel (14, 14); a 3x3 blob centred 10 pixels above it
    x = torch.zeros(29, 29)
    x[3:6, 13:16] = 1.0
    r, c = centre_of_mass(rotate(x[None], degrees)[0])
    a = math.radians(degrees)
    # counter-clockwise on screen: the offset (dx, dy) = (0, -10) becomes (-10 sin a, -10 cos a)
    assert r == pytest.approx(14 - 10 * math.cos(a), abs=0.1)
    assert c == pytest.approx(14 - 10 * math.sin(a), abs=0.1)


def test_non_square_image_keeps_geometry():
    x = torch.zeros(20, 30)  # centre (9.5, 14.5)
    x[2:5, 14:17] = 1.0  # blob centred at (3, 15): 6.5 up, 0.5 right
    r, c = centre_of_mass(rotate(x[None], 90)[0])
    assert (r, c) == (pytest.approx(9.0, abs=1e-4), pytest.approx(8.0, abs=1e-4))


def test_rotate_rejects_integer_images():
    with pytest.raises(TypeError, match="float"):
        rotate(torch.zeros(1, 28, 28, dtype=torch.uint8), 15)


def test_resize_shapes_and_constants():
    x = torch.full((2, 3, 40, 30), 0.25)
    y = resize(x, (28, 28))
    assert y.shape == (2, 3, 28, 28)
    torch.testing.assert_close(y, torch.full_like(y, 0.25))
    assert resize(x, 7).shape == (2, 3, 7, 7)
    with pytest.raises(ValueError, match="size"):
        resize(x, (0, 3))
