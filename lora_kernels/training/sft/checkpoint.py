"""Atomic, verifiable training checkpoints for exact resume.

Layout of ``<run_dir>/checkpoints/step-0000040/``::

    trainable.safetensors   every parameter with requires_grad (LoRA A/B and modules_to_save, or all for `full`)
    optimizer.pt            optimizer.state_dict()            (torch.save; loaded with weights_only=True)
    scheduler.pt            lr scheduler state_dict()
    rng.pt                  torch CPU + CUDA generator states, numpy and python `random` states
    trainer_state.json      step, data position, tokens seen, the resume fingerprint of the config, eval history
    manifest.json           sha256 and size of every file above; written last

Atomicity: everything is written into ``.tmp-step-0000040-<pid>/`` (each file fsync'ed), then the folder is renamed
to its final name with ``os.replace``: a reader sees either no checkpoint or a complete one, and a crash while
saving leaves the previous checkpoints untouched (stale ``.tmp-*`` folders are removed by the next save).
Loading checks the manifest first, so a truncated or altered file is reported by name instead of being half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{7,})$")
_FILES = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or does not match the current run."""


# ---------------------------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": random.getstate(),
    }


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        if not torch.cuda.is_available() or torch.cuda.device_count() < len(state["cuda"]):
            raise CheckpointError(
                f"the checkpoint holds CUDA RNG states for {len(state['cuda'])} device(s); this process sees "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}"
            )
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not support fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete-named checkpoint folders under ``root``, oldest first (temp folders are ignored)."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def save_checkpoint(
    root: Path,
    step: int,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict,
    scheduler_state: dict,
    trainer_state: dict,
    keep_last: int,
) -> Path:
    """Write a checkpoint atomically and prune to the newest ``keep_last``; returns its folder."""
    root.mkdir(parents=True, exist_ok=True)
    for p in root.glob(".tmp-*"):  # leftovers of a save that was killed half-way
        shutil.rmtree(p, ignore_errors=True)
    name = step_dir_name(step)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    save_file({k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler_state, tmp / "scheduler.pt")
    torch.save(capture_rng_state(), tmp / "rng.pt")
    state = {"format_version": FORMAT_VERSION, **trainer_state, "step": step}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    manifest = {}
    for fname in _FILES:
        _fsync_file(tmp / fname)
        manifest[fname] = {"sha256": _sha256(tmp / fname), "bytes": (tmp / fname).stat().st_size}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    _fsync_file(tmp / "manifest.json")
    _fsync_dir(tmp)
    final = root / name
    if final.exists():
        # Only possible when a run resumed from an earlier step re-reaches a step it had saved before the crash;
        # both hold the same training state, the newer one replaces the older.
        old = root / f".tmp-old-{name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    for _, p in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def resolve_resume(resume: str, root: Path) -> Path:
    """``"latest"`` -> the newest checkpoint folder under ``root``; a path -> that folder (must exist)."""
    if resume == "latest":
        found = list_checkpoints(root)
        if not found:
            raise CheckpointError(f"--resume latest: no checkpoint found in {root}")
        return found[-1][1]
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint folder")
    return path


def verify_checkpoint(path: Path) -> dict:
    """Check the manifest (presence, sizes, sha256) and return the parsed trainer_state.json."""
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: manifest.json is missing")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: manifest.json is unreadable ({e})") from None
    for fname in _FILES:
        f = path / fname
        entry = manifest.get(fname) if isinstance(manifest, dict) else None
        if entry is None:
            raise CheckpointError(f"checkpoint {path} is corrupt: manifest.json does not list {fname}")
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {fname} is missing")
        if f.stat().st_size != entry["bytes"] or _sha256(f) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {fname} does not match its sha256 in manifest.json")
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format_version {state.get('format_version')!r}; this version reads {FORMAT_VERSION}"
        )
    return state


def check_fingerprint(path: Path, state: dict, current: dict) -> None:
    saved = state.get("fingerprint", {})
    diffs = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        detail = ", ".join(f"{k}: checkpoint={saved.get(k)!r} now={current.get(k)!r}" for k in diffs)
        raise CheckpointError(f"checkpoint {path} was made with a different configuration ({detail})")


def load_checkpoint_files(path: Path) -> dict:
    """The tensors and states of a verified checkpoint (weights via safetensors, the rest weights_only)."""
    try:
        return {
            "trainable": load_file(str(path / "trainable.safetensors")),
            "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
            "scheduler": torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True),
            "rng": torch.load(path / "rng.pt", map_location="cpu", weights_only=True),
        }
    except Exception as e:  # noqa: BLE001 - any decoding failure is a corrupt checkpoint, named
        raise CheckpointError(f"checkpoint {path} could not be loaded: {type(e).__name__}: {e}") from e


def load_trainable_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {path} does not match the model's trainable parameters: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for n, p in params.items():
        t = tensors[n]
        if t.shape != p.shape or t.dtype != p.dtype:
            raise CheckpointError(
                f"checkpoint {path}: {n} has shape {tuple(t.shape)} {t.dtype}, the model has {tuple(p.shape)} {p.dtype}"
            )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])
