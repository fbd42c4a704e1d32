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
