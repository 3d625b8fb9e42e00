"""Trial hooks for the two-node placement test (``tune.ablate.main(..., trial_hooks=[...])``, a test-only seam).

``record`` runs inside each trial's process and writes, under ``$HSAE_PLACEMENT_LOG`` (set on the test's
Ray nodes), where the trial runs and what it was given, where the activation server runs and what it
was given, and which nodes hold the activation shards the trial trains on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ray
from ray.experimental import get_object_locations
from ray.util import list_named_actors

SERVER_PREFIX = "hsae-activations"


def record(spec: Any, step: int, restored: bool) -> None:
    log = Path(os.environ["HSAE_PLACEMENT_LOG"])  # a KeyError here fails the trial: the test must set it
    server = find_server()
    entry = {"trial": spec.key, "step": step, "restored": restored, **where()}
    if step == 0:
        entry["server"] = ray.get(server.__ray_call__.remote(lambda _: where()))
    entry["shards"] = shard_facts(server)
    tmp = log / f".{spec.key}-{step}.json.tmp"
    tmp.write_text(json.dumps(entry))
    tmp.rename(log / f"{spec.key}-{step}.json")  # the test never reads half a file


def where() -> dict[str, Any]:
    """This process's node, its test label, the resources Ray assigned it and its GPU ids."""
    ctx = ray.get_runtime_context()
    return {"node": ctx.get_node_id(), "label": os.environ.get("HSAE_TEST_NODE"), "actor": ctx.get_actor_id(),
            "assigned": ctx.get_assigned_resources(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


def find_server() -> Any:
    names = [n for n in list_named_actors() if n.startswith(SERVER_PREFIX)]
    if len(names) != 1:
        raise RuntimeError(f"expected one activation server, found {names}")
    return ray.get_actor(names[0])


def shard_facts(server: Any) -> list[dict[str, Any]]:
    """For each training shard the trial fetches: the actor whose task put it, and the nodes holding a copy.

    Only the refs come back from ``prepare`` (the arrays stay in the object store), so asking here moves
    no activation to this node: a copy on this node is the one the trial's own fetch pulled.
    """
    info = ray.get(server.prepare.remote())
    refs = [x for x, _, _ in info.refs["train"]]
    locations = get_object_locations(refs)
    return [{"put_by_actor": ref.task_id().actor_id().hex(), "nodes": locations[ref]["node_ids"]} for ref in refs]
