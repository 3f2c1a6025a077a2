"""Model hub access and weight files, shared by the library wrappers.

- Offline machines: the hub client retries each missing file for ~23 s. Unless the user set
  HF_HUB_OFFLINE, probe the hub once per process; if it is unreachable, switch the hub client
  to offline mode so a missing file fails in about a second (cached files still load).
- Local weight files are read without unpickling arbitrary objects: safetensors, or torch
  files through `torch.load(weights_only=True)`.
- Hub weights are identified by the commit they were loaded from (the snapshot in the local
  hub cache), not by a tag such as "main": a new upload then gives a new embedding cache key.
- A state dict is loaded so that a missing model key is an error (wrong file) while extra
  keys (classifier heads, text towers, optimiser-free training extras) are only reported.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from cbir.encoders.base import EncoderError

log = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}
_probe_result: bool | None = None


def offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def prepare_hub_access(timeout: float = 3.0) -> bool:
    """True when the hub may be contacted. Probes the endpoint once per process (a TCP
    connect, no request); when unreachable, puts the hub client in offline mode."""
    global _probe_result
    if offline_requested():
        return False
    if _probe_result is None:
        endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
        try:
            with socket.create_connection((endpoint.hostname, port), timeout=timeout):
                _probe_result = True
        except OSError as e:
            log.warning("model hub %s not reachable (%s): using the local cache only", endpoint.geturl(), e)
            _probe_result = False
    if not _probe_result:
        _go_offline()
    return _probe_result


def _go_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:  # the hub client reads its flag at import time; later checks call is_offline_mode()
        import huggingface_hub.constants as constants

        constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def missing_weights_error(encoder: str, source: str, cause: BaseException | None = None) -> EncoderError:
    """The error for pretrained weights that cannot be had: what is missing, the two fixes."""
    reason = ""
    if cause is not None:
        first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        reason = f" ({type(cause).__name__}: {first_line[:300]})"
    return EncoderError(
        f"encoder {encoder}: pretrained weights {source} are not in the local cache and the model hub "
        f"is not reachable{reason}. Fix: run once with network access (HF_HUB_OFFLINE=0) to fill the "
        "Hugging Face cache, or pass encoder.weights=<local .safetensors/.pth file>; "
        "encoder.pretrained=false builds random weights for smoke tests"
    )


def no_hub_error(encoder: str, how_to_get: str) -> EncoderError:
    """The error for models whose weights no hub hosts: say where users get them."""
    return EncoderError(
        f"encoder {encoder}: its weights are not on a model hub. {how_to_get.strip()} "
        "Then pass encoder.weights=<local file>; encoder.pretrained=false builds random weights "
        "for smoke tests"
    )


def hub_file(encoder: str, repo_id: str, filenames: str | list[str], revision: str | None = None) -> str:
    """Local path of the first of `filenames` that the hub repo has (from the cache when
    offline). Several names cover repos that offer safetensors next to a torch file."""
    prepare_hub_access()
    from huggingface_hub import hf_hub_download

    names = [filenames] if isinstance(filenames, str) else list(filenames)
    error: Exception | None = None
    for filename in names:
        try:
            return hf_hub_download(repo_id, filename, revision=revision)
        except Exception as e:  # offline, missing, gated: all lead to the same two fixes
            error = e
    raise missing_weights_error(encoder, f"'{repo_id}' (file {' or '.join(names)})", error) from error


_COMMIT = re.compile(r"[0-9a-f]{40}")


def cached_commit(repo_id: str, revision: str | None = None) -> str | None:
    """The commit that `revision` (a branch or tag, default main; a commit hash is returned as
    is) of a hub model repo points to in the local hub cache, or None when the cache has no
    record of it."""
    if revision and _COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    ref = (
        Path(constants.HF_HUB_CACHE)
        / repo_folder_name(repo_id=repo_id, repo_type="model")
        / "refs"
        / (revision or "main")
    )
    try:
        commit = ref.read_text().strip()
    except OSError:
        return None
    return commit if _COMMIT.fullmatch(commit) else None


def commit_of_file(path: str | os.PathLike) -> str | None:
    """The commit of a file inside the hub cache (`.../snapshots/<commit>/<file>`), else None."""
    parts = Path(path).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i - 1] == "snapshots" and _COMMIT.fullmatch(parts[i]):
            return parts[i]
    return None


def read_state_dict(path: str | os.PathLike, encoder: str = "encoder") -> dict[str, torch.Tensor]:
    """Tensors of a weights file, never unpickling arbitrary objects. Training checkpoints
    that nest the weights (`state_dict`, `model`, `teacher`, ...) are unwrapped."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise EncoderError(f"encoder {encoder}: encoder.weights={path}: no such file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(p))
        else:
            data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EncoderError(
            f"encoder {encoder}: cannot read {p} as weights ({type(e).__name__}: {str(e).splitlines()[0][:300]}). "
            "Torch files are loaded with weights_only=True: a checkpoint holding other Python objects "
            "must be converted once to safetensors (safetensors.torch.save_file(state_dict, 'model.safetensors'))"
        ) from e
    for key in ("state_dict", "model", "teacher", "module"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise EncoderError(f"encoder {encoder}: {p} does not hold a state dict of tensors")
    return strip_prefix(data, "module.")


def strip_prefix(state_dict: dict, prefix: str, keep_others: bool = True) -> dict:
    """Remove `prefix` from keys that carry it (DDP's `module.`, a tower's `visual.`)."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith(prefix):
            out[k[len(prefix) :]] = v
        elif keep_others:
            out[k] = v
    return out


def load_into(module: torch.nn.Module, state_dict: dict, encoder: str, source: str) -> None:
    """Load weights; every parameter/buffer of `module` must be provided by the file."""
    result = module.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(("position_ids", "relative_position_index"))]
    if missing:
        raise EncoderError(
            f"encoder {encoder}: {source} does not fit the model: {len(missing)} missing key(s), "
            f"e.g. {missing[:5]}; is it the right file for this encoder?"
        )
    if result.unexpected_keys:
        log.info(
            "encoder %s: ignored %d key(s) of %s not used for embeddings, e.g. %s",
            encoder,
            len(result.unexpected_keys),
            source,
            result.unexpected_keys[:3],
        )
