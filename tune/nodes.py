"""Checks that every node of the Ray cluster sees the same storage before a sweep starts.

Trials write their rows with ``ResultsStore(out)`` on whichever node runs them, Tune keeps checkpoints
under ``out/ray_results``, and the activation server writes the cache. If one node's mount failed it
writes to a local folder of the same name and its rows never reach the consolidated Parquet. The
driver writes a marker with a fresh token in each folder; a task pinned to every alive node reads it
back; a node that reads anything else stops the sweep before any compute, naming node and folder.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

# A zero-CPU task starts in seconds on a healthy node; a node that cannot start one in this time would
# not run trials either, and waiting on it forever would hang the sweep before it printed anything.
CHECK_TIMEOUT_S = 120.0
_NO_ANSWER = object()


class SharedStorageError(RuntimeError):
    """A folder the sweep needs is not the same storage on every node."""


def _read_marker(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def alive_nodes(ray: Any) -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n.get("Alive")]


def node_label(node: dict[str, Any]) -> str:
    # Several nodes can share one IP (containers, or nodes started side by side): the ID tells them apart.
    return f"{node['NodeID']} ({node['NodeManagerAddress']})"


def check_shared_storage(ray: Any, folders: dict[str, str | Path], timeout_s: float = CHECK_TIMEOUT_S) -> int:
    """Raise ``SharedStorageError`` unless every alive node reads the driver's marker in every folder.

    ``folders`` maps a name ("results", "cache", ...) to a path. Returns the number of nodes checked.
    """
    token = secrets.token_hex(16)
    markers = write_markers(folders, token)
    nodes = alive_nodes(ray)
    pairs = [(node, name) for node in nodes for name in markers]
    try:
        seen = read_everywhere(ray, pairs, markers, timeout_s)
    finally:
        for marker in markers.values():
            marker.unlink(missing_ok=True)
    problems = [describe(node, name, markers[name].parent, value, timeout_s)
                for (node, name), value in zip(pairs, seen, strict=True) if value != token]
    if problems:
        raise SharedStorageError(
            f"{'; '.join(problems)}. Every node must mount the same shared file system there (cluster/README.md, "
            f"'Shared storage'): rows written on such a node would never reach the results")
    return len(nodes)


def write_markers(folders: dict[str, str | Path], token: str) -> dict[str, Path]:
    """One marker per folder, at the resolved path: trials receive ``--out`` resolved the same way."""
    markers = {}
    for name, folder in folders.items():
        path = Path(folder).resolve()
        marker = path / f".hsae-shared-{token}"
        try:
            path.mkdir(parents=True, exist_ok=True)
            marker.write_text(token)
        except OSError as exc:
            raise SharedStorageError(f"the {name} folder {path} is not writable here: {exc.strerror or exc}") from exc
        markers[name] = marker
    return markers


def read_everywhere(ray: Any, pairs: list[tuple[dict[str, Any], str]], markers: dict[str, Path],
                    timeout_s: float) -> list[Any]:
    """What each (node, folder name) pair read at that folder's marker: the text, None (no marker there),
    the error Ray raised, or ``_NO_ANSWER`` if nothing came in time."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    read = ray.remote(num_cpus=0, max_retries=0)(_read_marker)
    refs = [read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
            .remote(str(markers[name])) for node, name in pairs]
    if not refs:
        return []
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for ref in pending:
        ray.cancel(ref, force=True)
    return [read_answer(ray, ref) if ref in ready else _NO_ANSWER for ref in refs]


def read_answer(ray: Any, ref: Any) -> Any:
    try:
        return ray.get(ref)
    except Exception as exc:  # noqa: BLE001 - any Ray error (the node died, the task could not run) is an answer
        return exc


def describe(node: dict[str, Any], name: str, folder: Path, value: Any, timeout_s: float) -> str:
    if value is _NO_ANSWER:
        return f"node {node_label(node)} did not answer the check of the {name} folder {folder} in {timeout_s:.0f} s"
    if isinstance(value, Exception):
        return f"node {node_label(node)} could not check the {name} folder {folder}: {type(value).__name__}: {value}"
    return f"node {node_label(node)} does not see the {name} folder {folder} (the driver's marker is not there)"
