"""Readers shared by every ingest: strict UTF-8 text files, tables in four formats, images.

Every decoding error names the file and the row: a file is first decoded as strict UTF-8
(a non-UTF-8 byte gives :class:`InputDataError` with the 0-based data row and the 1-based
line it is on), then parsed by pandas (CSV / TSV / JSON lines) or pyarrow (Parquet).
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pandas as pd
from PIL import Image

from pipeline.errors import ConfigError, CorruptImageError, InputDataError, MissingImageError

if TYPE_CHECKING:
    from pydantic import ValidationError

Format = Literal["auto", "csv", "tsv", "parquet", "jsonl"]
SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".txt": "tsv", ".parquet": "parquet",
            ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}

__all__ = ["sha256_file", "decode_utf8", "read_csv_raw", "read_table_file", "detect_format",
           "verify_image"]


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def decode_utf8(path: Path, header: bool = True) -> str:
    """Read a text file as strict UTF-8 (a leading BOM is dropped).

    Raises:
        InputDataError: the file is missing, or a byte is not UTF-8: names the file, the
            0-based data row (``header``: the first line is a header, not a row) and the
            1-based line (a quoted field spanning lines makes the row an estimate).
    """
    if not Path(path).is_file():
        raise InputDataError("source file does not exist", path=path)
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        row = line - 2 if header else line - 1
        raise InputDataError(f"not UTF-8 text at line {line} (byte {exc.start}: "
                             f"{data[exc.start:exc.start + 1]!r}): {exc.reason}", path=path,
                             row=max(row, 0) if line > 1 or not header else None) from exc


def read_csv_raw(path: Path, columns: list[str], sep: str = ",") -> pd.DataFrame:
    """Read a delimited text file with every field as an exact string (nothing parsed as NA).

    Quoted fields (titles and tags with commas or quotes) are unquoted by pandas' CSV
    parser. Returns the DataFrame with a RangeIndex equal to the 0-based data row.
    Raises InputDataError naming the file (and the row, for a non-UTF-8 byte) when it is
    missing or unreadable, or naming the column when a required column is missing.
    """
    text = decode_utf8(path)
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False,
                         sep=sep)
    except (ValueError, pd.errors.ParserError) as exc:
        raise InputDataError(f"cannot parse {'CSV' if sep == ',' else 'TSV'}: {exc}",
                             path=path) from exc
    for col in columns:
        if col not in df.columns:
            raise InputDataError(f"missing column {col!r} (found {list(df.columns)})", path=path)
    return df


def detect_format(path: Path, fmt: Format = "auto") -> str:
    """The file's format: ``fmt`` unless "auto", else from its suffix (.csv, .tsv, .parquet,
    .jsonl, ...). Raises InputDataError naming the file for an unknown suffix."""
    if fmt != "auto":
        return fmt
    found = SUFFIXES.get(Path(path).suffix.lower())
    if found is None:
        raise InputDataError(f"cannot tell the format from the suffix {Path(path).suffix!r}; "
                             f"give it (csv, tsv, parquet, jsonl)", path=path)
    return found


def read_table_file(path: Path, fmt: Format = "auto", header: bool = True,
                    names: list[str] | None = None) -> pd.DataFrame:
    """Read a CSV / TSV / Parquet / JSON-lines table; every column as strings.

    Missing values (an empty CSV field, a JSON null, a Parquet null) become "". Row i of
    the result is the file's 0-based data row i. ``header=False`` (CSV / TSV only): the
    file has no header line and ``names`` names its columns. TSV fields are not quoted
    (a ``"`` in a title is kept as is).

    Raises:
        InputDataError: missing file, undecodable bytes (file and row), unparsable content.
    """
    path = Path(path)
    kind = detect_format(path, fmt)
    if kind == "parquet":
        if not path.is_file():
            raise InputDataError("source file does not exist", path=path)
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types
            raise InputDataError(f"cannot read Parquet: {exc}", path=path) from exc
    elif kind == "jsonl":
        text = decode_utf8(path, header=False)
        try:
            df = pd.read_json(io.StringIO(text), lines=True, dtype=False)
        except ValueError as exc:
            bad = _bad_json_line(text)
            raise InputDataError(f"cannot parse JSON lines: {exc}", path=path, row=bad) from exc
    else:
        text = decode_utf8(path, header=header)
        kw = dict(sep="," if kind == "csv" else "\t", dtype=str, keep_default_na=False,
                  na_filter=False)
        if kind == "tsv":
            kw["quoting"] = csv.QUOTE_NONE
        if not header:
            kw.update(header=None, names=names)
        try:
            df = pd.read_csv(io.StringIO(text), **kw)
        except (ValueError, pd.errors.ParserError) as exc:
            raise InputDataError(f"cannot parse {kind.upper()}: {exc}", path=path) from exc
    out = pd.DataFrame({str(c): [("" if _isnull(v) else _text(v)) for v in df[c]]
                        for c in df.columns})
    return out.reset_index(drop=True)


def _isnull(v: object) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):  # lists / arrays
        return False


def _text(v: object) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _bad_json_line(text: str) -> int | None:
    import json
    for i, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                json.loads(line)
            except ValueError:
                return i
    return None


def verify_image(path: Path, item_id: int | str | None = None) -> str:
    """Check that ``path`` is a decodable image and return the hex sha256 of its bytes.

    Runs PIL's ``verify()`` and then a full ``load()`` on a fresh open (``verify`` alone
    misses truncated pixel data).

    Raises:
        MissingImageError: the file does not exist (names the file and ``item_id``).
        CorruptImageError: the file cannot be read or decoded (names file and item).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise MissingImageError("image file does not exist", path=path, item_id=item_id) from exc
    except OSError as exc:
        raise CorruptImageError(f"cannot read image: {exc}", path=path, item_id=item_id) from exc
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception as exc:  # PIL raises many types for bad data
        raise CorruptImageError(f"cannot decode image: {type(exc).__name__}: {exc}",
                                path=path, item_id=item_id) from exc
    return hashlib.sha256(data).hexdigest()


def setting_error(exc: "ValidationError", prefix: str, model: str) -> ConfigError:
    """One-line :class:`ConfigError` for the first error of a pydantic ``ValidationError``:
    ``"<prefix> <field>: <message> (got <value>)"``, the field being ``model`` for a
    model-level error (shared by the ingest configs)."""
    err = exc.errors()[0]
    name = ".".join(str(p) for p in err["loc"]) or model
    return ConfigError(f"{prefix} {name}: {err['msg']} (got {err.get('input')!r})")
