"""Replicating a running QEMU through ``qmp:PATH``: a real qemu-system-x86_64 (no guest OS: its disks
are written through a second QMP monitor's ``qemu-io``, which goes through the same block layer as a
guest's writes), real dirty bitmaps, QEMU's own NBD server. Fast; the booted guests with a
workload are in test_running.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import guests
import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol
from rephelp import replicate, run_json
from synchelp import MiB, digest

import vimgtools.replicate
from vimgtools.children import die_with_parent

SIZE = 64 * MiB


def qemu_img(*args: str | Path) -> str:
    return subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True, text=True).stdout


class Qemu:
    """qemu-system-x86_64 with the disks as ``-drive if=none`` (ids vda, vdb...), two QMP monitors:
    ``qmp`` for vimgtools, ``test`` for the test's own commands."""

    def __init__(self, disks: list[Path], where: Path) -> None:
        self.disks, self.where = disks, where
        self.qmp, self.test_sock = where / "qmp.sock", where / "test.sock"
        self.start()

    def start(self) -> None:
        for s in (self.qmp, self.test_sock):
            s.unlink(missing_ok=True)
        argv = ["qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-accel", "tcg", "-m", "64",
                "-name", "qguest", "-uuid", "5d1c8d1e-0000-4000-8000-000000000001",
                "-qmp", f"unix:{self.qmp},server=on,wait=off", "-qmp", f"unix:{self.test_sock},server=on,wait=off"]  # fmt: skip
        for i, d in enumerate(self.disks):
            argv += ["-drive", f"file={d},format=qcow2,if=none,id=vd{'abcd'[i]}"]
        with open(self.where / "qemu.log", "ab") as log:
            self.proc = subprocess.Popen(argv, stderr=log, preexec_fn=die_with_parent(signal.SIGKILL))
        deadline = time.monotonic() + 30
        while not self.test_sock.exists():
            assert self.proc.poll() is None, (self.where / "qemu.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        self.mon = QEMUMonitorProtocol(str(self.test_sock))
        self.mon.connect()

    def cmd(self, name: str, **args: Any) -> Any:
        return self.mon.cmd(name, **args)

    def io(self, disk: str, *commands: str) -> None:
        for c in commands:
            out = self.cmd("human-monitor-command", **{"command-line": f'qemu-io {disk} "{c}"'})
            assert "error" not in out.lower() and "conflict" not in out.lower(), out

    def bitmaps(self, disk: str = "vda") -> dict[str, dict[str, Any]]:
        node = next(b["inserted"]["node-name"] for b in self.cmd("query-block") if b["device"] == disk)
        n = next(n for n in self.cmd("query-named-block-nodes", flat=True) if n["node-name"] == node)
        return {b["name"]: b for b in n.get("dirty-bitmaps", []) if "name" in b}

    def leftovers(self) -> list[str]:
        """Anything of ours still inside QEMU."""
        out = [e["id"] for e in self.cmd("query-block-exports")]
        out += [j["device"] for j in self.cmd("query-block-jobs")]
        out += [
            n["node-name"]
            for n in self.cmd("query-named-block-nodes", flat=True)
            if "vimgtools" in n["node-name"]
        ]
        out += [b for d in ("vda", "vdb") for b in self.bitmaps(d) if b == "vimgtools.export"]
        return out

    def quit(self) -> None:
        """A clean exit: persistent bitmaps are stored."""
        self.mon.close()
        guests.drop_qmp_loop()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)

    def kill(self) -> None:
        self.mon.close()
        guests.drop_qmp_loop()
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[Qemu]:
    disks = [tmp_path / "sys.qcow2", tmp_path / "data.qcow2"]
    for disk, pattern in zip(disks, (0x11, 0x22), strict=True):
        qemu_img("create", "-q", "-f", "qcow2", disk, SIZE)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} 0 8M", "-c",
                        f"write -P {pattern + 1} 40M 2M", str(disk)], check=True, capture_output=True)  # fmt: skip
    q = Qemu(disks, tmp_path)
    yield q
    if q.proc.poll() is None:
        q.kill()


def same_after_quit(vm: Qemu, dest: Path) -> bool:
    """Stop QEMU cleanly, compare each disk with its replica, start QEMU again."""
    vm.quit()
    ok = all(
        subprocess.run(["qemu-img", "compare", "-q", str(d), str(dest / f"vd{'ab'[i]}.img")]).returncode == 0
        for i, d in enumerate(vm.disks)
    )
    vm.start()
    return ok


def test_full_then_incremental_through_qmp(vm: Qemu, tmp_path: Path) -> None:
    dest = tmp_path / "dr"
    out = run_json(f"qmp:{vm.qmp}", dest)
    assert out["generation"] == 1 and out["consistency"] == "crash" and out["guest"] == "qguest"
    assert [d["mode"] for d in out["disks"]] == ["full", "full"] and out["warnings"]
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["uuid"] == "5d1c8d1e-0000-4000-8000-000000000001" and manifest["consistency"] == "crash"
    assert [(d["target"], d["bitmap"], d["source"]) for d in manifest["disks"]] == [
        ("vda", "vimgtools.gen-1", str(vm.disks[0])),
        ("vdb", "vimgtools.gen-1", str(vm.disks[1])),
    ]
    assert not (dest / "domain.xml").exists()  # a QEMU without libvirt has no definition
    assert vm.leftovers() == [] and list(vm.bitmaps()) == ["vimgtools.gen-1"]
    vm.io("vda", "write -P 0x33 20M 4k", "write -z 0 64k")
    out = run_json(f"qmp:{vm.qmp}", dest)
    vda, vdb = out["disks"]
    assert out["generation"] == 2 and vda["mode"] == vdb["mode"] == "incremental"
    assert vda["bytes_read"] <= 4 * 65536 and vdb["bytes_read"] == 0  # the two dirty clusters, both sides
    assert vda["bytes_written"] == 4096  # the 4 KiB page; the zeroed cluster is punched
    assert list(vm.bitmaps()) == ["vimgtools.gen-2"] and vm.leftovers() == []
    assert same_after_quit(vm, dest)
    # QEMU stopped cleanly and started again: the bitmap was stored, tracking goes on.
    vm.io("vdb", "write -P 0x55 1M 4k")
    out = run_json(f"qmp:{vm.qmp}", dest)
    assert [d["mode"] for d in out["disks"]] == ["incremental", "incremental"]
    assert out["disks"][1]["bytes_written"] == 4096 and same_after_quit(vm, dest)


def test_writes_during_the_copy_are_the_next_generation(vm: Qemu, tmp_path: Path) -> None:
    """The moment is the transaction: what the guest writes after it is not in this generation,
    and is in the next (its bitmap started in the same transaction)."""
    dest = tmp_path / "dr"
    run_json(f"qmp:{vm.qmp}", dest)
    vm.io("vda", *(f"write -P {0x60 + i} {i}M 1M" for i in range(8)))  # generation 2 reads these 8 MiB
    p = subprocess.Popen(
        [sys.executable, "-m", "vimgtools.replicate", "--json", "-q", "-b", "4096", f"qmp:{vm.qmp}", str(dest)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not vm.cmd("query-block-exports"):  # the moment is taken once our exports exist
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    vm.io("vda", "write -P 0x77 7M 4k", "write -P 0x78 50M 4k")  # after the moment
    out, _ = p.communicate()
    assert p.returncode == 0 and json.loads(out)["generation"] == 2
    with open(dest / "vda.img", "rb") as f:
        f.seek(7 * MiB)
        assert f.read(4096) == bytes([0x67]) * 4096  # as at the moment, not the later write
        f.seek(50 * MiB)
        assert f.read(4096) == bytes(4096)
    assert "vimgtools.gen-2" in vm.bitmaps() and vm.bitmaps()["vimgtools.gen-2"]["count"] >= 2 * 65536
    out3 = run_json(f"qmp:{vm.qmp}", dest)
    assert out3["disks"][0]["mode"] == "incremental" and out3["disks"][0]["bytes_written"] == 2 * 4096
    assert same_after_quit(vm, dest)


def test_qemu_killed_then_tracking_lost_and_found_again(vm: Qemu, tmp_path: Path) -> None:
    dest = tmp_path / "dr"
    run_json(f"qmp:{vm.qmp}", dest)
    vm.quit()  # a bitmap added while QEMU runs is in the qcow2 once QEMU has closed it
    vm.start()
    vm.io("vda", "write -P 0x44 30M 4k")
    vm.kill()  # its bitmaps stay "in-use" in the qcow2: inconsistent when it starts again
    vm.start()
    assert vm.bitmaps()["vimgtools.gen-1"]["inconsistent"]
    p = replicate(f"qmp:{vm.qmp}", dest)
    out = json.loads(p.stdout)
    assert [d["mode"] for d in out["disks"]] == ["rescan", "rescan"]
    assert "inconsistent" in out["disks"][0]["reason"] and "inconsistent" in p.stderr
    assert list(vm.bitmaps()) == ["vimgtools.gen-2"] and not vm.bitmaps()["vimgtools.gen-2"].get(
        "inconsistent"
    )
    assert same_after_quit(vm, dest)
    vm.io("vda", "write -P 0x45 31M 4k")
    out = run_json(f"qmp:{vm.qmp}", dest)
    assert out["disks"][0]["mode"] == "incremental" and same_after_quit(vm, dest)


def test_a_disk_resized_between_runs(vm: Qemu, tmp_path: Path) -> None:
    dest = tmp_path / "dr"
    run_json(f"qmp:{vm.qmp}", dest)
    vm.cmd("block_resize", device="vdb", size=2 * SIZE)
    vm.io("vdb", f"write -P 0x99 {SIZE + MiB} 4k")
    out = run_json(f"qmp:{vm.qmp}", dest)
    vda, vdb = out["disks"]
    assert vda["mode"] == "incremental" and vdb["mode"] == "rescan" and "resized" in vdb["reason"]
    assert os.path.getsize(dest / "vdb.img") == 2 * SIZE
    assert json.loads((dest / "manifest.json").read_text())["disks"][1]["virtual_size"] == 2 * SIZE
    assert same_after_quit(vm, dest)


def test_kill_9_leaves_the_last_generation_whole_and_qemu_clean(vm: Qemu, tmp_path: Path) -> None:
    dest = tmp_path / "dr"
    run_json(f"qmp:{vm.qmp}", dest)
    old = (digest(dest / "vda.img"), digest(dest / "vdb.img"))
    vm.io("vda", *(f"write -P {i + 1} {i}M 1M" for i in range(20)))
    vm.io("vdb", *(f"write -P {i + 1} {i}M 1M" for i in range(60)))
    generations = set()
    for delay in (0.2, 0.5, 0.8, 1.2):
        p = subprocess.Popen([sys.executable, "-m", "vimgtools.replicate", "-q", f"qmp:{vm.qmp}", str(dest)])
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        subprocess.run(
            [sys.executable, "-m", "vimgtools.replicate", "-q", "--recover", str(dest)], check=True
        )
        manifest = json.loads((dest / "manifest.json").read_text())
        generations.add(manifest["generation"])
        if manifest["generation"] == 1:  # vda written, vdb half: both back to generation 1
            got = (digest(dest / "vda.img"), digest(dest / "vdb.img"))
            assert got == old, f"two generations in DEST after kill -9 at {delay} s"
    out = run_json(f"qmp:{vm.qmp}", dest)
    assert out["generation"] == max(generations) + 1
    if max(generations) == 1:  # put back whole: still incremental
        assert [d["mode"] for d in out["disks"]] == ["incremental", "incremental"], out
    # Only this generation's bitmap (a killed run's gen-N kept its name: this one has a name of its own).
    bitmap = json.loads((dest / "manifest.json").read_text())["disks"][1]["bitmap"]
    assert bitmap.startswith(f"vimgtools.gen-{out['generation']}")
    assert vm.leftovers() == [] and list(vm.bitmaps("vdb")) == [bitmap]
    assert not list(Path("/var/tmp").glob("vimgtools-scratch-*"))  # scratch files unlinked at once
    assert same_after_quit(vm, dest)


def test_dry_run_changes_nothing_in_qemu_or_dest(vm: Qemu, tmp_path: Path) -> None:
    dest = tmp_path / "dr"
    out = run_json("-n", f"qmp:{vm.qmp}", dest)
    assert out["dry_run"] is True and not dest.exists()
    assert vm.bitmaps() == {} and vm.leftovers() == []
    run_json(f"qmp:{vm.qmp}", dest)
    before = {p.name: digest(p) for p in dest.iterdir()}
    vm.io("vda", "write -P 0x33 20M 4k")
    out = run_json("-n", f"qmp:{vm.qmp}", dest)
    assert out["disks"][0]["mode"] == "incremental" and out["disks"][0]["changed"] == 1
    assert {p.name: digest(p) for p in dest.iterdir()} == before
    assert list(vm.bitmaps()) == ["vimgtools.gen-1"] and vm.leftovers() == []


def test_bad_guests_are_one_line_errors(tmp_path: Path) -> None:
    for args, said in (
        ([f"qmp:{tmp_path}/nothing.sock", tmp_path / "dr"], "no such QMP socket"),
        ([tmp_path / "typo.qcow2", tmp_path / "dr"], "no such image"),
        (["--agent", "x", tmp_path / "a.img", tmp_path / "dr"], "--agent applies only"),
    ):
        p = replicate(*args, check=2)
        assert said in p.stderr.strip().splitlines()[-1] and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "dr").exists()


class FakeAgent:
    """A guest agent on a unix socket that answers ping/freeze/thaw and records them (a fake beside
    the booted guest's real agent in test_running.py: here only our watchdog is under test)."""

    def __init__(self, path: Path) -> None:
        self.calls: list[str] = []
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(4)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.srv.shutdown(socket.SHUT_RDWR)
        self.srv.close()

    def _client(self, conn: socket.socket) -> None:
        answers = {"guest-ping": {}, "guest-fsfreeze-freeze": 2, "guest-fsfreeze-thaw": 2}
        decoder, buf = json.JSONDecoder(), ""
        with conn:
            while data := conn.recv(65536):  # a JSON stream, as qemu-ga reads it (no newlines needed)
                buf += data.decode()
                while buf.strip():
                    try:
                        msg, end = decoder.raw_decode(buf.lstrip())
                    except ValueError:
                        break
                    buf = buf.lstrip()[end:]
                    self.calls.append(msg["execute"])
                    reply = {"return": answers.get(msg["execute"], {}), "id": msg.get("id")}
                    with contextlib.suppress(OSError):
                        conn.sendall(json.dumps(reply).encode() + b"\n")


def test_the_watchdog_thaws_when_vimgtools_dies_frozen(vm: Qemu, tmp_path: Path) -> None:
    agent = FakeAgent(tmp_path / "qga.sock")
    try:
        _watchdog_case(vm, agent, tmp_path)
    finally:
        agent.close()


def _watchdog_case(vm: Qemu, agent: FakeAgent, tmp_path: Path) -> None:
    dest = tmp_path / "dr"
    out = run_json("--agent", tmp_path / "qga.sock", f"qmp:{vm.qmp}", dest)
    assert out["consistency"] == "application" and agent.calls[-2:] == [
        "guest-fsfreeze-freeze",
        "guest-fsfreeze-thaw",
    ]
    assert json.loads((dest / "manifest.json").read_text())["consistency"] == "application"
    agent.calls.clear()
    env = dict(os.environ, VIMGTOOLS_TEST_HOLD_FROZEN="60")
    p = subprocess.Popen(
        [sys.executable, "-m", "vimgtools.replicate", "-q", "--agent", str(tmp_path / "qga.sock"), f"qmp:{vm.qmp}", str(dest)],
        env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while "guest-fsfreeze-freeze" not in agent.calls:
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 15
    while "guest-fsfreeze-thaw" not in agent.calls:
        assert time.monotonic() < deadline, f"the guest stayed frozen: {agent.calls}"
        time.sleep(0.05)
    out = run_json("--agent", tmp_path / "qga.sock", f"qmp:{vm.qmp}", dest)  # and the next run is whole
    assert out["generation"] == 2 and vm.leftovers() == []
    # In-process (a library user): the watchdog is told "thawed" without waiting for it, and reaped
    # by the end of the run: nothing of it left running, no zombie.
    r = vimgtools.replicate.replicate(f"qmp:{vm.qmp}", dest, agent=str(tmp_path / "qga.sock"))
    assert r.consistency == "application" and r.generation == 3
    assert _children_running("watchdog.py") == []


def _children_running(name: str) -> list[str]:
    """Our child processes (zombies too) whose command line names ``name``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and (name.encode() in cmd or fields[0] == "Z"):
            found.append(f"{stat.parent.name} {fields[0]} {cmd!r}")
    return found


def test_the_guest_shutting_down_mid_run(vm: Qemu, tmp_path: Path) -> None:
    """QEMU exits while its disks are read: the run fails (exit 1, one line), the replica directory
    keeps the last generation, and the next run (QEMU started again) is incremental and correct."""
    dest = tmp_path / "dr"
    run_json(f"qmp:{vm.qmp}", dest)
    vm.io("vdb", *(f"write -P {i + 1} {i}M 1M" for i in range(60)))
    p = subprocess.Popen(
        [sys.executable, "-m", "vimgtools.replicate", "-q", "-b", "4096", f"qmp:{vm.qmp}", str(dest)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not vm.cmd("query-block-exports"):
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    vm.quit()  # the guest powers off: QEMU stores its bitmaps and exits
    _, err = p.communicate()
    assert p.returncode == 1 and "Traceback" not in err, err
    assert json.loads((dest / "manifest.json").read_text())["generation"] == 1
    subprocess.run([sys.executable, "-m", "vimgtools.replicate", "-q", "--recover", str(dest)], check=True)
    vm.start()
    out = run_json(f"qmp:{vm.qmp}", dest)
    assert out["generation"] == 2 and [d["mode"] for d in out["disks"]] == ["incremental", "incremental"]
    assert same_after_quit(vm, dest)
