"""drill input checks (before any qemu starts), its qemu command line, the CLI's errors, the agent client,
and qemu dying with its parent (PR_SET_PDEATHSIG) even when the parent is killed with SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vimgtools.drill import boot
from vimgtools.drill.__main__ import main
from vimgtools.drill.monitor import Agent
from vimgtools.drill.qemu import Drive, Machine, argv
from vimgtools.drill.workdir import WorkDir, replica_disks
from vimgtools.errors import DrillError, InvalidInput
from vimgtools.replicate.manifest import Disk, Manifest, save


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    d = tmp_path / "disk.img"
    with open(d, "wb") as f:
        f.truncate(1 << 20)
    return d


@pytest.fixture
def never_qemu(tmp_path: Path) -> tuple[str, Path]:
    """A "qemu" that records that it was started: input checks must come first."""
    mark = tmp_path / "started"
    q = tmp_path / "qemu"
    q.write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    q.chmod(0o755)
    return str(q), mark


@pytest.mark.parametrize(
    ("options", "option", "words"),
    [
        ({"accel": "xen"}, "accel", "use one of kvm, tcg"),
        ({"net": "bridge"}, "net", "none, user"),
        ({"bus": "nvme"}, "bus", "virtio"),
        ({"memory_mb": 10}, "memory", "64 MiB"),
        ({"cpus": 0}, "cpus", "1 to 255"),
        ({"timeout": 0}, "timeout", "more than 0"),
        ({"grace": -1}, "grace", "0 seconds or more"),
        ({"agent": True, "expect": "x"}, "expect", "not both"),
        ({"expect": "(["}, "expect", "not a regular expression"),
        ({"screenshot": Path("/nonexistent/dir/s.png")}, "screenshot", "does not exist"),
        ({"log": Path("/nonexistent/dir/serial.log")}, "log", "does not exist"),
    ],
)
def test_bad_options_are_refused_before_qemu(
    disk: Path, never_qemu: tuple[str, Path], options: dict[str, object], option: str, words: str
) -> None:
    qemu, mark = never_qemu
    with pytest.raises(InvalidInput) as e:
        boot([disk], qemu=qemu, **options)
    assert e.value.option == option and words in str(e.value)
    assert e.value.exit_code == 2
    assert not mark.exists()


def test_unknown_option(disk: Path) -> None:
    with pytest.raises(InvalidInput, match="colour"):
        boot([disk], colour="blue")


def test_bad_disks_named(tmp_path: Path, never_qemu: tuple[str, Path]) -> None:
    qemu, mark = never_qemu
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes(b"QFI\xfb" + b"\xff" * 508)
    cases = {
        tmp_path / "missing.img": "no such file",
        tmp_path: "a directory without manifest.json: not a replica directory",
        Path("/dev/null"): "not a regular file or block device",
        empty: "empty",
        broken: "not an image qemu can read",
    }
    for path, words in cases.items():
        with pytest.raises(InvalidInput) as e:
            boot([path], accel="tcg", qemu=qemu)
        assert str(e.value).startswith(f"{path}: ") and words in str(e.value), e.value
    with pytest.raises(InvalidInput, match="no disk"):
        boot([], accel="tcg", qemu=qemu)
    assert not mark.exists()


def test_cli_bad_input_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "replica" / "disk0.img"
    assert main([str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vimgtools.drill: error: {missing}: no such file or device"]


def test_cli_option_value_errors_exit_2(disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--accel", "xen", str(disk)])
    assert e.value.code == 2
    assert main(["--cpus", "0", "--accel", "tcg", str(disk)]) == 2
    assert "--cpus: 0: give 1 to 255" in capsys.readouterr().err


def test_command_line_opens_the_replica_read_only(tmp_path: Path) -> None:
    m = Machine(
        drives=(
            Drive(tmp_path / "a.img", "raw", tmp_path / "a.qcow2"),
            Drive(Path("/dev/vg/b"), "qcow2", tmp_path / "b.qcow2", True),
        ),
        accel="tcg",
        uefi=True,
        vars_file=tmp_path / "vars.fd",
        net="user",
        agent_socket=tmp_path / "qga.sock",
        serial_log=tmp_path / "serial.log",
    )
    a = argv(m)
    devs = [json.loads(a[i + 1]) for i, x in enumerate(a) if x == "-blockdev"]
    bases = [d for d in devs if d["node-name"].startswith("base")]
    assert [b["file"]["filename"] for b in bases] == [str(tmp_path / "a.img"), "/dev/vg/b"]
    assert all(b["read-only"] and b["file"]["read-only"] for b in bases)
    assert bases[1]["file"]["driver"] == "host_device" and bases[1]["driver"] == "qcow2"
    overlays = [d for d in devs if d["node-name"].startswith("disk")]
    assert [o["backing"] for o in overlays] == ["base0", "base1"]
    assert "virtio-blk-pci,drive=disk0,bootindex=0" in a
    assert "-S" in a and "-no-reboot" in a
    assert "user,model=virtio-net-pci,restrict=on" in a
    assert any(x.startswith("if=pflash") and "readonly=on" in x for x in a)
    assert "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0" in a
    assert f"file,id=serial0,path={tmp_path / 'serial.log'}" in a
    assert argv(Machine(drives=())).count("none") >= 2  # -display none, -nic none


def test_agent_client_against_a_fake_agent(tmp_path: Path) -> None:
    sock = tmp_path / "qga.sock"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = ""
        while data := await reader.read(4096):  # QMP messages are JSON objects, not lines
            buf += data.decode()
            while buf.strip():
                msg, end = json.JSONDecoder().raw_decode(buf.lstrip())
                buf = buf.lstrip()[end:]
                if msg["execute"] == "guest-ping":
                    ret: object = {}
                else:
                    ret = {"kernel-release": "6.1.0-9-amd64", "pretty-name": "Debian GNU/Linux 12 (bookworm)"}
                writer.write(json.dumps({"return": ret, "id": msg.get("id")}).encode() + b"\n")
                await writer.drain()
        writer.close()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    async def run() -> None:
        server = await asyncio.start_unix_server(serve, str(sock))
        agent = Agent()
        assert await agent.ask("guest-ping", sock) == {}
        info = await agent.ask("guest-get-osinfo", sock)
        assert info["kernel-release"] == "6.1.0-9-amd64"
        await agent.close()
        server.close()
        sock.unlink()
        server = await asyncio.start_unix_server(silent, str(sock))
        t0 = time.monotonic()
        quiet = Agent()
        assert await quiet.ask("guest-ping", sock, timeout=0.5) is None  # no agent in the guest (yet)
        assert time.monotonic() - t0 < 2
        await quiet.close()
        assert await Agent().ask("guest-ping", tmp_path / "none.sock", timeout=0.5) is None
        server.close()
        await server.wait_closed()

    asyncio.run(run())


CHILD = """
import sys, time
from pathlib import Path
from vimgtools.drill.qemu import Process
p = Process(["sleep", "600"], stderr_file=Path(sys.argv[1]))
print(p.pid, flush=True)
time.sleep(600)
"""


def test_qemu_dies_with_its_parent_even_on_sigkill(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "err")], stdout=subprocess.PIPE, text=True
    ) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        os.kill(child, 0)  # running
        parent.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its SIGKILLed parent")


def test_qemu_that_will_not_start_is_a_drill_error_also_inside_an_event_loop(
    disk: Path, tmp_path: Path
) -> None:
    q = tmp_path / "qemu"
    q.write_text("#!/bin/sh\necho 'qemu-system-x86_64: -machine pc,accel=tcg: no such machine' >&2\nexit 1\n")
    q.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()

    async def in_a_loop() -> None:
        boot([disk], accel="tcg", qemu=str(q), workdir=work)

    with pytest.raises(
        DrillError, match="qemu did not start: qemu-system-x86_64: -machine pc,accel=tcg: no such"
    ):
        asyncio.run(in_a_loop())
    (run,) = work.glob("vimg-drill-*")
    assert not list(run.glob("*.qcow2"))  # the overlay went all the same


def test_a_replica_directory_gives_its_disks_in_the_manifests_order(tmp_path: Path) -> None:
    dest = tmp_path / "mail"
    dest.mkdir()
    disks = [
        Disk("vda", "vda.img", "/src/sys.qcow2", "raw", 1 << 20, None),
        Disk("vdb", "vdb.qcow2", "/src/d.qcow2", "qcow2", 1 << 20, None),
    ]
    save(
        dest,
        Manifest(guest="mail", generation=3, time="2026-12-01T02:00:07Z", consistency="offline", disks=disks),
    )
    assert replica_disks([dest], ()) == [(dest / "vda.img", "raw"), (dest / "vdb.qcow2", "qcow2")]
    with pytest.raises(InvalidInput, match="given alone"):
        replica_disks([dest, tmp_path / "x.img"], ())
    with pytest.raises(InvalidInput, match="no --format"):
        replica_disks([dest], ("raw",))
    (dest / "manifest.json").write_text("{")
    with pytest.raises(InvalidInput, match="not a vimgtools manifest"):
        replica_disks([dest], ())
    # the CLI: a missing disk of the replica is named
    save(dest, Manifest(guest="mail", generation=3, time="t", consistency="offline", disks=disks))
    with pytest.raises(InvalidInput, match=f"^{dest / 'vda.img'}: no such file"):
        boot([dest], accel="tcg")


def test_sockets_of_a_deep_workdir_fit_a_unix_socket_path(tmp_path: Path) -> None:
    """A --workdir deep down (pytest-xdist's temporary directories were): QEMU's sockets go to a short
    private directory instead of failing with "Path must be less than 108 bytes"."""
    import socket

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    shallow = WorkDir(tmp_path)
    assert shallow.socket("qmp.sock").parent == shallow.path
    shallow.close(keep_logs=False)
    work = WorkDir(deep)
    path = work.socket("qmp.sock")
    assert len(os.fsencode(path)) <= 107 and path.parent != work.path
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # really a socket's path
    assert work.socket("qga.sock").parent == path.parent
    work.close(keep_logs=False)
    assert not path.parent.exists() and not work.path.exists()
