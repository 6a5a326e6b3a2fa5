"""The ``shardstate`` command line: every command's output and exit code.

Most runs go through typer's ``CliRunner`` in this process (it shares the session's Ray and state
cluster); a few run the installed ``shardstate`` script in a subprocess against the same Ray
(``--address`` of the session's GCS), and one against an address where nothing listens.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from click.testing import Result
from typer.testing import CliRunner

import shardstate
from shardstate.cli import app, hoist_options

pytestmark = pytest.mark.timeout(240)

Cli = Callable[..., Result]


@pytest.fixture
def cli(state: shardstate.StateClient) -> Cli:
    """Run ``shardstate --cluster <session cluster> ARGS`` in this process."""
    runner = CliRunner()

    def run(*args: str, input: str | None = None) -> Result:
        return runner.invoke(app, hoist_options(["--cluster", state.cluster, *args]), input=input)

    return run


def parsed(result: Result) -> Any:
    """The single JSON document a ``--json`` run printed (lines Ray's own log monitor printed to
    this process's stdout meanwhile, such as raylet warnings, are not the CLI's and are skipped)."""
    lines = out(result).strip().splitlines()
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


def out(result: Any) -> str:
    """What the CLI printed: stdout without the lines Ray's log monitor printed to this process
    meanwhile (``(raylet) WARNING: ...``, coloured ``(pid=...)`` prefixes)."""
    kept = [line for line in result.stdout.splitlines(keepends=True) if not _ray_log_line(line)]
    return "".join(kept)


def _ray_log_line(line: str) -> bool:
    return line.startswith(("\x1b[", "(raylet)", "(pid=")) or "\x1b[33m(raylet)" in line


def wait_for(check: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)


# -- items ------------------------------------------------------------------------------------------
def test_set_get_update_delete(cli: Cli, state: shardstate.StateClient, group: str) -> None:
    done = cli("set", group, "k", '{"n": 1, "tags": ["a"]}')
    assert done.exit_code == 0, done.output
    assert state.get(group, "k") == {"n": 1, "tags": ["a"]}

    got = cli("--json", "get", group, "k")
    assert got.exit_code == 0
    version = state.get_entry(group, "k").version  # type: ignore[union-attr]
    assert parsed(got) == {"group": group, "key": "k", "value": {"n": 1, "tags": ["a"]}, "version": version}
    human = cli("get", group, "k")
    assert json.loads(out(human)) == {"n": 1, "tags": ["a"]}  # the value, as JSON

    bumped = cli("update", group, "k", '[{"type": "increment", "path": "n", "by": 2}]', "--json")
    assert bumped.exit_code == 0, bumped.output
    assert parsed(bumped) == {"old_value": {"n": 1, "tags": ["a"]}, "new_value": {"n": 3, "tags": ["a"]}}
    assert state.get(group, "k") == {"n": 3, "tags": ["a"]}

    text = cli("set", group, "s", '"hello"')
    assert text.exit_code == 0
    assert state.get(group, "s") == "hello"
    assert cli("set", group, "none", "null").exit_code == 0
    assert parsed(cli("--json", "get", group, "none"))["value"] is None  # a stored None is found

    gone = cli("--json", "delete", group, "k")
    assert gone.exit_code == 0
    assert parsed(gone) == {"old_value": {"n": 3, "tags": ["a"]}}
    assert state.get_entry(group, "k") is None
    assert cli("delete", group, "none").exit_code == 0  # a None value is there: deleted, not "missing"


def test_not_found_exits_1(cli: Cli, group: str) -> None:
    missing = cli("get", group, "nope")
    assert missing.exit_code == 1
    assert "NotFound" in missing.stderr
    assert "nope" in missing.stderr
    as_json = cli("--json", "get", group, "nope")
    assert as_json.exit_code == 1
    assert parsed(as_json)["error"]["type"] == "NotFound"
    assert cli("delete", group, "nope").exit_code == 1
    assert cli("triggers", "retry", "no-such-trigger", "c/0/1").exit_code == 1


def test_bad_input_exits_2_and_changes_nothing(cli: Cli, state: shardstate.StateClient, group: str) -> None:
    state.set(group, "k", {"n": "text"})
    version = state.get_entry(group, "k").version  # type: ignore[union-attr]
    cases = [
        ("set", group, "k", "{not json"),
        ("set", group, "k", "NaN"),
        ("set", group, "", "1"),
        ("set", "__shardstate:mine", "k", "1"),
        ("update", group, "k", "[{"),
        ("update", group, "k", '"increment"'),
        ("update", group, "k", '[{"type": "bogus", "path": "n"}]'),
        (
            "update",
            group,
            "k",
            '[{"type": "set", "path": "x", "value": 1}, {"type": "increment", "path": "n"}]',
        ),
        ("clear", "__shardstate:triggers", "--yes"),
        ("items", group, "--limit", "0"),
        ("watch", group, "--count", "0"),
    ]
    for args in cases:
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
    assert state.items(group) == [shardstate.StateItem(key="k", value={"n": "text"})]
    assert state.get_entry(group, "k").version == version  # type: ignore[union-attr]

    failed = cli("--json", "update", group, "k", '[{"type": "increment", "path": "n"}]')
    assert failed.exit_code == 2
    error = parsed(failed)["error"]
    assert error["type"] == "UpdateError"
    assert (error["op_index"], error["code"]) == (0, "not_number")


def test_a_cluster_that_is_not_running_exits_3(cli: Cli, group: str) -> None:
    result = CliRunner().invoke(app, ["--cluster", "no-such-cluster-here", "--json", "get", group, "k"])
    assert result.exit_code == 3
    assert parsed(result)["error"]["type"] == "Unavailable"
    assert shardstate.cluster.bootstrap.find_router("no-such-cluster-here") is None  # nothing started


# -- groups, status, pages --------------------------------------------------------------------------
def test_groups_status_and_items_pages(cli: Cli, state: shardstate.StateClient, group: str) -> None:
    state.set_many(group, {f"k{i:02d}": {"i": i} for i in range(7)})
    state.set(group, "other", 1)

    listed = parsed(cli("--json", "groups"))
    assert {"group": group, "count": 8} in listed["groups"]
    human = cli("groups")
    assert human.exit_code == 0
    assert group in out(human)

    status = parsed(cli("status", "--json"))
    assert status["cluster"] == state.cluster
    assert [s["index"] for s in status["shards"]] == [0, 1, 2, 3]
    assert status["keys"] >= 8
    assert status["groups"] >= 1
    assert sum(s["keys"] for s in status["shards"]) >= 8
    shown = cli("status")
    assert shown.exit_code == 0
    assert f"cluster {state.cluster}" in out(shown)

    keys: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        args = ["--json", "items", group, "--limit", "3", "--prefix", "k"]
        page = parsed(cli(*args, *(["--cursor", cursor] if cursor else [])))
        keys += [item["key"] for item in page["items"]]
        assert all(item["value"] == {"i": int(item["key"][1:])} for item in page["items"])
        assert all(isinstance(item["version"], int) and item["version"] > 0 for item in page["items"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert keys == [f"k{i:02d}" for i in range(7)]
    assert pages == 3
    first = cli("items", group, "--limit", "2")
    assert first.exit_code == 0
    assert "k00" in out(first)
    assert "next page: --cursor" in out(first)


def test_clear_asks_first(cli: Cli, state: shardstate.StateClient, group: str) -> None:
    state.set_many(group, {"a": 1, "b": 2})
    refused = cli("clear", group, input="n\n")
    assert refused.exit_code == 0
    assert "Remove all 2 items" in refused.stderr
    assert state.group_counts().get(group) == 2  # answered "no": nothing removed
    refused_json = cli("--json", "clear", group, input="\n")  # the default answer is "no"
    assert parsed(refused_json) == {"removed": 0, "cleared": False}
    assert len(state.items(group)) == 2

    agreed = cli("clear", group, input="y\n")
    assert agreed.exit_code == 0
    assert "removed 2 items" in out(agreed)
    assert state.items(group) == []
    state.set(group, "c", 3)
    assert parsed(cli("--json", "clear", group, "--yes")) == {"removed": 1, "cleared": True}
    assert state.items(group) == []


# -- watch ------------------------------------------------------------------------------------------
@pytest.fixture
def writer(state: shardstate.StateClient, group: str) -> Iterator[None]:
    """Writes ``noise`` and ``target`` in ``group`` every 50 ms until the test ends (so a watch that
    starts at any moment sees writes after it started)."""
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set():
            state.set(group, "noise", i)
            state.set(group, "target", {"i": i})
            i += 1
            stop.wait(0.05)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(10)


def test_watch_prints_live_events_of_a_key(cli: Cli, group: str, writer: None) -> None:
    seen = cli("--json", "watch", group, "target", "--count", "3", "--timeout", "120")
    assert seen.exit_code == 0, seen.output
    events = [json.loads(line) for line in out(seen).splitlines()]
    assert len(events) == 3
    assert {e["key"] for e in events} == {"target"}
    assert {e["scope"] for e in events} == {group}
    assert [e["event_type"] for e in events] in (
        ["state:updated"] * 3,
        ["state:created"] + ["state:updated"] * 2,
    )
    values = [e["new_value"]["i"] for e in events]
    assert values == sorted(values)
    assert len(set(values)) == 3
    assert len({e["event_id"] for e in events}) == 3

    human = cli("watch", group, "--count", "2", "--timeout", "120")
    assert human.exit_code == 0
    lines = out(human).splitlines()
    assert len(lines) == 2
    assert all(f"{group}/" in line and "state:" in line for line in lines)


def test_watch_ends_at_its_timeout(cli: Cli, group: str) -> None:
    quiet = cli("--json", "watch", group, "--timeout", "0.5")
    assert quiet.exit_code == 0
    assert out(quiet) == ""


# -- export / import --------------------------------------------------------------------------------
def test_export_import_round_trip(
    cli: Cli, state: shardstate.StateClient, group: str, tmp_path: Path
) -> None:
    values = {f"k{i}": {"i": i, "name": f"ünï-{i}", "nested": [1, None, {"x": 1.5}]} for i in range(50)}
    state.set_many(group, values)
    state.set(group + "-other", "x", 1)
    dump = tmp_path / "dump.jsonl"

    exported = cli("--json", "export", str(dump), "--group", group)
    assert exported.exit_code == 0, exported.output
    assert parsed(exported) == {"exported": 50, "file": str(dump)}
    lines = [json.loads(line) for line in dump.read_text(encoding="utf-8").splitlines()]
    assert {(r["group_id"], r["key"]) for r in lines} == {(group, k) for k in values}

    state.clear(group)
    imported = cli("import", str(dump))  # human output, with the progress bar on stderr
    assert imported.exit_code == 0, imported.output
    assert "imported 50 entries" in out(imported)
    assert {i.key: i.value for i in state.items(group)} == values
    assert state.items(group + "-other") == [shardstate.StateItem(key="x", value=1)]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(dump.read_text(encoding="utf-8") + "{not json}\n", encoding="utf-8")
    state.clear(group)
    assert cli("import", str(bad)).exit_code == 2
    assert state.items(group) == []  # the whole file is checked first
    assert cli("import", str(tmp_path / "missing.jsonl")).exit_code == 2


def test_export_reports_progress(state: shardstate.StateClient, group: str, tmp_path: Path) -> None:
    state.set_many(group, {f"k{i}": i for i in range(2500)})
    calls: list[tuple[int, int]] = []
    count = shardstate.export(
        tmp_path / "p.jsonl", groups=[group], state=state, progress=lambda d, t: calls.append((d, t))
    )
    assert count == 2500
    assert calls[0] == (0, 2500)
    assert calls[-1] == (2500, 2500)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    back: list[tuple[int, int]] = []
    state.clear(group)
    shardstate.import_(tmp_path / "p.jsonl", state=state, progress=lambda d, t: back.append((d, t)))
    assert back[0] == (0, 2500)
    assert back[-1] == (2500, 2500)
    assert len(state.items(group)) == 2500


# -- triggers ---------------------------------------------------------------------------------------
def test_triggers_list_and_retry(cli: Cli, state: shardstate.StateClient, group: str) -> None:
    cluster, ctl = state.cluster, f"{group}-ctl"

    def handler(event: shardstate.StateEvent) -> None:
        client = shardstate.connect(cluster=cluster)
        if not client.get(ctl, "flag"):
            raise RuntimeError("the flag is not set")
        client.update(ctl, "runs", [{"type": "increment", "path": "n"}])

    name = f"cli-{group}"
    state.on_change(handler, group_id=group, name=name, timeout=30)
    try:
        state.set(group, "a", 1)
        wait_for(lambda: any(d.trigger == name for d in state.list_dead_letters()))
        listing = parsed(cli("--json", "triggers"))
        assert any(t["name"] == name and t["group_id"] == group for t in listing["triggers"])
        letter = next(d for d in listing["dead_letters"] if d["trigger"] == name)
        assert letter["key"] == "a"
        assert "the flag is not set" in letter["error"]
        human = cli("triggers")
        assert human.exit_code == 0
        assert name in out(human)
        assert "dead letters" in out(human)

        again = cli("--json", "triggers", "retry", name, letter["event_id"])
        assert again.exit_code == 1  # still failing: kept, with more attempts
        assert parsed(again)["dead_letter"]["attempts"] > letter["attempts"]

        state.set(ctl, "flag", True)
        done = cli("triggers", "retry", name, letter["event_id"])
        assert done.exit_code == 0, done.output
        assert state.get(ctl, "runs") == {"n": 1}
        assert not any(d.trigger == name for d in state.list_dead_letters())
        assert cli("triggers", "retry", name, letter["event_id"]).exit_code == 1  # gone now
    finally:
        state.remove_trigger(name)


# -- the console ------------------------------------------------------------------------------------
def test_console_prints_url_and_token_that_work(
    new_cluster: dict[str, str], state: shardstate.StateClient
) -> None:
    from shardstate.cluster.console import stop_console

    client = shardstate.connect(**new_cluster, shards=1)
    client.set("cfg", "k", {"v": 1})
    runner = CliRunner()
    try:
        shown = runner.invoke(app, ["--cluster", client.cluster, "--json", "console", "--port", "0"])
        assert shown.exit_code == 0, shown.output
        info = parsed(shown)
        assert info["login_url"].endswith(f"?token={info['token']}")
        request = urllib.request.Request(
            info["url"].rstrip("/") + "/api/v1/groups", headers={"Authorization": f"Bearer {info['token']}"}
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert json.load(answer) == {"groups": [{"group": "cfg", "count": 1}]}
        human = runner.invoke(app, ["--cluster", client.cluster, "console", "--port", "0"])
        assert human.exit_code == 0
        assert info["url"] in out(human)
        assert info["token"] in out(human)
    finally:
        stop_console(client.cluster)


def test_console_on_a_public_address_warns(
    new_cluster: dict[str, str], state: shardstate.StateClient
) -> None:
    from shardstate.cluster.console import stop_console

    client = shardstate.connect(**new_cluster, shards=1)
    try:
        shown = CliRunner().invoke(
            app, ["--cluster", client.cluster, "console", "--host", "0.0.0.0", "--port", "0"]
        )
        assert shown.exit_code == 0, shown.output
        assert "warning" in shown.stderr
        assert "other machines" in shown.stderr
        assert "token:" in out(shown)
    finally:
        stop_console(client.cluster)


# -- the installed script, in a subprocess -----------------------------------------------------------
def _script() -> str:
    found = shutil.which("shardstate", path=os.path.dirname(sys.executable)) or shutil.which("shardstate")
    assert found, "the shardstate console script is not installed"
    return found


def _run(
    *args: str, timeout: float = 120, ray_address: str | None = None
) -> subprocess.CompletedProcess[str]:
    # Ray's token auth settings (RAY_AUTH_MODE, set by the session's ray.init) pass on; the token
    # itself is in ~/.ray/auth_token
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if ray_address is not None:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.run([_script(), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_the_installed_script_against_the_session_ray(state: shardstate.StateClient, group: str) -> None:
    address = ray.get_runtime_context().gcs_address
    base = ["--address", address, "--cluster", state.cluster]
    written = _run(*base, "set", group, "k", '{"from": "subprocess"}')
    assert written.returncode == 0, written.stderr
    assert state.get(group, "k") == {"from": "subprocess"}
    read = _run(*base, "get", group, "k", "--json")  # --json after the command works too
    assert read.returncode == 0, read.stderr
    version = state.get_entry(group, "k").version  # type: ignore[union-attr]
    assert json.loads(out(read)) == {
        "group": group,
        "key": "k",
        "value": {"from": "subprocess"},
        "version": version,
    }
    by_env = _run("--cluster", state.cluster, "--json", "groups", ray_address=address)  # RAY_ADDRESS
    assert by_env.returncode == 0, by_env.stderr
    assert {"group": group, "count": 1} in json.loads(out(by_env))["groups"]
    missing = _run(*base, "get", group, "nope")
    assert missing.returncode == 1
    assert "NotFound" in missing.stderr


def test_an_unreachable_address_exits_3(group: str) -> None:
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = _run("--address", f"127.0.0.1:{port}", "--json", "get", group, "k", timeout=60)
    assert result.returncode == 3, result.stderr
    error = json.loads(out(result))["error"]
    assert error["type"] == "Unavailable"
    assert str(port) in error["message"]


def test_shared_options_may_follow_the_command() -> None:
    assert hoist_options(["get", "g", "k", "--json", "--cluster", "c", "--address=a:1"]) == [
        "--json",
        "--cluster",
        "c",
        "--address=a:1",
        "get",
        "g",
        "k",
    ]
    assert hoist_options(["set", "g", "k", "--", "--json"]) == ["set", "g", "k", "--", "--json"]
