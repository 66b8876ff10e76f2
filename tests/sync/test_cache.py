"""The host's page cache is left as found, whichever way residency is learned, in every reading mode.

Residency comes from cachestat(2) (Linux >= 6.5), mincore(2) over a mapping, or RWF_NOWAIT
reads ($VIMGTOOLS_CACHE_PROBE forces one). Files are made cold with fsync + FADV_DONTNEED
(clean pages really go), then a known part of them is read to stand for the host's working
set; after a run exactly that part is cached. Pre-cached ranges start where a piece does, so
that the RWF_NOWAIT probe, which learns the cached pages at the start of each piece it reads,
can be exact too.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from synchelp import MiB, cli, digest, write_image

from vimgtools.image import CACHE_PROBES, Image
from vimgtools.sync.chunks import CHUNK_SIZE, CacheGuard, Extents
from vimgtools.sync.compare import scan

SIZE = 24 * MiB
HOST = [(0, 8 * MiB), (12 * MiB, 256 << 10), (20 * MiB, 1 * MiB)]  # what "the host" had cached


def _cold(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _warm(path: Path, ranges: list[tuple[int, int]]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # exactly these pages, no readahead
        for off, n in ranges:
            os.pread(fd, n, off)
    finally:
        os.close(fd)


def _cached(path: Path) -> list[tuple[int, int]]:
    """The cached byte ranges of ``path`` (mincore over a mapping: we own the file)."""
    with Image(path) as img:
        r = img.residency(0, img.size)
    assert r is not None
    if r is True:
        return [(0, os.path.getsize(path))]
    if r is False:
        return []
    out: list[tuple[int, int]] = []
    for i, v in enumerate(r):
        if v:
            if out and out[-1][0] + out[-1][1] == i * 4096:
                out[-1] = (out[-1][0], out[-1][1] + 4096)
            else:
                out.append((i * 4096, 4096))
    return out


def _probe_works(probe: str) -> bool:
    if probe == "nowait":
        return True
    img = Image(__file__)
    try:
        return (img._cachestat(0, 4096) if probe == "cachestat" else img._mincore(0, 4096)) is not None
    finally:
        img.close()


def _use_probe(name: str, monkeypatch: pytest.MonkeyPatch) -> str:
    if not _probe_works(name):
        pytest.skip(f"{name} does not work on this kernel")
    monkeypatch.setenv("VIMGTOOLS_CACHE_PROBE", name)
    return name


@pytest.fixture(params=CACHE_PROBES)
def probe(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    return _use_probe(request.param, monkeypatch)


@pytest.fixture(params=[p for p in CACHE_PROBES if p != "nowait"])
def residency_probe(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The probes that learn residency without reading (nowait learns it by reading, and reads no ahead)."""
    return _use_probe(request.param, monkeypatch)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    src = write_image(tmp_path / "src.img", SIZE, [(0, SIZE)], seed=41)
    dst = write_image(tmp_path / "dst.img", SIZE, [(0, SIZE)], seed=42)
    return src, dst


@pytest.mark.parametrize("mode", ["compare", "state", "signature"])
def test_host_cache_left_as_found(pair: tuple[Path, Path], tmp_path: Path, probe: str, mode: str) -> None:
    """Cold pages a run brings in go; the host's cached pages stay (whole chunks and parts of chunks)."""
    src, dst = pair
    state = tmp_path / "s.state"
    if mode == "state":  # the previous night: a state describing the replica as it is now
        cli("--state", state, src, dst)
        write_image(src, SIZE, [(0, SIZE)], seed=43)
    for p in (src, dst):
        _cold(p)
        _warm(p, HOST)
    assert _cached(src) == HOST and _cached(dst) == HOST
    if mode == "signature":
        cli("--signature", src, "-o", tmp_path / "src.sig")
    elif mode == "state":
        assert cli("--json", "--state", state, src, dst).stdout.count('"trusted"') == 1
    else:
        cli("-n", src, dst)
    _left_as_found(src, probe)
    if mode == "compare":
        _left_as_found(dst, probe)
    if mode == "state":
        assert digest(src) == digest(dst)


def _pages(ranges: list[tuple[int, int]]) -> set[int]:
    return {o + k for o, n in ranges for k in range(0, n, 4096)}


def _left_as_found(path: Path, probe: str) -> None:
    """Exactly the host's pages cached. With ``nowait`` nearly (docs/sync.md): a RWF_NOWAIT read
    starts the read it refuses, and where the disk answers within the call (more often under
    load, when the call waits to submit) that piece looks cached and stays. There the host's pages
    must all stay, and most of what the run brought in must go."""
    if probe != "nowait":
        assert _cached(path) == HOST
        return
    cached, host = _pages(_cached(path)), _pages(HOST)
    assert host <= cached, sorted(host - cached)[:8]
    assert (len(cached) - len(host)) * 4096 <= (SIZE - sum(n for _, n in HOST)) // 2, _cached(path)


def test_keep_cache_keeps_what_it_read(pair: tuple[Path, Path], probe: str) -> None:
    src, dst = pair
    for p in (src, dst):
        _cold(p)
    cli("-n", "--keep-cache", src, dst)
    assert _cached(src) == [(0, SIZE)] and _cached(dst) == [(0, SIZE)]


def test_residency_says_which_pages_are_cached(pair: tuple[Path, Path], residency_probe: str) -> None:
    src, _ = pair
    probe = residency_probe
    _cold(src)
    _warm(src, [(CHUNK_SIZE + 4096, 8192)])
    with Image(src) as img:
        assert img.cache_probe() == probe
        assert img.residency(0, CHUNK_SIZE) is False
        part = img.residency(CHUNK_SIZE, CHUNK_SIZE)
        assert isinstance(part, bytes) and part[:4] == b"\0\1\1\0" and sum(part) == 2
        _warm(src, [(0, CHUNK_SIZE)])
        assert img.residency(0, CHUNK_SIZE) is True
        assert img.residency(SIZE, CHUNK_SIZE) is True  # nothing there, so nothing to give back


def test_a_read_outside_a_guard_learns_residency_before_reading(
    pair: tuple[Path, Path], residency_probe: str
) -> None:
    """A probe by reading (RWF_NOWAIT) starts the read of what is missing and, on a fast device,
    can take the page it just read in for a cached one: where the kernel tells residency, it is
    asked first. A sector's read gives back its whole page."""
    src, _ = pair
    want = src.read_bytes()[512:1024]
    _cold(src)
    with Image(src) as img:
        buf = memoryview(bytearray(512))
        assert img.read_back(buf, img.size - 512, cached_only=True) is None
        assert _cached(src) == []  # refused before reading: nothing brought in
        assert img.read_back(buf, img.size - 512) == 512
        assert _cached(src) == []
        _warm(src, [(0, 4096)])
        assert img.read_back(buf, 512, cached_only=True) == 512
        assert bytes(buf) == want
        assert _cached(src) == [(0, 4096)]


def test_guard_reads_ahead_and_gives_back_what_it_did_not_read(
    pair: tuple[Path, Path], residency_probe: str
) -> None:
    """A chunk prepared is read from the disk without a reader; closing early gives it back."""
    src, _ = pair
    _cold(src)
    with Image(src) as img:
        g = CacheGuard(img, img.size, keep_cache=False)
        g.prepare(0)
        deadline = time.monotonic() + 10
        while img.residency(0, CHUNK_SIZE) is not True and time.monotonic() < deadline:
            time.sleep(0.01)
        assert img.residency(0, CHUNK_SIZE) is True  # read ahead (POSIX_FADV_WILLNEED), maybe still in flight
        g.close()  # waits for what is in flight, then gives it back
        assert img.residency(0, CHUNK_SIZE) is False
        g = CacheGuard(img, img.size, keep_cache=False)
        g.prepare(0)
        g.close()  # at once: the read ahead is still in flight
        assert img.residency(0, CHUNK_SIZE) is False


def test_a_pass_with_regions_reads_ahead_only_them(pair: tuple[Path, Path], residency_probe: str) -> None:
    """A compare with regions (a dirty bitmap's) asks the disk for those extents only, all of a
    chunk's at once; what it read is given back, and the host's cached pages stay."""
    src, dst = pair
    regions = Extents([(64 << 10, 64 << 10), (3 * MiB, 64 << 10), (CHUNK_SIZE + MiB, 128 << 10)])
    _cold(dst)
    with Image(dst) as img:
        g = CacheGuard(img, img.size, keep_cache=False, regions=regions)
        g.prepare(0)
        deadline = time.monotonic() + 10
        while _cached(dst) != regions(0, CHUNK_SIZE) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _cached(dst) == regions(0, CHUNK_SIZE)  # those two extents, nothing around them
        g.close()
        assert _cached(dst) == []
    for p in (src, dst):
        _cold(p)
        _warm(p, HOST)
    with Image(src) as s, Image(dst) as d:
        for _ in scan(s, d, start=0, end=SIZE, block_size=4096, dst_size=SIZE, regions=regions):
            pass
    assert _cached(src) == HOST and _cached(dst) == HOST


def test_unknown_probe_name_is_ignored(pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIMGTOOLS_CACHE_PROBE", "bogus")
    with Image(pair[0]) as img:
        assert img.cache_probe() in CACHE_PROBES


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to run the reader as another user)")
def test_a_reader_who_neither_owns_nor_may_write_the_image_gets_nowait() -> None:
    """cachestat/mincore answer truly only to the owner or a writer: anyone else learns by reading."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(dir="/tmp") as d:  # /tmp: reachable for uid 65534
        os.chmod(d, 0o755)
        theirs, mine = Path(d, "root.img"), Path(d, "nobody.img")
        for p in (theirs, mine):
            p.write_bytes(bytes(1 << 20))
            p.chmod(0o644)
        os.chown(mine, 65534, 65534)
        code = f"from vimgtools.image import Image; print(Image({str(theirs)!r}).cache_probe(), Image({str(mine)!r}).cache_probe())"
        out = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
    assert out[0] == "nowait"
    assert out[1] in ("cachestat", "mincore")
