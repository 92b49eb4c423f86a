"""The agent's pure rules: which inventory it reports, replica environment, start validation, GPU holding,
bundle member safety and the errors a failed start answers with."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path, PurePosixPath

import pytest
from duanflow_agent import catalog, domain
from duanflow_agent.adapters.bundles import extract
from duanflow_agent.domain import Inventory, Replica
from duanflow_proto.errors import ConflictError, DeadlineExceededError, InvalidInputError, RemoteError
from duanflow_proto.messages.agent import GpuInfo, StartReplica

DIGEST = "ab" * 32

REAL = Inventory(
    gpus=(
        GpuInfo(index=0, uuid="GPU-a", gpu_type="H100", memory_total_mb=81559),
        GpuInfo(index=1, uuid="GPU-b", gpu_type="H100", memory_total_mb=81559),
    ),
    driver_version="550.54",
    cuda_version="12.4",
)


def cmd(**over: object) -> StartReplica:
    base: dict[str, object] = {
        "replica_id": "rp-1",
        "env": "main",
        "app": "demo",
        "release": "rel_20260505_1842",
        "function": "predict",
        "module": "app",
        "bundle_url": "http://s3/b.zip",
        "bundle_digest": DIGEST,
        "stream": "DUANFLOW_INV",
        "consumer": "fn_main_demo_predict",
    }
    base.update(over)
    return StartReplica(**base)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- inventory


@pytest.mark.parametrize(
    ("probed", "declared", "simulate", "types", "simulated"),
    [
        (None, "", False, [], False),
        (None, "", True, catalog.types(), True),
        (REAL, "", True, ["H100", "H100"], False),
        (REAL, "", False, ["H100", "H100"], False),
        (REAL, "L4:2", False, ["L4", "L4"], True),
        (None, "H100:2,l4", False, ["H100", "H100", "L4"], True),
        (Inventory(), "", True, catalog.types(), True),
        (Inventory(), "", False, [], False),
    ],
    ids=["cpu-host", "simulate", "nvml-wins-over-simulate", "nvml", "declared-wins", "declared", "no-gpus-simulate",
         "no-gpus"],
)  # fmt: skip
def test_choose_inventory(
    probed: Inventory | None, declared: str, simulate: bool, types: list[str], simulated: bool
) -> None:
    inv = domain.choose_inventory(probed=probed, declared=declared, simulate=simulate)
    assert [g.gpu_type for g in inv.gpus] == types
    assert inv.simulated is simulated
    assert all(g.simulated is simulated for g in inv.gpus)
    assert [g.index for g in inv.gpus] == list(range(len(types)))


def test_declared_inventory_has_nominal_memory_and_unique_uuids() -> None:
    inv = domain.declared_inventory("H100:8")
    assert len(inv.gpus) == 8 and {g.memory_total_mb for g in inv.gpus} == {80 * 1024}
    assert len({g.uuid for g in inv.gpus}) == 8 and all(g.uuid.startswith("sim-") for g in inv.gpus)


def test_bad_declaration_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="unknown GPU type"):
        domain.choose_inventory(probed=REAL, declared="X9:1", simulate=False)


@pytest.mark.parametrize(
    ("host", "agent_id"),
    [("gpu-box", "ag-gpu-box"), ("GPU_Box.example.com", "ag-gpu_box-example-com"), ("...", "ag-host")],
)
def test_default_agent_id_is_a_subject_token(host: str, agent_id: str) -> None:
    assert domain.default_agent_id(host) == agent_id


def test_capacity_report_lists_live_replicas_only() -> None:
    live, dead = Replica(cmd=cmd(replica_id="rp-live", gpu_indices=[1])), Replica(cmd=cmd(replica_id="rp-dead"))
    live.state, dead.state = domain.READY, domain.EXITED
    report = domain.capacity_report(
        agent_id="ag-1",
        host="h",
        region="eu",
        labels={"a": "b"},
        inventory=REAL,
        cpu_count=8,
        memory_mb=1000,
        prices={"H100": 2.0},
        replicas=domain.live_replicas([live, dead]),
        ts_ms=1,
        interval_s=2.0,
    )
    assert [r.replica_id for r in report.replicas] == ["rp-live"]
    assert report.simulated is False and report.driver_version == "550.54" and report.cuda_version == "12.4"
    assert [g.index for g in domain.free_gpus(REAL, [live, dead])] == [0]


# --------------------------------------------------------------------------- replica environment


def test_replica_env_follows_the_contract() -> None:
    c = cmd(gpu_indices=[1, 0], env_vars={"HF_TOKEN": "t", "DUANFLOW_REPLICA_ID": "spoofed"}, concurrency=3)
    env = domain.replica_env(
        c,
        base={"PATH": "/usr/bin", "PYTHONPATH": "/site"},
        bundle_dir="/w/bundles/x",
        nats_url="nats://n:4222",
        nats_user="agent",
        nats_password="pw",
        simulated_gpu=False,
    )
    assert env["PATH"] == "/usr/bin" and env["HF_TOKEN"] == "t"
    assert env["DUANFLOW_REPLICA_ID"] == "rp-1", "the contract's variables are not overridable by env_vars"
    assert env["PYTHONPATH"] == "/w/bundles/x:/site"
    assert env["CUDA_VISIBLE_DEVICES"] == "1,0" and env["DUANFLOW_SIMULATED_GPU"] == "0"
    assert (env["DUANFLOW_NATS_URL"], env["DUANFLOW_NATS_USER"], env["DUANFLOW_NATS_PASSWORD"]) == (
        "nats://n:4222",
        "agent",
        "pw",
    )
    assert env["DUANFLOW_CONCURRENCY"] == "3" and float(env["DUANFLOW_TIMEOUT_S"]) == 300.0
    expected = {
        "DUANFLOW_ENV": "main",
        "DUANFLOW_APP": "demo",
        "DUANFLOW_RELEASE": "rel_20260505_1842",
        "DUANFLOW_FUNCTION": "predict",
        "DUANFLOW_MODULE": "app",
        "DUANFLOW_STREAM": "DUANFLOW_INV",
        "DUANFLOW_CONSUMER": "fn_main_demo_predict",
    }
    assert {k: env[k] for k in expected} == expected


@pytest.mark.parametrize(("gpus", "cuda"), [([], ""), ([2], "")])
def test_simulated_gpus_expose_no_device(gpus: list[int], cuda: str) -> None:
    env = domain.replica_env(
        cmd(gpu_indices=gpus),
        base={},
        bundle_dir="/b",
        nats_url="n",
        nats_user="",
        nats_password="",
        simulated_gpu=True,
    )
    assert env["CUDA_VISIBLE_DEVICES"] == cuda and env["DUANFLOW_SIMULATED_GPU"] == "1"
    assert env["PYTHONPATH"] == "/b"


# --------------------------------------------------------------------------- start validation and GPU holding


@pytest.mark.parametrize(
    ("over", "says"),
    [
        ({"replica_id": "rp.1"}, "cannot be used as a name"),
        ({"app": "has space"}, "cannot be used as a name"),
        ({"env": "*"}, "cannot be used as a name"),
        ({"module": "my-app"}, "not an importable module name"),
        ({"module": ""}, "not an importable module name"),
        ({"concurrency": 0}, "concurrency must be at least 1"),
        ({"timeout_s": 0.0}, "timeout_s must be positive"),
        ({"gpu_indices": [5]}, "do not exist on this agent"),
        ({"gpu_indices": [0, 0]}, "name a GPU twice"),
        ({"bundle_digest": "abc"}, "not a sha256 hex digest"),
    ],
)
def test_bad_start_commands_are_refused(over: dict[str, object], says: str) -> None:
    with pytest.raises(InvalidInputError, match=says):
        domain.validate_start(cmd(**over), REAL)


def test_good_start_command_passes() -> None:
    domain.validate_start(cmd(module="pkg.app", gpu_indices=[0, 1], bundle_digest="sha256:" + DIGEST.upper()), REAL)


@pytest.mark.parametrize(
    ("holder_state", "conflict"),
    [(domain.STARTING, True), (domain.READY, True), (domain.STOPPING, True), (domain.EXITED, False)],
)
def test_a_held_gpu_is_not_given_twice(holder_state: str, conflict: bool) -> None:
    holder = Replica(cmd=cmd(replica_id="rp-holder", gpu_indices=[0]))
    holder.state = holder_state
    wanted = cmd(replica_id="rp-new", gpu_indices=[1, 0])
    if conflict:
        with pytest.raises(ConflictError, match="rp-holder"):
            domain.check_gpus_free(wanted, [holder])
    else:
        domain.check_gpus_free(wanted, [holder])
    domain.check_gpus_free(cmd(replica_id="rp-other", gpu_indices=[1]), [holder])


# --------------------------------------------------------------------------- bundles


@pytest.mark.parametrize(
    ("member", "safe"),
    [
        ("app.py", True),
        ("pkg/mod.py", True),
        ("pkg/", True),
        ("../evil.py", False),
        ("pkg/../../evil.py", False),
        ("/etc/passwd", False),
        ("..\\evil.py", False),
        ("C:/evil.py", False),
        ("", False),
    ],
)
def test_safe_member(member: str, safe: bool) -> None:
    if safe:
        assert isinstance(domain.safe_member(member), PurePosixPath)
    else:
        with pytest.raises(InvalidInputError, match="escapes"):
            domain.safe_member(member)


def _zip(tmp_path: Path, files: dict[str, str]) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    path = tmp_path / "b.zip"
    path.write_bytes(buf.getvalue())
    return path


def test_extract_writes_the_bundle(tmp_path: Path) -> None:
    extract(_zip(tmp_path, {"app.py": "x = 1", "pkg/mod.py": "y = 2"}), tmp_path / "out")
    assert (tmp_path / "out" / "app.py").read_text() == "x = 1"
    assert (tmp_path / "out" / "pkg" / "mod.py").read_text() == "y = 2"


def test_extract_refuses_path_traversal(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="escapes"):
        extract(_zip(tmp_path, {"app.py": "", "../evil.py": "boom"}), tmp_path / "out")
    assert not (tmp_path / "evil.py").exists()


def test_extract_refuses_a_non_zip(tmp_path: Path) -> None:
    path = tmp_path / "b.zip"
    path.write_bytes(b"not a zip")
    with pytest.raises(InvalidInputError, match="not a zip"):
        extract(path, tmp_path / "out")


# --------------------------------------------------------------------------- failure messages


def test_exited_early_names_the_log_and_the_stderr_tail() -> None:
    rec = Replica(cmd=cmd())
    rec.exit_code = 1
    rec.stderr_tail.extend(["Traceback (most recent call last):", "ImportError: no module named torch"])
    err = domain.exited_early(rec, Path("/w/logs/rp-1.log"))
    assert isinstance(err, RemoteError)
    assert "exited with code 1 before it was ready" in err.message
    assert "ImportError: no module named torch" in err.message and "/w/logs/rp-1.log" in err.message
    assert err.details["log_path"] == "/w/logs/rp-1.log" and err.details["exit_code"] == "1"


def test_killed_replica_and_silent_stderr() -> None:
    rec = Replica(cmd=cmd())
    rec.exit_code = -9
    err = domain.exited_early(rec, Path("/w/logs/rp-1.log"))
    assert "was killed by signal 9" in err.message and "(no stderr output)" in err.message


def test_not_ready_in_time_is_a_timeout_naming_the_log() -> None:
    err = domain.not_ready_in_time(Replica(cmd=cmd()), Path("/w/logs/rp-1.log"), 1.5)
    assert isinstance(err, DeadlineExceededError) and err.code == "timeout"
    assert "not ready within 1.5s" in err.message and err.details["log_path"] == "/w/logs/rp-1.log"


def test_replica_log_path() -> None:
    assert domain.replica_log_path(Path("/w"), "rp-1") == Path("/w/logs/rp-1.log")
    with pytest.raises(ValueError, match="cannot be used"):
        domain.replica_log_path(Path("/w"), "../x")


def test_forget_exited() -> None:
    old, new, live = Replica(cmd=cmd(replica_id="a")), Replica(cmd=cmd(replica_id="b")), Replica(cmd=cmd())
    old.state, old.exited_at = domain.EXITED, 10.0
    new.state, new.exited_at = domain.EXITED, 95.0
    assert domain.forget_exited({"a": old, "b": new, "c": live}, now=100.0, keep_s=60.0) == ["a"]
