"""Shipped data sets and the user's files: fixed splits, shapes, clear errors."""

import math

import numpy as np
import pytest
import torch

from pyro_diffusion.data import GaussianMixture2D, load_dataset


def test_digits_split_is_fixed_stratified_and_on_17_levels():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.train.shape == (1500, 1, 8, 8) and a.test.shape == (297, 1, 8, 8)
    assert torch.equal(a.test, b.test) and torch.equal(a.train, b.train)
    assert a.num_levels == 17 and a.is_image
    levels = (a.train + 1) * 8
    assert torch.equal(levels, levels.round()) and a.train.min() == -1 and a.train.max() == 1
    counts = torch.bincount(a.labels_test, minlength=10)
    assert counts.min() >= 29 and counts.max() <= 30  # stratified: 297 / 10 per class


@pytest.mark.parametrize("name", ["moons", "swissroll", "gmm"])
def test_toy_sets_are_deterministic_given_the_seed(name):
    a = load_dataset(name, num_train=300, num_test=100, seed=3)
    b = load_dataset(name, num_train=300, num_test=100, seed=3)
    c = load_dataset(name, num_train=300, num_test=100, seed=4)
    assert a.train.shape == (300, 2) and a.test.shape == (100, 2) and a.num_levels is None
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    assert not torch.equal(a.train, c.train)
    assert not torch.equal(a.train[:100], a.test)
    assert torch.isfinite(a.train).all() and a.train.abs().max() < 5


def test_gmm_density_is_normalized_and_matches_its_samples():
    mixture = GaussianMixture2D()
    grid = torch.linspace(-4, 4, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    density = mixture.log_prob(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)).exp()
    assert (density.sum() * (grid[1] - grid[0]) ** 2).item() == pytest.approx(1.0, abs=1e-4)
    # entropy estimate: Monte Carlo with its standard error, against an independent estimate
    h1, se1 = mixture.entropy(20_000, seed=1)
    h2, se2 = mixture.entropy(20_000, seed=2)
    assert abs(h1 - h2) < 4 * math.hypot(se1, se2)


def test_user_npy_and_pt_files(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.normal(size=(50, 3)).astype(np.float32)
    np.save(tmp_path / "mine.npy", array)
    torch.save(torch.from_numpy(array), tmp_path / "mine.pt")
    a = load_dataset(tmp_path / "mine.npy", test_fraction=0.2, seed=1)
    b = load_dataset(str(tmp_path / "mine.pt"), test_fraction=0.2, seed=1)
    assert a.train.shape == (40, 3) and a.test.shape == (10, 3)
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    together = torch.cat([a.train, a.test])
    assert torch.equal(together.sort(0).values, torch.from_numpy(array).sort(0).values)


def test_user_file_with_levels(tmp_path):
    levels = np.random.default_rng(0).integers(0, 4, size=(20, 1, 2, 2))
    np.save(tmp_path / "k4.npy", (levels * 2 / 3 - 1).astype(np.float32))
    data = load_dataset(tmp_path / "k4.npy", num_levels=4)
    assert data.num_levels == 4 and data.is_image
    with pytest.raises(ValueError, match="5-level data"):
        load_dataset(tmp_path / "k4.npy", num_levels=5)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data set 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_dataset(tmp_path / "absent.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ValueError, match="plain numeric"):
        load_dataset(tmp_path / "objects.npy")
    np.save(tmp_path / "flat.npy", np.zeros(5))
    with pytest.raises(ValueError, match=r"\(N, \*event_shape\)"):
        load_dataset(tmp_path / "flat.npy")
    np.save(tmp_path / "nan.npy", np.full((4, 2), np.nan))
    with pytest.raises(ValueError, match="NaN"):
        load_dataset(tmp_path / "nan.npy")
    torch.save({"x": torch.zeros(3, 2)}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="single tensor"):
        load_dataset(tmp_path / "dict.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="not a readable"):
        load_dataset(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("moons", test_fraction=1.5)
    with pytest.raises(ValueError, match="num_train"):
        load_dataset("moons", num_train=0)


def test_uint8_arrays_are_256_levels_and_float_arrays_are_kept(tmp_path):
    pixels = np.arange(2 * 64, dtype=np.uint8).reshape(2, 1, 8, 8) * 2  # channels-first, grey
    np.save(tmp_path / "grey.npy", pixels)
    data = load_dataset(tmp_path / "grey.npy", test_fraction=0.5)
    assert data.num_levels == 256 and data.event_shape == (1, 8, 8)
    together = torch.cat([data.train, data.test]).double()
    assert together.min().item() == -1.0
    assert torch.allclose(
        together.sort(0).values, (torch.from_numpy(pixels).double() / 127.5 - 1).sort(0).values
    )
    values = np.random.default_rng(0).normal(size=(6, 8, 8, 3)).astype(np.float32)  # channels-last floats
    np.save(tmp_path / "floats.npy", values)
    floats = load_dataset(tmp_path / "floats.npy")
    assert floats.num_levels is None and floats.event_shape == (3, 8, 8)
    np.save(tmp_path / "flags.npy", np.eye(4, dtype=bool))  # bool data: 0/1 as floats, not 8-bit levels
    flags = load_dataset(tmp_path / "flags.npy")
    assert flags.num_levels is None and set(torch.cat([flags.train, flags.test]).unique().tolist()) == {
        0.0,
        1.0,
    }


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"image_size": 8}, "image_size: only for an image folder"),
        ({"image_mode": "grey"}, "image_mode: only for an image folder"),
        ({"channels_last": "yes"}, "channels_last: only for a .npy/.pt array"),
        ({"channels_last": "maybe"}, "channels_last: expected one of"),
        ({"image_size": 0}, "image_size: expected"),
    ],
)
def test_image_options_where_they_do_not_apply_are_refused(kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        load_dataset("moons", num_train=10, num_test=10, **kwargs)
