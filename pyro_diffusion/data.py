"""Shipped data sets (nothing is downloaded) and the user's own arrays.

* 2-D sets, generated: ``"moons"``, ``"swissroll"`` and ``"gmm"`` (a Gaussian mixture whose
  density is known exactly, :class:`GaussianMixture2D`, for likelihood checks).
* ``"digits"``: scikit-learn's 8×8 digits (1,797 images with 17 grey levels 0..16), scaled to
  [−1, 1] as ``x/8 − 1`` and shaped ``(1, 8, 8)``; K = 17 for the discretized decoder.  The
  split is fixed: 297 test images (``train_test_split(random_state=0)``, stratified).
* A path to a ``.npy`` or ``.pt`` file holding an array ``(N, *event_shape)``: float data as
  they are, uint8 data as 256 levels scaled to [−1, 1]; images channels-first
  ``(N, C, H, W)`` or channels-last ``(N, H, W, C)`` (detected, or ``channels_last=``).
* A path to a folder of PNG/JPEG images (decoded by Pillow; 256 levels, grey or RGB,
  resized with ``image_size=``).

:func:`load_dataset` returns a :class:`Dataset` with ``train`` and ``test`` tensors.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Dataset",
    "GaussianMixture2D",
    "load_dataset",
    "DATASETS",
    "DIGITS_LEVELS",
    "DIGITS8_LEVELS",
    "MAX_ABS_VALUE",
    "BYTE_LEVELS",
    "IMAGE_MODES",
    "CHANNELS_LAST",
]

DATASETS = ("moons", "swissroll", "gmm", "digits", "digits8")
DIGITS_LEVELS = 17
DIGITS8_LEVELS = 256
DIGITS_TEST_SIZE = 297


@dataclass
class Dataset:
    """Train and test tensors of one data set, with what the model needs to know about it."""

    name: str
    train: torch.Tensor
    test: torch.Tensor
    num_levels: int | None = None  # K for K-level data in [−1, 1]; None for continuous data
    labels_train: torch.Tensor | None = None
    labels_test: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    @property
    def is_image(self) -> bool:
        return len(self.event_shape) == 3


class GaussianMixture2D:
    """An equal-weight mixture of isotropic 2-D Gaussians on a circle; exact ``log_prob``.

    Args:
        num_components: number of components.
        radius: radius of the circle of means.
        std: standard deviation of each component.
    """

    def __init__(self, num_components: int = 8, radius: float = 1.5, std: float = 0.3) -> None:
        angles = torch.arange(num_components, dtype=torch.float64) * 2 * math.pi / num_components
        self.means = torch.stack([radius * torch.cos(angles), radius * torch.sin(angles)], 1)
        self.std = std
        self.num_components = num_components

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        component = torch.randint(self.num_components, (n,), generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.means[component] + self.std * noise).float()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        d2 = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)
        log_norm = -math.log(2 * math.pi * self.std**2)
        return torch.logsumexp(-0.5 * d2 / self.std**2 + log_norm, 1) - math.log(self.num_components)

    def entropy(self, num_samples: int = 200_000, seed: int = 0) -> tuple[float, float]:
        """Monte Carlo estimate of H = −E log p(x) in nats, with its standard error."""
        g = torch.Generator().manual_seed(seed)
        values = -self.log_prob(self.sample(num_samples, g))
        return values.mean().item(), (values.std() / math.sqrt(num_samples)).item()


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    from sklearn.datasets import make_moons

    x, _ = make_moons(n, noise=0.06, random_state=int(rng.integers(2**31)))
    return ((x - np.array([0.5, 0.25])) / np.array([0.87, 0.5])).astype(np.float32)


def _swissroll(n: int, rng: np.random.Generator) -> np.ndarray:
    from sklearn.datasets import make_swiss_roll

    x, _ = make_swiss_roll(n, noise=0.3, random_state=int(rng.integers(2**31)))
    return (x[:, [0, 2]] / 7.0).astype(np.float32)


def _toy(name: str, num_train: int, num_test: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    if name == "gmm":
        mixture = GaussianMixture2D()
        g = torch.Generator().manual_seed(seed)
        return Dataset(
            name, mixture.sample(num_train, g), mixture.sample(num_test, g), extra={"mixture": mixture}
        )
    make = {"moons": _moons, "swissroll": _swissroll}[name]
    return Dataset(name, torch.from_numpy(make(num_train, rng)), torch.from_numpy(make(num_test, rng)))


def _digits(eight_bit: bool = False) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    if eight_bit:  # level v ∈ 0..16 stored as the byte round(v·255/16), then scaled to [−1, 1]
        images = np.round(digits.images * 255.0 / 16.0) / 127.5 - 1.0
        images = images.astype(np.float32)
    else:
        images = digits.images.astype(np.float32) / 8.0 - 1.0  # 0..16 → −1..1 in steps of 1/8
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=DIGITS_TEST_SIZE, random_state=0, stratify=digits.target
    )
    return Dataset(
        "digits8" if eight_bit else "digits",
        torch.from_numpy(x_train)[:, None],
        torch.from_numpy(x_test)[:, None],
        num_levels=DIGITS8_LEVELS if eight_bit else DIGITS_LEVELS,
        labels_train=torch.from_numpy(y_train),
        labels_test=torch.from_numpy(y_test),
    )


def _check_levels(tensor: torch.Tensor, num_levels: int, path: Path) -> None:
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(f"num_levels: expected an integer K >= 2 or None, got {num_levels!r}")
    scaled = (tensor.double() + 1) * (num_levels - 1) / 2
    off = (scaled - scaled.round()).abs().max().item()
    if tensor.min() < -1 or tensor.max() > 1 or off > 1e-4:
        raise ValueError(
            f"data: {path} does not hold {num_levels}-level data in [-1, 1] (levels -1 + 2k/(K-1)); "
            f"found values in [{tensor.min().item():.4g}, {tensor.max().item():.4g}] up to {off:.3g} "
            "of a level away from the nearest level. Rescale it, or leave num_levels unset for continuous data"
        )


#: the largest magnitude a value of a user's data may have: diffusion models assume data of
#: roughly unit scale (the prior is N(0, I)); beyond this it is almost surely a unit mistake
MAX_ABS_VALUE = 1e6
#: the largest array a user file may hold, in bytes of its own dtype
MAX_FILE_ARRAY_BYTES = 16 * 2**30
_NUMERIC_KINDS = {"b": "bool", "i": "integer", "u": "unsigned integer", "f": "floating point"}
_REFUSED_KINDS = {
    "U": "unicode strings",
    "S": "byte strings",
    "V": "raw bytes (void)",
    "M": "datetimes",
    "m": "timedeltas",
    "c": "complex numbers",
    "O": "Python objects",
}


def _check_dtype(dtype: np.dtype, path: Path) -> None:
    if dtype.hasobject:
        raise ValueError(
            f"data: {path} holds Python objects (dtype {dtype}), which are never unpickled; "
            "expected a plain numeric array (integer or floating point)"
        )
    if dtype.fields is not None:
        raise ValueError(
            f"data: {path} holds a structured array (dtype {dtype}); expected a plain numeric array "
            "(stack the fields into one array)"
        )
    if dtype.subdtype is not None:
        raise ValueError(f"data: {path} has a sub-array dtype {dtype}; expected a plain numeric dtype")
    if dtype.kind in _REFUSED_KINDS:
        raise ValueError(
            f"data: {path} holds {_REFUSED_KINDS[dtype.kind]} (dtype {dtype}); expected a plain numeric "
            "array (integer or floating point)"
        )
    if dtype.kind == "f" and dtype.itemsize > 8:
        raise ValueError(
            f"data: {path} holds extended-precision floats (dtype {dtype}); expected float16, float32 "
            "or float64 (convert it with .astype(np.float64))"
        )
    if dtype.kind not in _NUMERIC_KINDS:
        raise ValueError(f"data: {path} has dtype {dtype}; expected a plain numeric array")


def _read_npy(path: Path) -> np.ndarray:
    """A ``.npy`` file read without unpickling, its header checked against the file first."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"data: {path} is empty (0 bytes); expected a .npy array")
    with open(path, "rb") as handle:
        head = handle.read(8)
        if head.startswith(b"PK"):
            raise ValueError(
                f"data: {path} is a zip archive (an .npz or a .pt file renamed .npy?); expected a .npy "
                "array (np.save), or pass a .pt file under its own name"
            )
        if not head.startswith(b"\x93NUMPY"):
            raise ValueError(
                f"data: {path} is not a .npy file (no NumPy header); expected an array saved by np.save"
            )
        handle.seek(0)
        try:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
        except Exception as error:  # a damaged header fails in several ways
            reason = " ".join(str(error).split())[:160]
            raise ValueError(f"data: {path} has a damaged .npy header ({reason})") from None
        offset = handle.tell()
    _check_dtype(dtype, path)
    if any(not isinstance(n, int) or n < 0 for n in shape):
        raise ValueError(f"data: {path} has an invalid shape {shape} in its header")
    needed = math.prod(shape) * dtype.itemsize
    if needed > MAX_FILE_ARRAY_BYTES:
        raise ValueError(
            f"data: {path} claims an array of shape {tuple(shape)} ({needed / 2**30:.3g} GiB); "
            f"expected at most {MAX_FILE_ARRAY_BYTES / 2**30:.0f} GiB"
        )
    if size - offset < needed:
        raise ValueError(
            f"data: {path} is truncated: its header claims shape {tuple(shape)} ({needed} bytes of "
            f"{dtype}) but only {size - offset} bytes follow"
        )
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        reason = " ".join(str(error).split())[:160]
        raise ValueError(f"data: {path} is not a plain numeric .npy array ({reason})") from None
    if not isinstance(array, np.ndarray):
        raise ValueError(f"data: {path} is not a single .npy array")
    return array


def _read_pt(path: Path) -> torch.Tensor:
    """The one tensor of a ``.pt`` file, read with ``weights_only=True`` (nothing in it runs)."""
    from .runs import RunError, check_plain_tensors, torch_load

    try:
        tensor = torch_load(path, argument="data", what=".pt tensor file")
    except RunError as error:
        raise ValueError(str(error)) from None
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"data: {path} must hold a single tensor, found {type(tensor).__name__}")
    try:
        check_plain_tensors(tensor, path, "data")
    except RunError as error:
        raise ValueError(str(error)) from None
    tensor = tensor.detach()  # data, not a parameter: a requires_grad flag is dropped
    if tensor.is_complex():
        raise ValueError(f"data: {path} holds complex numbers (dtype {tensor.dtype}); expected a real tensor")
    if not (tensor.is_floating_point() or tensor.dtype in _TORCH_INTEGERS):
        raise ValueError(f"data: {path} must hold numbers, got dtype {tensor.dtype}")
    return tensor


_TORCH_INTEGERS = (torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check_values(tensor: torch.Tensor, path: Path) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ValueError(f"data: {path} contains NaN or infinite values")
    if tensor.numel():
        largest = max(abs(tensor.max().item()), abs(tensor.min().item()))
        if largest > MAX_ABS_VALUE:
            raise ValueError(
                f"data: {path} holds values up to {largest:.3g} in magnitude; expected |x| <= "
                f"{MAX_ABS_VALUE:.0e} (standardize the data: diffusion models assume roughly unit scale)"
            )


def _user_file(
    path: Path, test_fraction: float, seed: int, num_levels: int | None = None, channels_last: str = "auto"
) -> Dataset:
    if path.is_dir():
        raise ValueError(f"data: {path} is a directory; expected a .npy or .pt file")
    try:
        if path.suffix == ".npy":
            array = _read_npy(path)
            shape = array.shape
            is_bytes, dtype = array.dtype == np.uint8, str(array.dtype)
            if array.dtype.kind in "biu" and not is_bytes:  # every integer width, exactly
                array = array.astype(np.float64)
            tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("=")))
        elif path.suffix == ".pt":
            tensor = _read_pt(path)
            shape = tuple(tensor.shape)
            is_bytes, dtype = tensor.dtype == torch.uint8, str(tensor.dtype).removeprefix("torch.")
        else:
            raise ValueError(f"data: expected a .npy or .pt file, got {path.name!r}")
    except OSError as error:
        raise ValueError(f"data: cannot read {path}: {error.strerror or error}") from None
    if tensor.dim() < 2 or tensor.shape[0] < 2:
        hint = " (for scalars, reshape it to (N, 1))" if tensor.dim() == 1 else ""
        raise ValueError(
            f"data: {path} must hold an array (N, *event_shape) with N >= 2, got shape {tuple(shape)}{hint}"
        )
    if any(n == 0 for n in tensor.shape[1:]):
        raise ValueError(
            f"data: {path} has an empty event shape {tuple(tensor.shape[1:])}; expected sizes >= 1"
        )
    tensor, permuted = _to_channels_first(tensor, channels_last, path)
    if is_bytes:  # 8-bit data: the levels 0..K-1 (K = 256 unless num_levels says otherwise) on [-1, 1]
        num_levels = num_levels or BYTE_LEVELS
        tensor = _scale_levels(tensor, num_levels, path, "uint8 values").float().contiguous()
    else:
        if tensor.dtype == torch.bool:
            tensor = tensor.to(torch.uint8)
        _check_values(tensor, path)
        _warn_if_unscaled(tensor, path, dtype)
        tensor = tensor.float().contiguous()
        if not torch.isfinite(tensor).all():  # e.g. float64 beyond float32's range
            raise ValueError(f"data: {path} contains values beyond float32's range")
        if num_levels is not None:
            _check_levels(tensor, num_levels, path)
    dataset = _split(path.stem, tensor, test_fraction, seed, num_levels)
    dataset.extra["layout"] = "channels-last, moved to channels-first" if permuted else "as stored"
    return dataset


# ---------------------------------------------------------------------------- images
#: the levels of 8-bit data (uint8 arrays and image files)
BYTE_LEVELS = 256
#: image files an image folder may hold (decoded by Pillow; only these formats are tried)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: the largest number of files an image folder may hold
MAX_IMAGE_FILES = 1_000_000
IMAGE_MODES = ("auto", "grey", "rgb")
CHANNELS_LAST = ("auto", "yes", "no")
#: channel counts an image array may have (grey, RGB, RGBA)
_CHANNELS = (1, 3, 4)


def _check_image_options(image_size, image_mode, channels_last) -> None:
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= 4096
    ):
        raise ValueError(f"image_size: expected None or a side length in 1..4096 pixels, got {image_size!r}")
    if image_mode not in IMAGE_MODES:
        raise ValueError(f"image_mode: expected one of {IMAGE_MODES}, got {image_mode!r}")
    if channels_last not in CHANNELS_LAST:
        raise ValueError(f"channels_last: expected one of {CHANNELS_LAST}, got {channels_last!r}")


def _to_channels_first(tensor: torch.Tensor, channels_last: str, path: Path) -> tuple[torch.Tensor, bool]:
    """A batch of images ``(N, A, B, C)`` as ``(N, C, H, W)``: ``channels_last`` ``"yes"``
    permutes, ``"no"`` keeps, ``"auto"`` decides from the shape: the channel dimension is the
    end of size 1, 3 or 4 when the other end is not; when both ends are, the layout is
    ambiguous (an error naming ``channels_last``); when neither is, the array is kept.  Arrays
    of other ranks are kept."""
    if tensor.dim() != 4:
        if channels_last == "yes":
            raise ValueError(
                f"channels_last: 'yes' needs images (N, H, W, C), but {path} holds shape {tuple(tensor.shape)}"
            )
        return tensor, False
    first, last = tensor.shape[1] in _CHANNELS, tensor.shape[3] in _CHANNELS
    if channels_last == "auto":
        if first and last:
            raise ValueError(
                f"channels_last: {path} holds shape {tuple(tensor.shape)}, which could be channels-first "
                "(N, C, H, W) or channels-last (N, H, W, C); say which with channels_last='no' or "
                "channels_last='yes'"
            )
        channels_last = "yes" if last and not first else "no"
    if channels_last == "no":
        return tensor, False
    return tensor.permute(0, 3, 1, 2).contiguous(), True


def _scale_levels(tensor: torch.Tensor, num_levels: int, path: Path, what: str) -> torch.Tensor:
    """Integer levels ``0 .. K − 1`` (uint8 data: K = 256) mapped to ``−1 + 2k/(K − 1)``."""
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(f"num_levels: expected an integer K >= 2 or None, got {num_levels!r}")
    if tensor.numel() and int(tensor.max()) > num_levels - 1:
        raise ValueError(
            f"num_levels: {path} holds {what} up to {int(tensor.max())}, beyond the {num_levels} levels "
            f"0..{num_levels - 1} asked for; pass num_levels={BYTE_LEVELS} (or leave it unset) for 8-bit data"
        )
    return tensor.double() * (2.0 / (num_levels - 1)) - 1.0


def _warn_if_unscaled(tensor: torch.Tensor, path: Path, dtype: str) -> None:
    """Data other than uint8 that look like unscaled 8-bit pixels (whole numbers in 0..255,
    some above 2); ``dtype`` is the file's own."""
    if not tensor.numel():
        return
    low, high = tensor.min().item(), tensor.max().item()
    if low >= 0 and 2 < high <= 255 and torch.equal(tensor.double(), tensor.double().round()):
        warnings.warn(
            f"data: {path} holds whole numbers in [{low:g}, {high:g}] (dtype {dtype}), like unscaled 8-bit "
            "pixels; they are used as they are (save them as uint8 to have them scaled to [-1, 1] with K = 256)",
            stacklevel=3,
        )


def _image_files(folder: Path) -> list[Path]:
    files = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            files.append(path)
            if len(files) > MAX_IMAGE_FILES:
                raise ValueError(f"data: {folder} holds more than {MAX_IMAGE_FILES:,} images")
    if len(files) < 2:
        raise ValueError(
            f"data: {folder} holds {len(files)} PNG/JPEG image{'' if len(files) == 1 else 's'} "
            f"({', '.join(IMAGE_SUFFIXES)}, searched recursively); expected at least 2"
        )
    return files


def _decode_image(path: Path, image_mode: str, image_size: int | None):
    """One image file as a Pillow image in mode ``L`` or ``RGB`` (``image_mode``; ``auto``:
    as the file is, grey or colour), resized to ``image_size`` square when given.  Only the
    PNG and JPEG decoders are tried; an image beyond ``PIL.Image.MAX_IMAGE_PIXELS`` is refused
    before it is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=("PNG", "JPEG")) as image:
                width, height = image.size
                limit = Image.MAX_IMAGE_PIXELS
                if limit is not None and width * height > limit:
                    raise ValueError(
                        f"data: {path} is {width}×{height} pixels, more than Pillow's limit of "
                        f"{limit:,} (PIL.Image.MAX_IMAGE_PIXELS); refusing to decode it"
                    )
                image.load()
                if image.mode.startswith(("I", "F")):  # 16-bit or float pixels: not 256 levels
                    raise ValueError(
                        f"data: {path} has {image.mode} pixels (16-bit or floating point); expected an 8-bit "
                        "grey or colour image (or save the data as a .npy array)"
                    )
                grey = image.mode in ("1", "L", "LA") or (
                    image.mode == "P" and not image.palette.mode.startswith("RGB")
                )
                mode = {"grey": "L", "rgb": "RGB"}.get(image_mode, "L" if grey else "RGB")
                converted = image.convert(mode)
    except ValueError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(
            f"data: {path} has more pixels than Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} "
            "(PIL.Image.MAX_IMAGE_PIXELS); refusing to decode it"
        ) from None
    except UnidentifiedImageError:
        raise ValueError(f"data: {path} is not a readable PNG or JPEG image") from None
    except (OSError, SyntaxError, EOFError) as error:  # truncated or damaged files
        raise ValueError(f"data: {path} is a damaged image ({_one_line(error)})") from None
    if image_size is not None and converted.size != (image_size, image_size):
        converted = converted.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return converted


def _one_line(error: BaseException) -> str:
    """An exception's message on one line, shortened."""
    return " ".join(str(error).split())[:160] or type(error).__name__


def _image_folder(
    folder: Path,
    test_fraction: float,
    seed: int,
    num_levels: int | None,
    image_size: int | None,
    image_mode: str,
) -> Dataset:
    """Every PNG/JPEG file under ``folder`` (sorted, recursively) as 8-bit images ``(N, C, H, W)``
    scaled to [−1, 1] with K = 256 levels; grey images have C = 1, colour C = 3."""
    from tqdm.auto import tqdm

    files = _image_files(folder)
    images, modes = [], set()
    for path in tqdm(files, desc=f"read {folder.name}", disable=len(files) < 2000, leave=False):
        images.append(_decode_image(path, image_mode, image_size))
        modes.add(images[-1].mode)
    if image_mode == "auto" and len(modes) > 1:  # some grey, some colour: all in colour
        images = [image.convert("RGB") for image in images]
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        shown = ", ".join(f"{w}×{h}" for w, h in sorted(sizes)[:4])
        raise ValueError(
            f"image_size: the images in {folder} have different sizes ({shown}{', …' if len(sizes) > 4 else ''}); "
            "pass image_size=S to resize them all to S×S pixels"
        )
    (width, height), channels = sizes.pop(), len(images[0].getbands())
    needed = len(images) * width * height * channels
    if needed > MAX_FILE_ARRAY_BYTES:
        raise ValueError(
            f"data: {folder} holds {needed / 2**30:.3g} GiB of pixels; expected at most "
            f"{MAX_FILE_ARRAY_BYTES / 2**30:.0f} GiB (pass a smaller image_size)"
        )
    array = np.stack([np.asarray(image, dtype=np.uint8).reshape(height, width, channels) for image in images])
    tensor = torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
    levels = num_levels or BYTE_LEVELS
    scaled = _scale_levels(tensor, levels, folder, "pixel values").float()
    dataset = _split(folder.name, scaled, test_fraction, seed, levels)
    dataset.extra.update(files=[str(p.relative_to(folder)) for p in files], layout="image folder")
    return dataset


def _split(name: str, tensor: torch.Tensor, test_fraction: float, seed: int, num_levels) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(tensor.shape[0], generator=g)
    num_test = min(tensor.shape[0] - 1, max(1, int(round(test_fraction * tensor.shape[0]))))
    return Dataset(name, tensor[order[num_test:]], tensor[order[:num_test]], num_levels=num_levels)


def load_dataset(
    name: str | Path,
    *,
    num_train: int = 20_000,
    num_test: int = 5_000,
    seed: int = 0,
    test_fraction: float = 0.2,
    num_levels: int | None = None,
    image_size: int | None = None,
    image_mode: str = "auto",
    channels_last: str = "auto",
) -> Dataset:
    """Load a shipped data set by name, the user's ``.npy``/``.pt`` file or a folder of images by path.

    Args:
        name: ``"moons"``, ``"swissroll"``, ``"gmm"``, ``"digits"`` (17 levels), ``"digits8"``
            (the same images as 8-bit data: level v stored as round(v·255/16), K = 256), or a path to a ``.npy``
            (plain numeric, no pickles) or ``.pt`` (one tensor) file holding ``(N, *event_shape)``.
        num_train, num_test: sizes of the generated 2-D sets.
        seed: seed of the generated 2-D sets, and of the user-file split.  Train and test of a
            2-D set are independent draws; the same (name, sizes, seed) gives the same tensors.
        test_fraction: share of a user file held out as the test split (a fixed random split
            given ``seed``), in (0, 1).
        num_levels: for user files, K when the data take K evenly spaced levels in [−1, 1]
            (checked); the model then uses the discretized decoder.  ``None``: continuous
            for float data, K = 256 for uint8 arrays and image folders (whose integer levels
            0..K − 1 are mapped to −1 + 2k/(K − 1); ``num_levels`` overrides K, e.g. 17 for
            uint8 data holding the levels 0..16).
        image_size: for an image folder, resize every image to this many pixels square
            (Lanczos); None: the images must share one size.
        image_mode: for an image folder, ``"grey"`` (C = 1), ``"rgb"`` (C = 3) or ``"auto"``
            (grey when every file is grey, else RGB).
        channels_last: for an array ``(N, A, B, C)``: ``"yes"`` it is ``(N, H, W, C)`` and is
            moved to ``(N, C, H, W)``; ``"no"`` it is kept; ``"auto"`` (default) decides from
            the shape: channels-last when the last size is 1, 3 or 4 and the first is not,
            channels-first when the first is and the last is not, an error naming
            ``channels_last`` when both are (e.g. ``(N, 3, 8, 4)``).

    An image folder (a directory path) holds PNG or JPEG files, searched recursively and
    sorted by path; Pillow decodes them (only its PNG and JPEG decoders are tried, and an
    image beyond ``PIL.Image.MAX_IMAGE_PIXELS`` is refused before decoding); a file that is
    not a readable image is one error naming it.  The images become ``(N, C, H, W)`` on
    [−1, 1] with 256 levels, split like a user file.

    The digits split is always the same (297 test images, stratified, ``random_state=0``), for
    ``"digits"`` and ``"digits8"`` alike.

    A user file is read without running anything in it (``np.load(allow_pickle=False)``,
    ``torch.load(weights_only=True)``) and checked first: a ``.npy`` header must describe a
    plain numeric array (integers, bool, float16/32/64; not strings, bytes, datetimes,
    structured, object, complex or extended-precision values) that the file actually holds;
    a ``.pt`` file must hold one dense tensor (not sparse, meta or quantized; a
    ``requires_grad`` flag is dropped).  Values must be finite with ``|x| <= 1e6``
    (:data:`MAX_ABS_VALUE`).  Any event shape ``(N, D)``, ``(N, C, H, W)``, … with N >= 2.

    Raises:
        ValueError: unknown name, malformed file (one line starting ``data:`` and naming the
            file), bad sizes; FileNotFoundError: missing file.
    """
    for argument, value in (("num_train", num_train), ("num_test", num_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{argument}: expected a positive integer, got {value!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction: expected a share in (0, 1), got {test_fraction!r}")
    if not isinstance(name, (str, Path)):
        raise TypeError(f"name: expected a data set name or a path, got {type(name).__name__}")
    _check_image_options(image_size, image_mode, channels_last)
    path = Path(name)
    folder = path.suffix not in (".npy", ".pt") and path.is_dir()
    for argument, value, default, where in (
        ("image_size", image_size, None, "an image folder"),
        ("image_mode", image_mode, "auto", "an image folder"),
        ("channels_last", channels_last, "auto", "a .npy/.pt array"),
    ):
        applies = folder if where == "an image folder" else path.suffix in (".npy", ".pt")
        if value != default and (str(name) in DATASETS or not applies):
            raise ValueError(f"{argument}: only for {where}, not for data {str(name)!r}")
    if str(name) in DATASETS:
        if name in ("digits", "digits8"):
            return _digits(eight_bit=name == "digits8")
        return _toy(str(name), num_train, num_test, seed)
    if path.suffix in (".npy", ".pt"):
        if not path.exists():
            raise FileNotFoundError(f"data: no such file {str(path)!r}")
        return _user_file(path, test_fraction, seed, num_levels, channels_last)
    if folder:
        return _image_folder(path, test_fraction, seed, num_levels, image_size, image_mode)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise ValueError(f"data: {str(path)!r} is one image; expected the folder that holds the images")
    raise ValueError(
        f"data: unknown data set {str(name)!r}; expected one of {DATASETS}, a path to a .npy/.pt file "
        "or a folder of PNG/JPEG images"
    )
