"""What a user names on the command line, read and checked: a model (`MODULE:FACTORY` with optional
`--weights`, `load_model`) and its input data (`--data`, `load_inputs`: a `.pt` or `.npy` file, or a folder
of images), cut into batches (`make_batches`).

Each failure is a `QuantizeInputError` with one line that names the argument, the value and the fix.
`fxquant.quantize_cli` runs the pipeline on what this module reads.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import os
import sys
from collections import Counter
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from fxquant.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TENSOR_SUFFIXES = (".pt", ".pth")
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F")


class QuantizeInputError(InputError):
    """A bad argument of `fxquant quantize` (model, weights, data, bits, steps, output folder).

    The message is one line: it names the argument and the value, what was expected and the fix.
    """


# --------------------------------------------------------------------------------------------------
# MODULE:FACTORY and --weights
# --------------------------------------------------------------------------------------------------


def _looks_like_path(module: str) -> bool:
    return module.endswith(".py") or "/" in module or os.sep in module


@contextlib.contextmanager
def _extra_sys_path(folder: str) -> Iterator[None]:
    """`folder` first on `sys.path` within the block (a user's module may import its neighbours)."""
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def _import_file(path: str) -> Any:
    if not os.path.isfile(path):
        raise QuantizeInputError(f"model file {path!r} does not exist; give MODULE:FACTORY with an existing .py file.")
    stem = os.path.splitext(os.path.basename(path))[0]
    name = stem if stem.isidentifier() and stem not in sys.modules else f"fxquant_user_module_{abs(hash(path))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise QuantizeInputError(f"model file {path!r} cannot be imported as Python; give a .py file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any failure of the user's file is one line for the user
        sys.modules.pop(name, None)
        raise QuantizeInputError(f"importing model file {path!r} failed: {one_line(e)}") from e
    return module


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            raise QuantizeInputError(
                f"cannot import module {name!r} (No module named {e.name!r}); give an importable module (run "
                "from the folder that holds it or set PYTHONPATH) or a path to a .py file, e.g. models.py:build."
            ) from e
        raise QuantizeInputError(f"importing module {name!r} failed: {one_line(e)}") from e
    except Exception as e:  # noqa: BLE001
        raise QuantizeInputError(f"importing module {name!r} failed: {one_line(e)}") from e


def one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _torch_load(path: str, option: str, fix: str) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU; a failure is one line naming the option and the fix."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise QuantizeInputError(f"{option} {path!r} cannot be read by torch.load(weights_only=True): {one_line(e)}; {fix}.") from e


def resolve_factory(spec: str) -> Tuple[Callable[[], Any], str]:
    """The callable named by `MODULE:FACTORY` (a dotted attribute path is allowed after the colon).

    MODULE is an importable module name (the current directory is importable) or a path to a `.py` file.

    Returns:
        `(factory, description)`; `factory` may also be an `nn.Module` instance (then it is the model).

    Raises:
        QuantizeInputError: no colon, the module cannot be imported, or it has no such attribute.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise QuantizeInputError(
            f"model {spec!r} is not MODULE:FACTORY; give a module and a callable returning the nn.Module, "
            "e.g. mypkg.models:build_model or models.py:Net."
        )
    if _looks_like_path(module_name):
        path = os.path.abspath(module_name)
        with _extra_sys_path(os.path.dirname(path)):
            module = _import_file(path)
    else:
        with _extra_sys_path(os.getcwd()):  # as `python -m`: the console script's sys.path lacks the cwd
            module = _import_module(module_name)
    obj: Any = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            where = module_name if i == 0 else f"{module_name}:{'.'.join(attr.split('.')[:i])}"
            names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else (f" Callables there: {', '.join(names[:12])}." if names else "")
            raise QuantizeInputError(f"{where!r} has no attribute {part!r}.{hint}")
        obj = getattr(obj, part)
    return obj, spec


def load_state(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from `path` with `torch.load(weights_only=True)`; `{"state_dict": ...}` and
    `{"model": ...}` checkpoints are unwrapped.

    Raises:
        QuantizeInputError: missing or unreadable file, or no dict of tensors in it.
    """
    if not os.path.isfile(path):
        raise QuantizeInputError(f"--weights {path!r} does not exist; give a state dict saved with torch.save(model.state_dict(), path).")
    state = _torch_load(path, "--weights", "save it with torch.save(model.state_dict(), path)")
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            inner = state.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                state = inner
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise QuantizeInputError(
            f"--weights {path!r} holds a {type(state).__name__}, not a state dict (a dict of tensors); save it with "
            "torch.save(model.state_dict(), path)."
        )
    return state


def _load_weights(model: nn.Module, state: Dict[str, torch.Tensor], path: str, spec: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)):
            if keys:
                parts.append(f"{label} {keys[:4]}" + (f" and {len(keys) - 4} more" if len(keys) > 4 else ""))
        raise QuantizeInputError(
            f"--weights {path!r} do not fit the model built by {spec}: {'; '.join(parts)}; give the state dict "
            "of this model."
        )
    model.load_state_dict(state)


def load_model(spec: str, weights: Optional[str] = None) -> nn.Module:
    """Build the model named by `MODULE:FACTORY`, load `weights` into it and put it in eval mode.

    Raises:
        QuantizeInputError: see `resolve_factory` and `load_state`; the factory fails when called with no
            arguments, or returns something that is not an `nn.Module`; the weights do not fit.
    """
    factory, _ = resolve_factory(spec)
    state = load_state(weights) if weights is not None else None  # a bad file fails before building the model
    if isinstance(factory, nn.Module):
        model: Any = factory
    elif not callable(factory):
        raise QuantizeInputError(
            f"{spec} is a {type(factory).__name__}, not a callable returning a torch.nn.Module; name a function or class."
        )
    else:
        try:
            model = factory()
        except Exception as e:  # noqa: BLE001
            raise QuantizeInputError(
                f"calling {spec}() failed: {one_line(e)}; the factory must build the model with no arguments."
            ) from e
    if not isinstance(model, nn.Module):
        raise QuantizeInputError(
            f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module; the factory must return the model."
        )
    if state is not None and weights is not None:
        _load_weights(model, state, weights, spec)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# --data
# --------------------------------------------------------------------------------------------------


def _first_tensor(value: Any) -> Optional[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _as_inputs(data: torch.Tensor, path: str) -> torch.Tensor:
    if data.dim() == 0 or data.shape[0] == 0:
        raise QuantizeInputError(
            f"--data {path!r} holds a tensor of shape {tuple(data.shape)}; expected inputs (N, ...) with N >= 1."
        )
    # float32 like the model (fxq.prepare refuses others); integer inputs (token ids) stay as they are
    return data.float() if data.is_floating_point() else data


def _image_files(folder: str) -> List[str]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_SUFFIXES)]
    return files


def _image_array(img: Any, gray: bool) -> np.ndarray:
    """One PIL image as a float32 (C, H, W) array in [0, 1]."""
    if img.mode in ("I", "I;16", "I;16L", "I;16B") and gray:
        arr = np.asarray(img, dtype=np.float32) / 65535.0
    elif img.mode == "F" and gray:
        arr = np.asarray(img, dtype=np.float32)
    else:
        arr = np.asarray(img.convert("L" if gray else "RGB"), dtype=np.float32) / 255.0
    arr = np.clip(arr, 0.0, 1.0)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_images(folder: str, progress: bool = False) -> torch.Tensor:
    """Every PNG/JPEG file in `folder` and its subfolders (sorted) as one float tensor (N, C, H, W) in [0, 1].

    C is 1 when every image is grayscale, else 3 (RGB; alpha dropped). Images are not resized.

    Raises:
        QuantizeInputError: no images, an unreadable image, or images of different sizes (names them).
    """
    try:
        from PIL import Image
    except ImportError as e:
        raise QuantizeInputError(f"--data {folder!r} is an image folder, which needs Pillow: pip install pillow.") from e
    files = _image_files(folder)
    if not files:
        raise QuantizeInputError(
            f"--data {folder!r} holds no PNG or JPEG images (in it or its subfolders); give a folder of "
            f"{'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files, a .pt file or a .npy file."
        )
    from tqdm.auto import tqdm

    images = []
    for path in tqdm(files, desc="images", disable=not progress, leave=False, dynamic_ncols=True):
        try:
            with Image.open(path) as img:
                img.load()
                images.append((path, img.copy()))
        except Exception as e:  # noqa: BLE001
            raise QuantizeInputError(f"--data: cannot read image {path!r}: {one_line(e)}") from e
    sizes = Counter(img.size for _, img in images)
    if len(sizes) > 1:
        example = {size: next(p for p, img in images if img.size == size) for size in sizes}
        listed = ", ".join(
            f"{w}x{h} ({n} image{'s' if n > 1 else ''}, e.g. {os.path.relpath(example[(w, h)], folder)})"
            for (w, h), n in sizes.most_common()
        )
        raise QuantizeInputError(
            f"--data {folder!r}: images have {len(sizes)} different sizes (width x height): {listed}; resize them "
            "to one size."
        )
    gray = all(img.mode in GRAYSCALE_MODES for _, img in images)
    return torch.from_numpy(np.stack([_image_array(img, gray) for _, img in images]))


def load_inputs(path: str, progress: bool = False) -> torch.Tensor:
    """The model inputs (N, ...) held by `path`: a `.pt`/`.pth` file (a tensor, or a dict/tuple/list whose
    first tensor is the inputs; read with `torch.load(weights_only=True)`), a `.npy` file, or a folder of
    PNG/JPEG images (`load_images`). Floating inputs become float32.

    Raises:
        QuantizeInputError: missing, unreadable or empty data, or an unsupported file type.
    """
    if os.path.isdir(path):
        return load_images(path, progress)
    if not os.path.exists(path):
        raise QuantizeInputError(f"--data {path!r} does not exist; give a .pt file, a .npy file or a folder of images.")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in TENSOR_SUFFIXES:
        value = _torch_load(path, "--data", "save the inputs with torch.save(x, path)")
        data = _first_tensor(value)
        if data is None:
            raise QuantizeInputError(
                f"--data {path!r} holds a {type(value).__name__} without a tensor; save the inputs (N, ...) as a "
                "tensor, or a dict/tuple whose first tensor is the inputs."
            )
        return _as_inputs(data, path)
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise QuantizeInputError(f"--data {path!r} cannot be read by numpy.load: {one_line(e)}") from e
        if array.dtype.kind not in "fiub":
            raise QuantizeInputError(f"--data {path!r} holds a {array.dtype} array; expected numbers (N, ...).")
        return _as_inputs(torch.from_numpy(np.ascontiguousarray(array)), path)
    raise QuantizeInputError(
        f"--data {path!r} has an unsupported type {suffix or '(no suffix)'!r}; give a .pt/.pth file (a tensor, or a "
        "dict/tuple whose first tensor is the inputs), a .npy file, or a folder of PNG/JPEG images."
    )


def make_batches(data: torch.Tensor, batch_size: int, seed: int) -> List[torch.Tensor]:
    """The inputs shuffled with `seed` (image folders come sorted by class) and cut into batches."""
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    data = data[perm]
    return [data[i : i + batch_size] for i in range(0, len(data), batch_size)]
