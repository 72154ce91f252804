"""Your own images: folders of PNG/JPEG files, uint8 arrays, channels-last layouts, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pyro_diffusion import cli
from pyro_diffusion.data import load_dataset


def _folder(path, n=8, size=32, mode="RGB", seed=0, suffix=".png"):
    """``n`` random images ``size``×``size`` in ``mode`` written to ``path``; their pixels (N, H, W[, C])."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (n, size, size, 3) if mode == "RGB" else (n, size, size)
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image, mode=mode).save(path / f"img{i:03d}{suffix}")
    return pixels


def _run_cli(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_image_folder_loads_as_256_levels_channels_first(tmp_path):
    pixels = _folder(tmp_path / "faces", n=10)
    data = load_dataset(tmp_path / "faces", test_fraction=0.2)
    assert data.train.shape == (8, 3, 32, 32) and data.test.shape == (2, 3, 32, 32)
    assert data.num_levels == 256 and data.is_image
    together = torch.cat([data.train, data.test])
    expected = torch.from_numpy(pixels).permute(0, 3, 1, 2).double() / 127.5 - 1
    # the same images, in some order: compare the sorted per-image sums
    assert torch.allclose(
        together.double().sum((1, 2, 3)).sort().values, expected.sum((1, 2, 3)).sort().values
    )
    levels = (together.double() + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)


def test_image_folder_grey_rgb_resize_and_jpeg(tmp_path):
    _folder(tmp_path / "grey", n=4, mode="L")
    assert load_dataset(tmp_path / "grey").event_shape == (1, 32, 32)  # auto: every file is grey
    assert load_dataset(tmp_path / "grey", image_mode="rgb").event_shape == (3, 32, 32)
    _folder(tmp_path / "mixed", n=3, mode="L")
    _folder(tmp_path / "mixed" / "colour", n=3, mode="RGB", seed=1, suffix=".jpg")  # searched recursively
    mixed = load_dataset(tmp_path / "mixed")
    assert mixed.event_shape == (3, 32, 32) and mixed.train.shape[0] + mixed.test.shape[0] == 6
    small = load_dataset(tmp_path / "mixed", image_size=16, image_mode="grey")
    assert small.event_shape == (1, 16, 16)
    assert small.train.min() >= -1 and small.train.max() <= 1


def test_image_folder_trains_and_samples_through_the_cli(tmp_path, capsys):
    _folder(tmp_path / "pictures", n=12)
    run = tmp_path / "run"
    code, out, err = _run_cli(
        [
            "train",
            "--data",
            str(tmp_path / "pictures"),
            "--out",
            str(run),
            "--steps",
            "3",
            "--num-steps",
            "20",
            "--network",
            "unet",
            "--hidden",
            "8",
            "--batch-size",
            "4",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    assert "final loss" in out and "mean of the last 50 steps" in out
    for name in ("config.json", "checkpoint.pt", "metrics.json", "loss.png", "samples.png", "schedule.png"):
        assert (run / name).exists(), name
    code, out, err = _run_cli(["sample", "--run", str(run), "--num", "4", "--no-progress"], capsys)
    assert code == 0, err
    samples = torch.load(run / "samples_seed0.pt", weights_only=True)
    assert samples.shape == (4, 3, 32, 32) and torch.isfinite(samples).all()


def test_channels_last_uint8_npy_is_detected_and_scaled(tmp_path, capsys):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "pictures.npy", pixels)
    data = load_dataset(tmp_path / "pictures.npy")
    assert data.event_shape == (3, 32, 32) and data.num_levels == 256
    together = torch.cat([data.train, data.test]).double()
    expected = torch.from_numpy(pixels).permute(0, 3, 1, 2).double() / 127.5 - 1
    assert torch.allclose(together.sum((1, 2, 3)).sort().values, expected.sum((1, 2, 3)).sort().values)
    assert together.min() >= -1 and together.max() <= 1
    # the same array as a uint8 .pt tensor; "no" keeps the stored layout
    torch.save(torch.from_numpy(pixels), tmp_path / "pictures.pt")
    assert torch.equal(load_dataset(tmp_path / "pictures.pt").train, data.train)
    assert load_dataset(tmp_path / "pictures.npy", channels_last="no").event_shape == (32, 32, 3)
    # uint8 levels 0..16 with --num-levels 17: scaled as 17 levels
    np.save(tmp_path / "seventeen.npy", rng.integers(0, 17, size=(6, 1, 8, 8), dtype=np.uint8))
    seventeen = load_dataset(tmp_path / "seventeen.npy", num_levels=17)
    assert seventeen.num_levels == 17 and seventeen.train.min() >= -1 and seventeen.train.max() <= 1
    # the case that used to fail inside the U-Net ("height and width must be divisible by 2, got (32, 3)")
    code, out, err = _run_cli(
        [
            "train",
            "--data",
            str(tmp_path / "pictures.npy"),
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "2",
            "--num-steps",
            "10",
            "--network",
            "unet",
            "--hidden",
            "8",
            "--batch-size",
            "4",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err


def test_ambiguous_layout_is_an_error_naming_channels_last(tmp_path, capsys):
    np.save(tmp_path / "odd.npy", np.zeros((6, 3, 8, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"^channels_last: .*could be channels-first"):
        load_dataset(tmp_path / "odd.npy")
    assert load_dataset(tmp_path / "odd.npy", channels_last="yes").event_shape == (4, 3, 8)
    run = tmp_path / "run"
    code, out, err = _run_cli(["train", "--data", str(tmp_path / "odd.npy"), "--out", str(run)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("pyro-diffusion train: error: --channels-last: ") and "--channels-last yes" in err
    assert not run.exists()


def test_unscaled_float_pixels_warn(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8, 3)).astype(np.float32)
    np.save(tmp_path / "floats.npy", pixels)
    with pytest.warns(UserWarning, match="unscaled 8-bit"):
        data = load_dataset(tmp_path / "floats.npy")
    assert data.num_levels is None and data.train.max() > 1  # used as they are, but not silently


def _huge_png(path):
    Image.new("L", (64, 64)).save(path / "huge.png")
    Image.new("L", (64, 64)).save(path / "other.png")


@pytest.mark.parametrize(
    "case, make, argv, expected",
    [
        ("image-size-zero", None, ["--image-size", "0"], "--image-size: expected"),
        (
            "image-size-on-2d",
            None,
            ["--data", "moons", "--image-size", "8"],
            "--image-size: only for an image folder",
        ),
        (
            "channels-last-on-2d",
            None,
            ["--data", "moons", "--channels-last", "yes"],
            "--channels-last: only for",
        ),
        (
            "corrupt-file",
            lambda p: (p / "bad.png").write_bytes(b"not an image"),
            [],
            "bad.png is not a readable",
        ),
        (
            "truncated-file",
            lambda p: (p / "cut.png").write_bytes((p / "img000.png").read_bytes()[:200]),
            [],
            "cut.png",
        ),
        ("sizes-differ", lambda p: _folder(p / "sub", n=2, size=16), [], "--image-size: the images in"),
        ("levels-too-few", None, ["--num-levels", "17"], "--num-levels: "),
        (
            "unet-odd-size",
            None,
            ["--image-size", "7", "--network", "unet"],
            "--network: 'unet' needs images of even",
        ),
    ],
)
def test_bad_image_inputs_are_one_line_naming_the_flag(tmp_path, capsys, case, make, argv, expected):
    folder = tmp_path / "pictures"
    _folder(folder, n=4)
    if make is not None:
        make(folder)
    run = tmp_path / "run"
    args = ["train", "--data", str(folder), "--out", str(run), "--steps", "1", "--no-progress"]
    code, out, err = _run_cli(args + argv, capsys)
    assert code == 2, (case, out, err)
    assert err.count("\n") == 1, err
    assert expected in err, err
    assert not run.exists()


def test_an_image_beyond_pillows_limit_is_refused_before_decoding(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "pictures"
    folder.mkdir()
    _huge_png(folder)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64×64 = 4096 pixels is "huge" now
    with pytest.raises(ValueError, match=r"^data: .*\.png .*Pillow's limit of 1,000"):
        load_dataset(folder)
    code, out, err = _run_cli(["train", "--data", str(folder), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and err.count("\n") == 1 and "--data: " in err and "MAX_IMAGE_PIXELS" in err


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p.mkdir(), "holds 0 PNG/JPEG images"),
        (lambda p: (p.mkdir(), (p / "notes.txt").write_text("x")), "holds 0 PNG/JPEG images"),
        (lambda p: (p.mkdir(), _folder(p, n=1)), "holds 1 PNG/JPEG image "),
    ],
)
def test_folders_without_enough_images_are_refused(tmp_path, make, expected):
    folder = tmp_path / "empty"
    make(folder)
    with pytest.raises(ValueError, match="^data: ") as info:
        load_dataset(folder)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_single_image_file_is_not_a_data_set(tmp_path):
    _folder(tmp_path / "pictures", n=2)
    with pytest.raises(ValueError, match="is one image; expected the folder"):
        load_dataset(tmp_path / "pictures" / "img000.png")


def test_sixteen_bit_images_are_refused_not_clipped(tmp_path):
    folder = tmp_path / "deep"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(folder / f"{i}.png")
    with pytest.raises(ValueError, match=r"^data: .*0\.png has I;16 pixels .*expected an 8-bit"):
        load_dataset(folder)
