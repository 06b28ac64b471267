"""Checkpoints: tensors in safetensors, the rest in a small JSON file. Nothing is unpickled.

A checkpoint directory holds ``tensors.safetensors`` (meta-parameters as one flat
buffer, Adam moments) and ``state.json`` (version, Adam step, counters, reader
positions of every worker, best validation, the run config and a sha256 of the
tensor file so an altered checkpoint is refused). Tensors inside a worker's
position (a Truncated learner's carry) go to the safetensors file as
``positions.<worker>.<keys>``; the JSON holds ``{"safetensors": key}`` in their place.
The server's record of the shares it has (``received``: per worker slot, the share number, the version it was
computed at and the server's answer) is in the JSON, and the parameters a redo of one of them pulls
(``before``) in the tensor file, so a resumed server never applies a share twice. A checkpoint written without
them (before they existed) loads with no record and resumes as it did then: a share whose push had landed when
it was written, but whose report had not reached the driver, is applied once more.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import CheckpointError
from pipeline.optim import adam
from pipeline.runtime.server import PushResult, Received, ServerState
from tasks.store.filesystem import sha256_hex

FORMAT_VERSION = 1
TENSORS = "tensors.safetensors"
STATE = "state.json"
REF = "safetensors"


@dataclass(frozen=True)
class Checkpoint:
    """The server's state plus where every worker's reader stands and the run's bookkeeping."""

    server: ServerState
    positions: list[dict[str, Any] | None]
    """Every worker's position (EpisodeWorker.position; None: the start of its share)."""
    best_val: float | None
    config: dict[str, Any]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a local file, read in blocks (tasks.store.filesystem.sha256_hex, as the episode store's)."""
    with open(path, "rb") as f:
        return sha256_hex(f)


def save(directory: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` into ``directory`` (created); the JSON is written last, atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    s = checkpoint.server
    tensors = {"params": s.params.contiguous(), "adam.exp_avg": s.adam.exp_avg.contiguous(), "adam.exp_avg_sq": s.adam.exp_avg_sq.contiguous()}
    if s.before is not None:
        tensors["before.params"] = s.before[1].contiguous()
    positions = _tensors_out(checkpoint.positions, "positions", tensors)
    save_file(tensors, str(directory / TENSORS))
    state = {
        "format_version": FORMAT_VERSION,
        "tensors_sha256": sha256_file(directory / TENSORS),
        "version": s.version,
        "adam_step": s.adam.step,
        "rejected_nonfinite": s.rejected_nonfinite,
        "rejected_stale": s.rejected_stale,
        "received": {str(w): asdict(r) for w, r in s.received.items()},
        "before_version": None if s.before is None else s.before[0],
        "positions": positions,
        "best_val": checkpoint.best_val,
        "config": checkpoint.config,
    }
    tmp = directory / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, directory / STATE)
    return directory


def load(directory: str | Path) -> Checkpoint:
    """Read a checkpoint written by ``save`` (keys it does not know, like an older "extra", are ignored).

    Raises CheckpointError naming the file when one is missing, not JSON, of another
    format version, or when the tensors do not match their sha256.
    """
    directory = Path(directory)
    state_path, tensor_path = directory / STATE, directory / TENSORS
    for path in (state_path, tensor_path):
        if not path.is_file():
            raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{state_path} is not valid JSON: {e}") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{state_path}: format_version {state.get('format_version')!r}, expected {FORMAT_VERSION}")
    if sha256_file(tensor_path) != state["tensors_sha256"]:
        raise CheckpointError(f"{tensor_path}: sha256 does not match {state_path} (file altered or truncated)")
    t = load_file(str(tensor_path))
    try:
        received = {int(w): Received(r["share"], r["version"], PushResult(**r["result"])) for w, r in state.get("received", {}).items()}
        before = None if state.get("before_version") is None else (state["before_version"], t["before.params"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{state_path}: the server's record of shares is malformed ({type(e).__name__}: {e})") from None
    server = ServerState(
        params=t["params"],
        adam=adam.AdamState(state["adam_step"], t["adam.exp_avg"], t["adam.exp_avg_sq"]),
        version=state["version"],
        rejected_nonfinite=state["rejected_nonfinite"],
        rejected_stale=state["rejected_stale"],
        received=received,
        before=before,
    )
    return Checkpoint(server, _tensors_in(state["positions"], t), state["best_val"], state["config"])


def _tensors_out(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` (JSON types and tensors, nested) with each tensor moved into ``tensors`` under its dotted ``key``
    path (a copy on the CPU) and replaced by ``{REF: key}``."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {REF: key}
    if isinstance(value, dict):
        return {k: _tensors_out(v, f"{key}.{k}", tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_tensors_out(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    return value


def _tensors_in(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``_tensors_out`` undone: each ``{REF: key}`` replaced by ``tensors[key]``."""
    if isinstance(value, dict):
        if set(value) == {REF}:
            return tensors[value[REF]]
        return {k: _tensors_in(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_tensors_in(v, tensors) for v in value]
    return value
