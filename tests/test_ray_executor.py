"""``--executor ray``: LoadGen runs whose batches run on Ray actors (a local Ray of 2 CPUs, shared by the tests).

Every run starts its actors afresh (each imports torch: seconds on 2 cores), so the runs are few and
each checks several things. Faults are real: actor processes killed with SIGKILL mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from tiny_encodings import calibrate_tiny_unet, unet_example_args

from harness.cli import main
from harness.ray_cluster import plan_actors
from sdxl.errors import UserError

REPO = Path(__file__).resolve().parent.parent
NULL_CONF = Path(__file__).parent / "data" / "null_valid_user.conf"
#: a driver that owns a local Ray for the module's tests, printing its address and authentication mode
_HOLDER = ("import os, ray, sys; ray.init(num_cpus=2, include_dashboard=False, logging_level='ERROR'); "
           "print(ray.get_runtime_context().gcs_address, os.environ.get('RAY_AUTH_MODE', ''), flush=True); "
           "sys.stdin.read()")


@pytest.fixture(scope="module")
def ray_address():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    address, _, auth_mode = holder.stdout.readline().strip().partition(" ")
    assert address, "the test's Ray did not start"
    saved = os.environ.get("RAY_AUTH_MODE")
    if auth_mode:  # as a user attaching to a cluster with token authentication sets it
        os.environ["RAY_AUTH_MODE"] = auth_mode
    yield address
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = saved
    holder.stdin.close()
    holder.wait(timeout=60)


def _record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def _accuracy(test: dict) -> dict[int, str]:
    entries = json.loads((Path(test["dir"]) / "mlperf_log_accuracy.json").read_text())
    indices = [e["qsl_idx"] for e in entries]
    assert len(indices) == len(set(indices)), "a sample was answered twice"
    return {e["qsl_idx"]: e["data"] for e in entries}


def test_offline_both_modes_on_two_actors_that_live_across_the_tests(ray_address, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--profile", "tiny", "--backend", "null", "--executor", "ray", "--ray-address", ray_address,
                 "--ray-actors", "2", "--max-batchsize", "4", "--mode", "both", "--user-conf", str(NULL_CONF),
                 "--output", str(out)]) == 0
    record = _record(out)
    perf, acc = record["tests"]
    assert record["status"] == "completed" and perf["validity"] == "VALID" and perf["sut"]["failed_samples"] == 0
    executor = record["executor"]
    assert executor["executor"] == "ray" and executor["started_local_cluster"] is False
    actors = executor["actors"]
    assert [a["name"] for a in actors] == ["worker-0", "worker-1"] and all(a["alive_at_end"] for a in actors)
    assert all(a["num_cpus"] == 1 and a["backend"] == "null" and a["device"] == "cpu" for a in actors)
    for test in (perf, acc):  # the same two processes served both tests: built once for the run
        assert {w["pid"] for w in test["executor"]["workers"]} == {a["pid"] for a in actors}
        workers = test["sut"]["workers"]
        assert set(workers) == {"worker-0", "worker-1"} and all(w["samples"] > 0 for w in workers.values())
        assert sum(w["samples"] for w in workers.values()) == test["sut"]["samples"]
    assert max(int(k) for k in perf["sut"]["batch_sizes"]) == 4
    assert sorted(_accuracy(acc)) == list(range(acc["samples"]))
    table = capsys.readouterr().out
    assert "worker-0" in table and "worker-1" in table  # the per-actor table


def test_tiny_accuracy_bytes_equal_the_in_process_run(ray_address, tmp_path, tiny_backend):
    # fake-quant encodings with a weights delta and pre-scales (SmoothQuant): the actors must load the
    # bytes shipped to them through the object store, not the driver's files
    _, encodings = calibrate_tiny_unet(tiny_backend, unet_example_args(tiny_backend), "smoothquant-w8a8", tmp_path)
    assert json.loads(encodings.read_text())["weights_delta"]
    common = ["run", "--profile", "tiny", "--accuracy", "--max-samples", "2", "--max-batchsize", "1",
              "--encodings", str(encodings), "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--output", str(tmp_path / "local")]) == 0
    assert main([*common, "--executor", "ray", "--ray-address", ray_address, "--ray-actors", "2",
                 "--output", str(tmp_path / "ray")]) == 0
    (local,), (ray,) = _record(tmp_path / "local")["tests"], _record(tmp_path / "ray")["tests"]
    assert set(ray["sut"]["workers"]) == {"worker-0", "worker-1"}  # one image each
    assert ray["executor"]["workers"][0]["torch_threads"] == local["executor"]["workers"][0]["torch_threads"]
    assert _accuracy(ray) == _accuracy(local) and len(_accuracy(local)) == 2
    shipped = Path(ray["backend"]["encodings"])  # the actor's copy, in its node's cache
    assert shipped.parent.parent == tmp_path / "cache" / "shipped" and shipped.read_bytes() == encodings.read_bytes()
    delta = json.loads(encodings.read_text())["weights_delta"]
    assert (shipped.parent / delta).read_bytes() == (encodings.parent / delta).read_bytes()


def _start_run(out: Path, *flags: str, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "SDXL_BENCH_NO_PROGRESS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "harness", "run", "--profile", "tiny", "--backend", "null",
                             "--executor", "ray", "--output", str(out), *flags], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_test(out: Path, mode: str, process: subprocess.Popen, timeout: float = 120) -> list[int]:
    """The actor pids, once the run's ``mode`` test has started (LoadGen wrote its detail log)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()[0]
        detail = out / mode / "mlperf_log_detail.txt"
        if (out / "run.json").is_file() and detail.is_file() and detail.stat().st_size:
            actors = _record(out).get("executor", {}).get("actors")
            if actors:
                return [a["pid"] for a in actors]
        time.sleep(0.1)
    raise AssertionError(f"the {mode} test did not start in {timeout} s")


def test_a_killed_actor_has_its_batch_reissued(ray_address, tmp_path):
    # SingleStream: one query at a time, each to the actor given fewest so far, so worker-0 is given a
    # batch again after it is killed (if it did not hold one then), and that batch goes to worker-1
    out = tmp_path / "run"
    process = _start_run(out, "--ray-address", ray_address, "--ray-actors", "2", "--scenario", "SingleStream",
                         "--accuracy", "--null-batch-ms", "300")
    pids = _wait_for_test(out, "accuracy", process)
    time.sleep(0.5)  # 16 samples of 0.3 s: a few are done
    os.kill(pids[0], signal.SIGKILL)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    record = _record(out)
    (test,) = record["tests"]
    assert record["status"] == "completed" and test["sut"]["failed_samples"] == 0
    assert [a["alive_at_end"] for a in record["executor"]["actors"]] == [False, True]
    workers = test["sut"]["workers"]
    assert workers["worker-1"]["reissued_batches"] >= 1
    logged = _accuracy(test)
    assert sorted(logged) == list(range(16)) and all(logged.values())  # each answered once, with its image


def test_losing_every_actor_fails_the_run_in_one_line_and_loadgen_ends(ray_address, tmp_path):
    out = tmp_path / "run"
    process = _start_run(out, "--ray-address", ray_address, "--ray-actors", "2", "--accuracy", "--null-batch-ms", "400")
    for pid in _wait_for_test(out, "accuracy", process):
        os.kill(pid, signal.SIGKILL)
    output = process.communicate(timeout=120)[0]  # no hang: LoadGen got an (empty) answer for every sample
    assert process.returncode == 1, output
    record = _record(out)
    assert record["status"] == "failed"
    assert record["error"].startswith("WorkersLostError: ") and "worker-" in record["error"], record["error"]
    assert "died" in record["error"] and "\n" not in record["error"]
    assert sorted(_accuracy(record["tests"][0])) == list(range(16))


def test_server_above_capacity_queues_on_the_driver_and_ends_invalid(ray_address, tmp_path):
    conf = tmp_path / "user.conf"
    conf.write_text("*.*.min_duration = 0\n*.Server.target_latency = 300\n")
    out = tmp_path / "run"
    assert main(["run", "--profile", "tiny", "--backend", "null", "--null-batch-ms", "100", "--scenario", "Server",
                 "--executor", "ray", "--ray-address", ray_address, "--ray-actors", "1", "--qps", "200",
                 "--count", "24", "--user-conf", str(conf), "--output", str(out)]) == 0
    (test,) = _record(out)["tests"]
    assert test["validity"] == "INVALID" and test["samples"] == 24 and test["sut"]["failed_samples"] == 0
    # one lane: 24 queries at 200 QPS wait for a 0.1 s batch each -- here, not in the actor's queue
    assert test["sut"]["timing_ms"]["queue_wait_per_sample"]["p99"] > 1000
    assert test["sut"]["workers"]["worker-0"]["timing_ms"]["service_per_batch"]["p99"] < 1000


def _marked_processes(mark: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mark.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_sigterm_leaves_no_ray_process_behind(tmp_path):
    mark = f"SDXL_TEST_RUN_{uuid.uuid4().hex}"
    out = tmp_path / "run"
    env = {"SDXL_TEST_MARK": mark, "RAY_ADDRESS": ""}  # no cluster given: the run starts (and owns) a local Ray
    process = _start_run(out, "--ray-actors", "1", "--accuracy", "--null-batch-ms", "400", env_extra=env)
    _wait_for_test(out, "accuracy", process)
    assert len(_marked_processes(mark)) > 3  # the run, its test, the raylet, GCS, the actor, ...
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 143, output
    assert _record(out)["status"] == "interrupted"
    deadline = time.time() + 30
    while (left := [p for p in _marked_processes(mark) if p != process.pid]) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left]


def test_executor_flags_are_checked_before_anything_starts(tmp_path, capsys):
    base = ["run", "--profile", "tiny", "--backend", "null", "--output", str(tmp_path / "run")]
    assert main([*base, "--ray-actors", "2"]) == 2
    assert "--ray-actors applies to --executor ray only" in capsys.readouterr().err
    assert main([*base, "--executor", "ray", "--device", "cuda:1"]) == 2
    assert "use --device cuda" in capsys.readouterr().err
    assert main([*base, "--executor", "ray", "--ray-address", "127.0.0.1:1"]) == 2  # nothing listens there
    assert "--ray-address 127.0.0.1:1: no Ray cluster answers" in capsys.readouterr().err
    assert main([*base, "--executor", "ray", "--ray-address", "head-node"]) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _node(node_id: str, cpus: int, gpus: int = 0, alive: bool = True) -> dict:
    return {"NodeID": node_id, "Alive": alive, "Resources": {"CPU": float(cpus), "GPU": float(gpus)}}


def test_actor_plan_one_per_device():
    nodes = [_node("a", 8, 4), _node("b", 4, 2), _node("dead", 64, 8, alive=False)]
    gpu = plan_actors("cuda", None, nodes)
    assert len(gpu) == 6 and all(s.num_gpus == 1 and s.node_id is None for s in gpu)
    assert len(plan_actors("cuda", 2, nodes)) == 2
    cpu = plan_actors("cpu", None, [_node("head", 0), *nodes])  # a CPU node is one device: pinned, all its CPUs
    assert [(s.node_id, s.num_cpus) for s in cpu] == [("a", 8), ("b", 4)]
    assert [s.num_cpus for s in plan_actors("cpu", 3, nodes)] == [4, 4, 4]
    assert [s.num_cpus for s in plan_actors("cpu", 2, [_node("a", 5), _node("b", 1)])] == [2, 2]  # 3+3 do not fit
    for device, count, message in (("cuda", 7, "needs 7 GPUs; the Ray cluster has 6"),
                                   ("cpu", 13, r"12 CPUs \(8\+4 over its nodes\), fewer than one per actor")):
        with pytest.raises(UserError, match=message):
            plan_actors(device, count, nodes)
    with pytest.raises(UserError, match="no GPU"):
        plan_actors("cuda", None, [_node("a", 8)])


@pytest.mark.slow
def test_two_node_cluster_puts_one_actor_on_each_node(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        out = tmp_path / "run"
        assert main(["run", "--profile", "tiny", "--accuracy", "--max-samples", "4", "--executor", "ray",
                     "--ray-address", cluster.address, "--output", str(out)]) == 0
        record = _record(out)
        actors = record["executor"]["actors"]
        assert len({a["node_id"] for a in actors}) == 2 and all(a["num_cpus"] == 1 for a in actors)
        (test,) = record["tests"]
        assert sorted(_accuracy(test)) == [0, 1, 2, 3]
        assert all(w["samples"] > 0 for w in test["sut"]["workers"].values())
    finally:
        cluster.shutdown()
