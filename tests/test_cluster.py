"""The cluster launcher configs pass Ray's own validator, keep Ray off the internet with token authentication
on, and fail a node's setup when the shared file system is not mounted; broken ones are caught."""

import copy
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"


def load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def validate(cfg):
    validate_config(prepare_config(copy.deepcopy(cfg)))


@pytest.mark.parametrize("name", ["gpu.yaml", "local.yaml"])
def test_cluster_configs_validate(name):
    validate(load(name))


def test_gpu_config_pins_a_ray_gpu_image_and_integer_resources():
    cfg = load("gpu.yaml")
    assert cfg["docker"]["image"].startswith("rayproject/ray:2.60") and cfg["docker"]["image"].endswith("-gpu")
    for node in cfg["available_node_types"].values():
        assert all(isinstance(v, int) for v in node["resources"].values())
        assert node["resources"]["GPU"] >= 1


@pytest.mark.parametrize("break_it", [
    lambda c: c.update(head_node_type="no_such_type"),
    lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5),
    lambda c: c.update(not_a_ray_key=1),
])
def test_broken_gpu_configs_are_rejected(break_it):
    cfg = load("gpu.yaml")
    break_it(cfg)
    with pytest.raises(Exception):  # noqa: B017 - Ray raises ValueError or jsonschema's ValidationError
        validate(cfg)


# ----------------------------------------------------------------- secure by default, loud on a bad mount

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
START_KEYS = ("head_start_ray_commands", "worker_start_ray_commands")
SETUP_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
# `mount` run as a command (at the start, after sudo or after a shell operator), not mountpoint or umount.
MOUNT_CALL = re.compile(r"(?:^|[;&|(]\s*|\bsudo\s+)mount\s")


def commands(cfg: dict, keys: tuple[str, ...]) -> list[str]:
    """The commands under ``keys``, at the top level and in every node type."""
    scopes = [cfg, *[node for node in cfg.get("available_node_types", {}).values()]]
    return [cmd for scope in scopes for key in keys for cmd in scope.get(key) or []]


def ray_starts(cfg: dict) -> list[str]:
    """Each `ray start` with what comes before it in its command (a prefix like VAR=value, an export)."""
    return [cmd[:m.end()] + cmd[m.end():].split("&&")[0] for cmd in commands(cfg, START_KEYS)
            for m in re.finditer(r"\bray start\b", cmd)]


def dashboard_problems(cfg: dict) -> list[str]:
    """Ray's dashboard and job API run code for whoever reaches them: loopback only, said explicitly (the
    default has changed across Ray versions), and no security group rule opens a port to the internet."""
    problems = []
    for cmd in ray_starts(cfg):
        hosts = re.findall(r"--dashboard-host[= ](\S+)", cmd)
        if "--head" in cmd and not hosts:
            problems.append(f"head start leaves the dashboard bind to Ray's default: {cmd}")
        problems += [f"dashboard bound to {h}: {cmd}" for h in hosts if h.strip("'\"") not in LOOPBACK]
    for rule in cfg.get("provider", {}).get("security_group", {}).get("IpPermissions", []):
        if rule.get("FromPort") != 22 and any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])):
            problems.append(f"security group opens ports to the internet: {rule}")
    return problems


def auth_problems(cfg: dict) -> list[str]:
    """Token authentication: every node starts Ray in token mode with the cluster's token, and so does the
    driver that `ray submit` runs (the container's environment or the login shell's)."""
    problems = [f"ray start without RAY_AUTH_MODE=token: {cmd}" for cmd in ray_starts(cfg) if not token_mode(cmd)]
    if "RAY_AUTH_MODE=disabled" in yaml.safe_dump(cfg):
        problems.append("RAY_AUTH_MODE=disabled somewhere")
    if not any(dst.endswith("/.ray/auth_token") for dst in cfg.get("file_mounts", {})):
        problems.append("no file mount brings the token (~/.ray/auth_token) to the nodes")
    shells = [*cfg.get("docker", {}).get("run_options", []), *commands(cfg, SETUP_KEYS)]
    if not any(re.search(r"RAY_AUTH_MODE=token", s) for s in shells):
        problems.append("the driver's shell (docker run_options or ~/.bashrc) does not set RAY_AUTH_MODE=token")
    return problems


def token_mode(start: str) -> bool:
    """Whether RAY_AUTH_MODE=token is set for this `ray start`: on it (VAR=value ray start) or exported before."""
    before = start.split("ray start")[0]
    own = re.split(r"&&|\|\||;", before)[-1]  # a VAR=value prefix counts only on the ray start itself
    return bool(re.search(r"\bRAY_AUTH_MODE=token\s+$", own) or re.search(r"\bexport RAY_AUTH_MODE=token\b", before))


def mount_problems(cfg: dict) -> list[str]:
    """No mount's failure is swallowed (|| true, ; ..., a pipe, a background &), and setup checks that
    /mnt/shared is a mount point before Ray starts."""
    problems = []
    for cmd in commands(cfg, SETUP_KEYS + START_KEYS):
        for m in MOUNT_CALL.finditer(cmd):
            rest = cmd[m.end():].replace("&&", "")
            if any(op in rest for op in ("|", ";", "&")):
                problems.append(f"a failed mount would go unnoticed: {cmd}")
    checks = [c for c in commands(cfg, SETUP_KEYS) if re.match(r"mountpoint (-q )?/mnt/shared\b", c)]
    if not any("||" not in c or MOUNT_CALL.search(c.split("||", 1)[1]) for c in checks):
        problems.append("no setup command stops when /mnt/shared is not a mount point")
    return problems


@pytest.mark.parametrize("name", ["gpu.yaml", "local.yaml"])
@pytest.mark.parametrize("problems", [dashboard_problems, auth_problems, mount_problems])
def test_cluster_configs_are_secure_and_mount_loudly(name, problems):
    assert problems(load(name)) == []


def edit_commands(key: str, edit: Callable[[str], str]) -> Callable[[dict], None]:
    return lambda c: c.update({key: [edit(cmd) for cmd in c[key]]})


@pytest.mark.parametrize("name", ["gpu.yaml", "local.yaml"])
@pytest.mark.parametrize(("problems", "break_it"), [
    (dashboard_problems, edit_commands("head_start_ray_commands", lambda s: s.replace("127.0.0.1", "0.0.0.0"))),
    (dashboard_problems, edit_commands("head_start_ray_commands", lambda s: s.replace(" --dashboard-host=", " --x="))),
    (dashboard_problems, lambda c: c["provider"].setdefault("security_group", {}).update(IpPermissions=[
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])),
    (auth_problems, edit_commands("worker_start_ray_commands", lambda s: s.replace("RAY_AUTH_MODE=token ", ""))),
    (auth_problems, edit_commands("head_start_ray_commands", lambda s: s.replace("=token", "=disabled"))),
    (auth_problems, edit_commands("head_start_ray_commands",
                                  lambda s: s.replace("RAY_AUTH_MODE=token ray start", "ray start")
                                  .replace("ray stop", "RAY_AUTH_MODE=token ray stop"))),
    (auth_problems, lambda c: c["file_mounts"].pop(next(d for d in c["file_mounts"] if d.endswith("auth_token")))),
    (auth_problems, lambda c: [c.get("docker", {}).pop("run_options", None),
                               c.update(setup_commands=[s for s in c["setup_commands"] if "RAY_AUTH" not in s])]),
    (mount_problems, edit_commands("initialization_commands", lambda s: s + " || true")),
    (mount_problems, lambda c: c["initialization_commands"].append("sudo mount -a; echo mounted")),
    (mount_problems, lambda c: c.update(initialization_commands=[
        s for s in c["initialization_commands"] if not s.startswith("mountpoint")])),
])
def test_insecure_or_silent_configs_are_caught(name, problems, break_it):
    cfg = load(name)
    break_it(cfg)
    assert problems(cfg) != []
