"""The wire side of the test ClickHouse HTTP endpoint (``clickhouse_http.py``): request
bodies (Content-Length or chunked, then Content-Encoding), chunked and compressed
responses, the HTTP status of each exception, and the lexical reading of a statement's
head that the server does before it reads any data (the statement's kind, an insert's
inline data, a trailing FORMAT).
"""

from __future__ import annotations

import gzip
import re
import zlib
from dataclasses import dataclass
from typing import Any

import lz4.frame
import zstandard

BLOCK = 1 << 20
# ClickHouse's exceptionCodeToHTTPStatus, by error name.
STATUS_BY_ERROR_NAME = {
    401: ["REQUIRED_PASSWORD"],
    403: ["UNKNOWN_USER", "WRONG_PASSWORD", "AUTHENTICATION_FAILED", "SET_NON_GRANTED_ROLE",
          "ACCESS_DENIED"],
    400: ["BAD_ARGUMENTS", "CANNOT_COMPILE_REGEXP", "CANNOT_PARSE_TEXT",
          "CANNOT_PARSE_ESCAPE_SEQUENCE", "CANNOT_PARSE_QUOTED_STRING", "CANNOT_PARSE_DATE",
          "CANNOT_PARSE_DATETIME", "CANNOT_PARSE_NUMBER", "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING",
          "CANNOT_PARSE_IPV4", "CANNOT_PARSE_IPV6", "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
          "CANNOT_PARSE_UUID", "DUPLICATE_COLUMN", "ILLEGAL_COLUMN", "UNKNOWN_ELEMENT_IN_AST",
          "UNKNOWN_TYPE_OF_AST_NODE", "THERE_IS_NO_COLUMN", "TOO_DEEP_AST", "TOO_BIG_AST",
          "UNEXPECTED_AST_STRUCTURE", "SYNTAX_ERROR", "INCORRECT_DATA", "TYPE_MISMATCH",
          "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE"],
    404: ["UNKNOWN_TABLE", "UNKNOWN_FUNCTION", "UNKNOWN_IDENTIFIER", "UNKNOWN_TYPE",
          "UNKNOWN_STORAGE", "UNKNOWN_DATABASE", "UNKNOWN_SETTING", "UNKNOWN_DIRECTION_OF_SORTING",
          "UNKNOWN_AGGREGATE_FUNCTION", "UNKNOWN_FORMAT", "UNKNOWN_DATABASE_ENGINE",
          "UNKNOWN_TYPE_OF_QUERY", "UNKNOWN_ROLE"],
    413: ["QUERY_IS_TOO_LARGE"],
    501: ["NOT_IMPLEMENTED"],
    503: ["SOCKET_TIMEOUT", "CANNOT_OPEN_FILE", "CANNOT_SCHEDULE_TASK"],
    411: ["HTTP_LENGTH_REQUIRED"],
    408: ["TIMEOUT_EXCEEDED"],
    415: ["UNSUPPORTED_MEDIA_TYPE"],
}  # fmt: skip
CONTENT_TYPES = {
    "TabSeparated": "text/tab-separated-values; charset=UTF-8",
    "TSV": "text/tab-separated-values; charset=UTF-8",
    "CSV": "text/csv; charset=UTF-8; header=absent",
    "JSON": "application/json; charset=UTF-8",
    "JSONEachRow": "application/x-ndjson; charset=UTF-8",
}

_TOKEN = re.compile(
    rb"""(?P<space>\s+)
    |(?P<comment>--[^\n]*|\#[^\n]*|/\*.*?\*/)
    |(?P<quoted>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*"|`(?:[^`\\]|\\.|``)*`)
    |(?P<word>[A-Za-z_][A-Za-z0-9_]*)
    |(?P<open>\()|(?P<close>\))
    |(?P<other>.)""",
    re.X | re.S,
)


@dataclass
class Statement:
    """What the head of a request says: the statement's first keyword; for an insert that
    carries data, the SQL before its format and where the data starts; the output format
    a trailing ``FORMAT`` names."""

    keyword: str
    insert_sql: bytes | None = None
    insert_format: str | None = None
    data_start: int = 0
    output_format: str | None = None
    output_format_at: int | None = None  # where the trailing ``FORMAT`` starts
    output_format_end: int | None = None  # where its format name ends


def parse_statement(head: bytes) -> Statement:
    """Find the statement kind, an insert's inline data, a trailing FORMAT: the lexical
    work the server's parser does before any data is read (quotes and comments respected)."""
    keyword, previous, output, output_at, output_end = "", "", None, None, None
    depth = format_at = 0
    for match in _TOKEN.finditer(head):
        kind = match.lastgroup
        if kind in ("space", "comment"):
            continue
        if kind == "open":
            keyword = keyword or "SELECT"  # (SELECT ...)
            depth += 1
        elif kind == "close":
            depth = max(0, depth - 1)
        if kind != "word" or depth > 0:
            previous = ""
            continue
        text = match.group().decode()
        word = text.upper()
        keyword = keyword or word
        if keyword == "INSERT":
            if word in ("SELECT", "WITH") or (word == "INFILE" and previous == "FROM"):
                return Statement(keyword)
            if word == "VALUES":
                return Statement(keyword, head[: match.start()], "Values", match.end())
            if previous == "FORMAT":
                return Statement(keyword, head[:format_at], text, _data_start(head, match.end()))
        elif previous == "FORMAT":
            output, output_at, output_end = text, format_at, match.end()
        if word == "FORMAT":
            format_at = match.start()
        previous = word
    return Statement(
        keyword, output_format=output, output_format_at=output_at, output_format_end=output_end
    )


def _data_start(head: bytes, at: int) -> int:
    """Inline data starts after the format name's first line break, or its blanks."""
    while head[at : at + 1] in (b" ", b"\t", b"\f"):
        at += 1
    at += head[at : at + 1] == b"\r"
    return at + (head[at : at + 1] == b"\n")


@dataclass
class RequestLog:
    """One request as the endpoint served it (no credentials)."""

    method: str
    params: dict[str, str]
    status: int = 0
    chunked: bool = False
    content_encoding: str | None = None
    chunks: int = 0
    body_bytes: int = 0
    held_bytes: int = 0  # most result bytes held at once before the first send
    broken: bool = False  # the stream was cut after an exception


# -- request bodies --------------------------------------------------------------


class Body:
    """The request body as sent: Content-Length or chunked, read in pieces."""

    def __init__(self, rfile: Any, length: int | None, chunked: bool):
        self.rfile, self.left, self.chunked = rfile, length or 0, chunked
        self.done = not chunked and not length

    def read(self, size: int = BLOCK) -> bytes:
        if self.done:
            return b""
        if self.chunked and self.left == 0:
            line = self.rfile.readline(1024).split(b";")[0].strip()
            self.left = int(line or b"0", 16)
            if self.left == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                self.done = True
                return b""
        data = self.rfile.read(min(size, self.left))
        if not data:
            raise ConnectionError("request body ended early")
        self.left -= len(data)
        if self.chunked and self.left == 0:
            self.rfile.readline(1024)
        elif not self.chunked and self.left == 0:
            self.done = True
        return data

    def drain(self) -> None:
        while self.read():
            pass


class Decoded:
    """A body unpacked as its Content-Encoding says, in pieces."""

    METHODS = ("", "identity", "gzip", "zstd", "lz4", "deflate")

    def __init__(self, body: Body, encoding: str):
        encoding = encoding.strip().lower()
        if encoding in ("", "identity"):
            self.reader: Any = body
        elif encoding == "gzip":
            self.reader = gzip.GzipFile(fileobj=body)
        elif encoding == "zstd":
            self.reader = zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True)
        elif encoding == "lz4":
            self.reader = lz4.frame.LZ4FrameFile(body)
        else:
            self.reader = _Inflate(body)

    def read(self, size: int = BLOCK) -> bytes:
        return self.reader.read(size)


class _Inflate:
    def __init__(self, body: Body):
        self.body, self.inflate = body, zlib.decompressobj()

    def read(self, size: int = BLOCK) -> bytes:
        while True:
            if self.inflate.unconsumed_tail:
                return self.inflate.decompress(self.inflate.unconsumed_tail, size)
            data = self.body.read()
            if not data:
                return self.inflate.flush()
            out = self.inflate.decompress(data, size)
            if out:
                return out


@dataclass
class Output:
    """How a response body is compressed: ``method`` (none if ``None``), gzip and
    deflate at the server's ``http_zlib_compression_level``; ``precompressed`` when the
    engine compressed the result itself."""

    method: str | None
    zlib_level: int = 3
    precompressed: bool = False


class Chunked:
    """A chunked response body, compressed as ``output`` says."""

    def __init__(self, wfile: Any, entry: RequestLog, output: Output):
        self.wfile, self.entry, self.output = wfile, entry, output
        self.compressor = None if output.precompressed else _compressor(output)

    def _frame(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.entry.chunks += 1
            self.entry.body_bytes += len(data)

    def write(self, data: bytes) -> None:
        self._frame(self.compressor.compress(data) if self.compressor else data)

    def write_apart(self, data: bytes) -> None:
        """``data`` after what the engine compressed, as a stream of its own (a gzip
        member, which a gzip reader joins to the engine's), as the server's exception
        block goes into the response's compressed stream."""
        if self.compressor is None and self.output.method:
            compressor = _compressor(self.output)
            self._frame(compressor.compress(data) + compressor.flush())
        else:
            self.write(data)

    def end(self, complete: bool = True) -> None:
        """Close the compressed stream; ``complete=False`` leaves the chunked stream
        unterminated, which the client sees as a broken response."""
        if self.compressor:
            self._frame(self.compressor.flush())
        if complete:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def _compressor(output: Output) -> Any:
    if output.method == "zstd":
        return zstandard.ZstdCompressor().compressobj()
    if output.method == "lz4":
        return _Lz4()
    if output.method in ("gzip", "deflate"):
        bits = 31 if output.method == "gzip" else 15
        return zlib.compressobj(output.zlib_level, zlib.DEFLATED, bits)
    return None


class _Lz4:
    def __init__(self) -> None:
        self.frame = lz4.frame.LZ4FrameCompressor()
        self.head = self.frame.begin()

    def compress(self, data: bytes) -> bytes:
        head, self.head = self.head, b""
        return head + self.frame.compress(data)

    def flush(self) -> bytes:
        head, self.head = self.head, b""
        return head + self.frame.flush()


def sql_literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def sql_identifier(text: str) -> str:
    return "`" + text.replace("\\", "\\\\").replace("`", "\\`") + "`"


def choose_compression(accept: str) -> str | None:
    for method in ("zstd", "lz4", "gzip", "deflate"):
        if method in accept:
            return method
    return None
