"""TarStream, public_fastpath's reader of postcan members, against Python's tarfile: the
same members, names and bytes from archives of every format tarfile writes, and an
error where an archive is damaged."""

from __future__ import annotations

import io
import tarfile

import pytest

from ooni_pipeline.fastpath.tar_stream import TarStream


def _archive(fmt: int, **pax) -> bytes:
    """Members a postcan could hold, and what a tar archive may hold besides."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt, pax_headers=pax or None) as tar:

        def add(name: str, data: bytes | None, kind: bytes = tarfile.REGTYPE, **extra) -> None:
            info = tarfile.TarInfo(name)
            info.type = kind
            for key, value in extra.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)

        add("2024010210_IT_webconnectivity/", None, tarfile.DIRTYPE)
        add("2024010210_IT_webconnectivity/20240102100000.000000_IT_a.post", b'{"format": "json"}')
        add("2024010210_IT_webconnectivity/empty.post", b"")
        add("2024010210_IT_webconnectivity/exactly-512.post", b"x" * 512)
        add("2024010210_IT_webconnectivity/odd.post", bytes(range(256)) * 7)
        add("2024010210_IT_webconnectivity/notes.txt", b"not a measurement")
        add("2024010210_IT_webconnectivity/link.post", None, tarfile.SYMTYPE, linkname="odd.post")
        add("d" * 120 + "/long-name.post", b"a name longer than 100 bytes")
        add("x" * 60 + "/" + "y" * 90 + ".post", b"a name ustar splits into prefix and name")
        add("2024010210_IT_webconnectivity/ünïcødé.post", "é".encode())
        add("2024010210_IT_webconnectivity/fifo.post", None, tarfile.FIFOTYPE)
    return buffer.getvalue()


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def _by_tarfile(data: bytes) -> list[tuple[bytes, bool, int, bytes | None]]:
    found = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        for info in tar:
            content = tar.extractfile(info).read() if info.isfile() else None
            found.append(
                (info.name.encode("utf-8", "surrogateescape"), info.isfile(), info.size, content)
            )
    return found


def _by_tar_stream(data: bytes, chunk: int) -> list[tuple[bytes, bool, int, bytes | None]]:
    found = []
    stream = TarStream(_chunks(data, chunk))
    for member in stream:
        found.append(
            (member.name, member.isfile(), member.size, stream.data() if member.isfile() else None)
        )
    return found


@pytest.mark.parametrize(
    "fmt",
    [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT],
    ids=["gnu", "pax", "ustar"],
)
@pytest.mark.parametrize("chunk", [1, 511, 4096, 1 << 20])
def test_members_are_those_tarfile_reads(fmt: int, chunk: int) -> None:
    data = _archive(fmt)  # long names: GNU "L" members, pax "path" records, ustar prefixes
    expected = _by_tarfile(data)
    assert sum(1 for name, is_file, *_ in expected if is_file and name.endswith(b".post")) == 7
    assert _by_tar_stream(data, chunk) == expected


def test_global_pax_records_and_unread_members_are_handled_as_tarfile_does() -> None:
    data = _archive(tarfile.PAX_FORMAT, comment="a global pax header")
    expected = _by_tarfile(data)
    stream = TarStream(_chunks(data, 700))
    names = [member.name for member in stream]  # no data read: every member skipped
    assert names == [name for name, *_ in expected]


@pytest.mark.parametrize(
    "damage",
    ["cut in a member's data", "cut in a header", "bad checksum", "garbage size"],
)
def test_a_damaged_archive_raises_read_error(damage: str) -> None:
    data = _archive(tarfile.PAX_FORMAT)
    second = 512 * 3  # a directory header, then the first member's header and data
    damaged = {
        "cut in a member's data": data[: second + 512 + 100],
        "cut in a header": data[: second + 200],
        "bad checksum": data[:second] + b"X" + data[second + 1 :],
        "garbage size": data[:second]
        + data[second : second + 124]
        + b"9" * 12
        + data[second + 136 :],
    }[damage]
    with pytest.raises(tarfile.ReadError):
        stream = TarStream(_chunks(damaged, 1000))
        for member in stream:
            if member.isfile():
                stream.data()


def test_the_end_of_archive_block_ends_the_members() -> None:
    data = _archive(tarfile.GNU_FORMAT)
    trailing = data + b"whatever follows the end of the archive"
    assert _by_tar_stream(trailing, 4096) == _by_tarfile(data)
    assert _by_tar_stream(b"", 4096) == []


# -- hostile headers written by hand (review of 26e5956) ---------------------------------


def _header(name: bytes, size: int = 0, kind: bytes = b"0", size_field: bytes | None = None):
    block = bytearray(512)
    block[0 : len(name)] = name
    block[100:108] = b"0000644\0"
    block[124:136] = size_field if size_field is not None else b"%011o\0" % size
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def _member(name: bytes, data: bytes = b'{"x":1}') -> bytes:
    return _header(name, len(data)) + _padded(data)


def _pax(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(b"%d" % length) + len(body) != length:
        length += 1
    return b"%d" % length + body


def _names(data: bytes, reader) -> list[bytes]:
    return [name for name, *_ in reader(data)]


@pytest.mark.parametrize("kind", [b"L", b"K", b"x", b"g"])
@pytest.mark.parametrize("size_field", [b"-1000\0      ", b"-2000\0      "])
def test_a_negative_size_is_a_damaged_header_not_a_loop(kind, size_field) -> None:
    """An extended header of size -512 moved the position back onto itself: the
    reader looped forever (the engine waiting on the FIFO, the run never ending)."""
    import threading

    data = (
        _member(b"a/good.post")
        + _header(b"././@LongLink", kind=kind, size_field=size_field)
        + _member(b"a/next.post")
        + bytes(1024)
    )
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            _by_tar_stream(data, 4096)
            outcome.append(None)
        except BaseException as exc:  # reported below
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=20)
    assert not reader.is_alive(), "TarStream loops on a negative size"
    assert isinstance(outcome[0], tarfile.ReadError)
    with pytest.raises(tarfile.ReadError):
        _by_tarfile(data)


def test_global_pax_records_and_repeated_long_names_name_members_as_tarfile_does() -> None:
    """A global pax ``path`` names every later member (tarfile's _proc_builtin), and of
    two long names before one member the first wins (tarfile's recursion)."""
    global_path = _pax(b"path", b"a/global.post")
    first, second = b"a/first.post\0", b"a/second.post\0"
    data = (
        _member(b"a/good.post")
        + _header(b"g", len(global_path), b"g")
        + _padded(global_path)
        + _member(b"a/plain.post")
        + _header(b"././@LongLink", len(first), b"L")
        + _padded(first)
        + _header(b"././@LongLink", len(second), b"L")
        + _padded(second)
        + _member(b"a/third.post")
        + bytes(1024)
    )
    expected = [b"a/good.post", b"a/global.post", b"a/first.post"]
    assert _names(data, _by_tarfile) == expected
    assert _names(data, lambda d: _by_tar_stream(d, 100)) == expected
