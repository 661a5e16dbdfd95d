"""Export a checkpoint's model weights as a deployable Hugging Face style folder.

::

    dest/
      model.safetensors                      # or, above max_shard_size:
      model-00001-of-00003.safetensors ...   #   shards plus
      model.safetensors.index.json           #   {"metadata": {"total_size"}, "weight_map"}
      training_metadata.json                 # step, metrics, config, library versions
      README.md

Where the weights are: ``state["model"]`` (``state["ema_model"]`` with
``use_ema=True``), as :class:`~fastckpt.TrainingState` saves them; a state that is
itself a ``{name: tensor}`` mapping is taken as the weights. Nested dicts are
joined with ``.``; an ``AveragedModel`` state dict (``module.*`` plus
``n_averaged``) is unwrapped to the plain model's names.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors
import torch

from . import __version__, commit, convert, reader
from .catalog import read_info
from .convert import INDEX_FILE, SINGLE_FILE
from .errors import CheckpointError

METADATA_FILE = "training_metadata.json"


def export_for_inference(src: str, dest: str, *, use_ema: bool = False,
                         max_shard_size: int = 5 << 30) -> str:
    """Write the model weights of the checkpoint ``src`` to the new folder ``dest``.

    ``dest`` must not exist or be empty; the folder is built in a temporary sibling
    and renamed into place when complete. Files above ``max_shard_size`` bytes are
    split into shards. Returns ``dest``.
    """
    src = reader.resolve(src)
    dest = convert.new_path(dest)
    state = reader.load(src, mmap=True)
    specs = convert.tensor_specs(model_weights(state, use_ema))
    meta = _training_metadata(src, state, use_ema)

    def fill(folder: str) -> None:
        files = convert.write_hf_files(folder, specs, max_shard_size)
        _write_text(os.path.join(folder, METADATA_FILE), json.dumps(meta, indent=2) + "\n")
        _write_text(os.path.join(folder, "README.md"), _readme(meta, files))

    return convert.build_folder(dest, fill)


def model_weights(state: Any, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` model weights inside a loaded state (see module doc)."""
    key = "ema_model" if use_ema else "model"
    if isinstance(state, Mapping) and state.get(key) is not None:
        weights = state[key]
    elif not use_ema and isinstance(state, Mapping) and key not in state:
        weights = state
    else:
        raise CheckpointError(f"the checkpoint's state has no {key!r} weights to export")
    flat = _flat(weights, "")
    if "n_averaged" in flat and all(k.startswith("module.") for k in flat if k != "n_averaged"):
        flat = {k[len("module."):]: v for k, v in flat.items() if k != "n_averaged"}
    if not flat:
        raise CheckpointError(f"the {key!r} weights hold no tensors")
    return flat


def _flat(tree: Any, prefix: str) -> dict[str, torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if not isinstance(tree, Mapping):
        raise CheckpointError(
            f"model weight {prefix or '<root>'!r} is a {type(tree).__name__}, not a tensor"
        )
    out: dict[str, torch.Tensor] = {}
    for k, v in tree.items():
        for name, t in _flat(v, f"{prefix}.{k}" if prefix else str(k)).items():
            if name in out:  # {"a.b": x, "a": {"b": y}}: one would silently replace the other
                raise CheckpointError(f"two model weights export as {name!r} (keys such as "
                                      "'a.b' and 'a' -> 'b'); rename one of them")
            out[name] = t
    return out


def _write_text(path: str, text: str) -> None:
    commit.write_file_durably(path, text.encode("utf-8"))


def _training_metadata(src: str, state: Any, use_ema: bool) -> dict:
    info = read_info(src)
    config = state.get("config") if isinstance(state, Mapping) else None
    return _plain({
        "step": info.step,
        "time": info.time,
        "metrics": info.metrics,
        "tags": list(info.tags),
        "description": info.description,
        "config": config,
        "weights": "ema_model" if use_ema else "model",
        "source": src,
        "checksum": info.checksum,
        "library": {
            "fastckpt": __version__,
            "torch": torch.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    })


def _plain(v: Any) -> Any:
    """Strict-JSON form of a metadata value (non-finite floats become strings)."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return _plain(v.item())
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _readme(meta: dict, files: list[str]) -> str:
    when = datetime.datetime.fromtimestamp(meta["time"], datetime.timezone.utc)
    origin = f"`{meta['source']}` (saved {when:%Y-%m-%d %H:%M:%S} UTC)"
    if meta["weights"] == "ema_model":
        origin += ", EMA weights"
    rows = [f"| {k} | {v} |" for k, v in meta["metrics"].items()] or ["| (none) | |"]
    listing = [f"- `{f}`" for f in files]
    listing.append(f"- `{METADATA_FILE}`: step, metrics, training config, library versions")
    if files == [SINGLE_FILE]:
        loading = ["from safetensors.torch import load_file", "",
                   f'state_dict = load_file("{SINGLE_FILE}")']
    else:
        loading = [
            "import json",
            "from safetensors.torch import load_file",
            "",
            f'index = json.load(open("{INDEX_FILE}"))',
            "state_dict = {}",
            'for f in sorted(set(index["weight_map"].values())):',
            "    state_dict.update(load_file(f))",
        ]
    lines = [
        f"# Model weights, step {meta['step']}",
        "",
        f"Exported by fastckpt {__version__} from the training checkpoint {origin}.",
        "",
        *([meta["description"], ""] if meta["description"] else []),
        "## Metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *rows,
        "",
        "## Files",
        "",
        *listing,
        "",
        "## Loading",
        "",
        "```python",
        *loading,
        "model.load_state_dict(state_dict)",
        "```",
    ]
    return "\n".join(lines) + "\n"
