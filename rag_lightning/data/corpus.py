"""Passage corpus: converted once to a tokenized Arrow dataset, then memory-mapped.

Global passage id = row index (0..N-1). Sources: DPR ``psgs_w100.tsv`` (header ``id<TAB>text<TAB>title``),
jsonl (``id``, ``title``, ``text``), an Arrow/HF dataset saved to disk, SQuAD v1.1 json (paragraphs, ids
``{article_idx}-{para_idx}``), and KILT's knowledge source ``kilt_knowledgesource.json`` (format ``kilt``: one
page per line, cut into 100-word passages while streaming, :mod:`rag_lightning.data.kilt`). A source whose
first passage has a ``wikipedia_id`` (the ``kilt`` format; a tsv with that column, such as the one
``scripts/kilt_passages.py`` writes; jsonl / Arrow with that field) keeps it as a column (:meth:`Corpus.page_ids`,
the pages KILT's provenance scores). Conversion streams the source in chunks into an Arrow file, checks passage
ids are unique, tokenizes with ``Dataset.map(batched=True)`` and saves to ``cache_dir/<fingerprint>``
atomically (tmp dir, then rename). Columns: ``id``, ``title``, ``text``, ``line`` (source line/record),
``gen_ids`` (generator tokens of ``title + title_sep + text``, no special tokens) and ``doc_ids``
(doc-encoder tokens of the pair (title, text) with special tokens, or of the text alone when the title is
empty, as DPR does); both truncated to ``max_passage_tokens``.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from rag_lightning.data.kilt import iter_kilt_passages
from rag_lightning.data.readers import squad_paragraphs
from rag_lightning.data.textio import (
    DataError,
    encoding_error,
    json_loads,
    missing_field,
    read_head,
    read_lines,
)
from rag_lightning.integrity import CHUNK, new_hasher

log = logging.getLogger(__name__)
csv.field_size_limit(sys.maxsize)

CORPUS_FORMATS = ("auto", "tsv", "jsonl", "arrow", "squad", "kilt")
_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime_ns, file names) -> content digest, in this process
_VERSION = 2  # bump when the converted layout or the fingerprint's key changes (2: content, not path)
_SCHEMA = pa.schema(
    [("id", pa.string()), ("title", pa.string()), ("text", pa.string()), ("line", pa.int64())]
)
PAGE = "wikipedia_id"  # the optional page column (KILT)
_PAGE_SCHEMA = _SCHEMA.append(pa.field(PAGE, pa.string()))


def detect_corpus_format(path: str | os.PathLike) -> str:
    p = Path(path)
    if p.is_dir():
        return "arrow"
    ext = p.suffix.lower()
    fmt = {".tsv": "tsv", ".csv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "squad"}.get(ext)
    if fmt is None:
        raise DataError(p, 0, "<format>", f"cannot detect the corpus format of extension {ext!r}; pass fmt=")
    if fmt == "squad" and '"wikipedia_title"' in read_head(p) and '"wikipedia_id"' in read_head(p):
        return "kilt"  # kilt_knowledgesource.json: JSON lines despite the extension
    return fmt


def _tok_name(tok: Any) -> str:
    return "none" if tok is None else f"{type(tok).__name__}:{tok.name_or_path}:{len(tok)}"


def _source_files(path: Path) -> list[Path]:
    """The files a source consists of: itself, or a directory's files in a fixed order."""
    if path.is_file():
        return [path]
    return sorted(Path(root, f) for root, _, files in os.walk(path) for f in files)


def _source_stat(path: Path) -> tuple[int, int]:
    """(size, mtime_ns) of a file, or summed size / latest mtime over a directory's files."""
    size, mtime = 0, 0
    for f in _source_files(path):
        st = f.stat()
        size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
    return size, mtime


def content_digest(
    path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, remember: bool = False
) -> str:
    """xxh3-128 of the source's bytes (a directory: each file's relative path and bytes, in order), read once
    per process and, with ``cache_dir``, once at all: the digest is kept under the source's absolute path,
    size and mtime in ``cache_dir/.digests/`` (written with ``remember``, by a successful conversion), so a
    source is hashed again only when one of them changes (a copy, a move, a touch)."""
    p = Path(path).resolve()
    size, mtime = _source_stat(p)
    names = "".join(f"{f.relative_to(p)}\0" for f in _source_files(p)) if p.is_dir() else ""
    key = (str(p), size, mtime, hashlib.sha256(names.encode()).hexdigest()[:16])  # a renamed file: a miss
    memo = None if cache_dir is None else Path(cache_dir) / ".digests" / f"{hashlib.sha256(key[0].encode()).hexdigest()[:16]}.json"  # fmt: skip
    digest, stored = _DIGESTS.get(key), False
    if memo is not None:
        try:
            rec = json.loads(memo.read_text())
            if (rec["path"], rec["size"], rec["mtime_ns"], rec["names"]) == key:
                digest, stored = digest or rec["digest"], True
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if digest is None:
        h, t0 = new_hasher(), time.perf_counter()
        for f in _source_files(p):
            if p.is_dir():
                h.update(str(f.relative_to(p)).encode() + b"\0")
            with open(f, "rb") as fh:
                while block := fh.read(CHUNK):
                    h.update(block)
        digest = h.hexdigest()
        log.info("corpus %s: content hashed in %.1fs (%d bytes)", p, time.perf_counter() - t0, size)
    _DIGESTS[key] = digest
    if remember and memo is not None and not stored:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        rec = {"path": key[0], "size": size, "mtime_ns": mtime, "names": key[3], "digest": digest}
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, memo)  # atomic: concurrent ranks write the same record
    return digest


def corpus_fingerprint(
    path: str | os.PathLike,
    gen_tokenizer: Any,
    doc_tokenizer: Any,
    max_passage_tokens: int,
    *,
    digest_cache: str | os.PathLike | None = None,
    **extra: Any,
) -> str:
    """sha256 (16 hex) of the source's CONTENT digest (not its path or mtime: a copy elsewhere finds the same
    conversion and prepared indexes) + tokenizer names + max_passage_tokens + options. ``digest_cache``: where
    the content digest is remembered (see :func:`content_digest`)."""
    key = [
        _VERSION,
        content_digest(path, digest_cache),
        _tok_name(gen_tokenizer),
        _tok_name(doc_tokenizer),
        max_passage_tokens,
    ]
    key.append(sorted((k, repr(v)) for k, v in extra.items()))
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- streaming sources


def _clean(rec: Mapping[str, Any], src: str, line: int, fields: Mapping[str, str]) -> dict[str, Any]:
    """Validate one passage record -> {id, title, text, line}."""
    fid, ftitle, ftext = fields["id"], fields["title"], fields["text"]
    pid = rec.get(fid)
    if pid is None:
        raise missing_field(src, line, fid, "id", rec)
    if pid == "":
        raise DataError(src, line, fid, "missing field")
    if isinstance(pid, bool) or not isinstance(pid, (str, int)):
        raise DataError(src, line, fid, f"wrong type {type(pid).__name__}, expected str or int")
    text = rec.get(ftext)
    if text is None:
        raise missing_field(src, line, ftext, "text", rec)
    if not isinstance(text, str):
        raise DataError(src, line, ftext, f"wrong type {type(text).__name__}, expected str")
    if not text.strip():
        raise DataError(src, line, ftext, "empty text")
    title = rec.get(ftitle) or ""
    if not isinstance(title, str):
        raise DataError(src, line, ftitle, f"wrong type {type(title).__name__}, expected str")
    out = {"id": str(pid), "title": title, "text": text, "line": line}
    page = rec.get(fields.get(PAGE, PAGE))
    if page is not None and str(page) != "":
        out[PAGE] = str(page)
    return out


def _iter_tsv(path: Path, fields: Mapping[str, str]) -> Iterator[dict[str, Any]]:
    src = str(path)
    reader = csv.reader((line for _, line in read_lines(path)), delimiter="\t")  # BOM dropped
    header = next(reader, None) or []
    for k in ("id", "text"):
        if fields[k] not in header:
            raise missing_field(src, 1, fields[k], k, header, "missing column in header")
    fields = {PAGE: PAGE, **fields}  # kept when the header has it
    col = {k: header.index(v) for k, v in fields.items() if v in header}
    for row in reader:
        ln = reader.line_num
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(src, ln, fields["text"], f"expected {len(header)} columns, got {len(row)}")
        for name, cell in zip(header, row):
            err = encoding_error(src, ln, name, cell)
            if err is not None:
                raise err
        yield _clean({fields[k]: row[i] for k, i in col.items()}, src, ln, fields)


def _iter_jsonl(path: Path, fields: Mapping[str, str]) -> Iterator[dict[str, Any]]:
    src = str(path)
    for ln, s in read_lines(path):  # BOM dropped
        if not s.strip():
            continue
        err = encoding_error(src, ln, "<encoding>", s, start=0)
        if err is not None:
            raise err
        rec = json_loads(s, src, ln)  # broken, or nested too deeply: a DataError naming the line
        if not isinstance(rec, Mapping):
            raise DataError(src, ln, "<json>", f"wrong type {type(rec).__name__}, expected an object")
        yield _clean(rec, src, ln, fields)


def _iter_arrow(path: Path, fields: Mapping[str, str]) -> Iterator[dict[str, Any]]:
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise DataError(path, 0, "<split>", f"expected a single-split dataset, got splits {list(ds)}")
        ds = next(iter(ds.values()))
    n = 0
    for batch in ds.iter(batch_size=1000):
        keys = list(batch)
        for i in range(len(batch[keys[0]])):
            n += 1
            yield _clean({k: batch[k][i] for k in keys}, str(path), n, fields)


def _iter_squad(path: Path, fields: Mapping[str, str]) -> Iterator[dict[str, Any]]:
    for n, p in enumerate(squad_paragraphs(path), 1):
        yield {**p, "line": n}


def _iter_kilt(path: Path, fields: Mapping[str, str]) -> Iterator[dict[str, Any]]:
    return iter_kilt_passages(path)


_SOURCES = {
    "tsv": _iter_tsv,
    "jsonl": _iter_jsonl,
    "arrow": _iter_arrow,
    "squad": _iter_squad,
    "kilt": _iter_kilt,
}


def _write_raw(rows: Iterator[dict[str, Any]], out: Path, chunk: int = 10_000) -> int:
    """Stream rows into an Arrow IPC stream file in chunks; returns the row count. The page column is there
    when the first row has a page."""
    n = 0
    first = next(rows, None)
    schema = _PAGE_SCHEMA if first is not None and PAGE in first else _SCHEMA
    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        buf: list[dict[str, Any]] = [] if first is None else [first]
        for r in rows:
            buf.append(r)
            if len(buf) >= chunk:
                writer.write_table(pa.Table.from_pylist(buf, schema=schema))
                n, buf = n + len(buf), []
        if buf:
            writer.write_table(pa.Table.from_pylist(buf, schema=schema))
            n += len(buf)
    return n


def _check_unique(table: pa.Table, src: str) -> None:
    """Raise DataError naming the first duplicated id and its lines (Arrow hash count, no Python set)."""
    counts = pc.value_counts(table.column("id"))
    dup = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(dup):
        pid = dup.field("values")[0].as_py()
        lines = pc.filter(table.column("line"), pc.equal(table.column("id"), pid)).to_pylist()
        raise DataError(
            src, lines[1], "id", f"duplicate passage id {pid!r} (lines {', '.join(map(str, lines))})"
        )


def _tokenize_fn(gen_tok: Any, doc_tok: Any, max_len: int, sep: str, doc_prefix: str = "", doc_max: int = 0):
    def fn(batch: dict[str, list]) -> dict[str, list]:
        out = {}
        if gen_tok is not None:
            joined = [f"{t}{sep}{x}" if t else x for t, x in zip(batch["title"], batch["text"])]
            out["gen_ids"] = gen_tok(joined, add_special_tokens=False, truncation=True, max_length=max_len)[
                "input_ids"
            ]
        if doc_tok is not None:
            # DPR: the pair (title, text) when there is a title, the text alone otherwise
            titles, texts, ids = batch["title"], batch["text"], [None] * len(batch["text"])
            with_t = [i for i, t in enumerate(titles) if t]
            without = [i for i, t in enumerate(titles) if not t]
            kw = {"truncation": "longest_first", "max_length": doc_max or max_len}
            if doc_prefix:  # the document encoder's prefix (E5's "passage: "), before the first segment
                titles = [doc_prefix + t if t else t for t in titles]
                texts = [x if titles[i] else doc_prefix + x for i, x in enumerate(texts)]
            if with_t:
                enc = doc_tok([titles[i] for i in with_t], [texts[i] for i in with_t], **kw)["input_ids"]
                for i, e in zip(with_t, enc):
                    ids[i] = e
            if without:
                for i, e in zip(without, doc_tok([texts[i] for i in without], **kw)["input_ids"]):
                    ids[i] = e
            out["doc_ids"] = ids
        return out

    return fn


# ----------------------------------------------------------------------------- Corpus


class Corpus:
    """Memory-mapped, pre-tokenized passage table. Row index = global passage id."""

    def __init__(
        self, dataset: datasets.Dataset, fingerprint: str = "", path: str | os.PathLike | None = None
    ):
        self.dataset = dataset
        self.fingerprint = fingerprint
        self.path = None if path is None else Path(path)
        self._table: pa.Table = dataset.data.table
        self._id_map: dict[str, int] | None = None
        self._gen_chunks: tuple[Any, list[tuple[Any, Any]]] | None = None  # gen_token_rows' Arrow views

    # -- building / loading
    @staticmethod
    def prepare(
        path: str | os.PathLike,
        fmt: str = "auto",
        *,
        cache_dir: str | os.PathLike,
        gen_tokenizer: Any = None,
        doc_tokenizer: Any = None,
        max_passage_tokens: int = 256,
        fields: Mapping[str, str] | None = None,
        title_sep: str = " / ",
        num_proc: int | None = None,
        doc_prefix: str = "",
        doc_max_length: int | None = None,
    ) -> Path:
        """Convert the source once; return ``cache_dir/<fingerprint>`` (existing cache is reused).

        Resumable: the work directory ``cache_dir/.work-<fingerprint>`` survives a crash; the raw Arrow copy and
        each of the ``num_proc`` tokenized shards (``Dataset.map`` cache files) are reused when rerun.
        Concurrent calls for one fingerprint (several nodes on a shared disk) convert once: the others wait on a
        lock (``flock``, released when its holder dies) and then find the cache."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"corpus not found: {path}")
        fmt = detect_corpus_format(path) if fmt in ("auto", None) else fmt
        if fmt not in _SOURCES:
            raise DataError(
                path,
                0,
                "format",
                f"unknown corpus format {fmt!r}; valid formats: {', '.join(CORPUS_FORMATS)}",
            )
        fields = {"id": "id", "title": "title", "text": "text", **(fields or {})}
        doc_side = {k: v for k, v in (("doc_prefix", doc_prefix), ("doc_max_length", doc_max_length)) if v}
        fp = Corpus.fingerprint_of(
            path, fmt, cache_dir=cache_dir, gen_tokenizer=gen_tokenizer, doc_tokenizer=doc_tokenizer,
            max_passage_tokens=max_passage_tokens, fields=fields, title_sep=title_sep, **doc_side,
        )  # fmt: skip
        target = Path(cache_dir) / fp
        if (target / "corpus_meta.json").exists():
            content_digest(path, cache_dir, remember=True)  # (a copy: hashed now, not again)
            return target
        work = Path(cache_dir) / f".work-{fp}"
        work.mkdir(parents=True, exist_ok=True)
        with open(work / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process converting the same source: wait for it
            if (target / "corpus_meta.json").exists():
                return target
            log.info("converting corpus %s (%s) -> %s (%s processes)", path, fmt, target, num_proc or 1)
            raw_path = work / "raw.arrow"
            try:
                if not raw_path.exists():
                    _write_raw(_SOURCES[fmt](path, fields), work / "raw.arrow.partial")
                    os.replace(work / "raw.arrow.partial", raw_path)
                raw = datasets.Dataset.from_file(str(raw_path))
                if len(raw) == 0:  # no 0-passage cache: nothing could be retrieved from it
                    raise DataError(
                        path,
                        1,
                        "<passages>",
                        f"no passages read as {fmt!r} (an empty file, or a header only)",
                    )
                _check_unique(raw.data.table, str(path))
            except DataError:  # bad input: nothing worth resuming
                shutil.rmtree(work, ignore_errors=True)
                raise
            n = len(raw)
            feats = raw.features.copy()
            for col, tok in (("gen_ids", gen_tokenizer), ("doc_ids", doc_tokenizer)):
                if tok is not None:
                    feats[col] = datasets.List(datasets.Value("int32"))
            ds = raw.map(
                _tokenize_fn(
                    gen_tokenizer,
                    doc_tokenizer,
                    max_passage_tokens,
                    title_sep,
                    doc_prefix,
                    doc_max_length or 0,
                ),
                batched=True,
                features=feats,
                num_proc=num_proc,
                cache_file_name=str(work / "tok.arrow"),  # per-shard files, reused when rerun
                load_from_cache_file=True,
                desc="tokenizing passages",
            )
            shutil.rmtree(work / "out", ignore_errors=True)
            ds.save_to_disk(str(work / "out"))
            meta = {
                "fingerprint": fp,
                "source": str(path.resolve()),
                "format": fmt,
                "num_passages": n,
                "gen_tokenizer": _tok_name(gen_tokenizer),
                "doc_tokenizer": _tok_name(doc_tokenizer),
                "max_passage_tokens": max_passage_tokens,
                "title_sep": title_sep,
                **doc_side,
            }
            (work / "out" / "corpus_meta.json").write_text(json.dumps(meta, indent=1))
            del ds, raw
            os.rename(work / "out", target)
            content_digest(path, cache_dir, remember=True)
            log.info("corpus %s: %d passages cached at %s", path, n, target)
        shutil.rmtree(work, ignore_errors=True)
        return target

    @staticmethod
    def fingerprint_of(
        path: str | os.PathLike, fmt: str = "auto", *, cache_dir: str | os.PathLike, **kwargs: Any
    ) -> str:
        """The fingerprint :meth:`prepare` converts this source under (same arguments); content hashed once."""
        fields = {"id": "id", "title": "title", "text": "text", **(kwargs.get("fields") or {})}
        fmt = detect_corpus_format(path) if fmt in ("auto", None) else fmt
        return corpus_fingerprint(
            path, kwargs.get("gen_tokenizer"), kwargs.get("doc_tokenizer"), kwargs.get("max_passage_tokens", 256),
            digest_cache=cache_dir, fmt=fmt, fields=fields, sep=kwargs.get("title_sep", " / "),
            **{k: kwargs[k] for k in ("doc_prefix", "doc_max_length") if kwargs.get(k)},
        )  # fmt: skip

    @staticmethod
    def wait_for(
        path: str | os.PathLike,
        fmt: str = "auto",
        *,
        cache_dir: str | os.PathLike,
        fingerprint: str | None = None,
        **kwargs: Any,
    ) -> Path:
        """Block until another process (local rank 0) has converted this corpus; no timeout, a log line every
        5 minutes. Same arguments as :meth:`prepare`; ``fingerprint``: the one already computed."""
        fp = fingerprint or Corpus.fingerprint_of(path, fmt, cache_dir=cache_dir, **kwargs)
        target, t0 = Path(cache_dir) / fp, time.monotonic()
        while not (target / "corpus_meta.json").exists():
            if int(time.monotonic() - t0) % 300 < 5:
                log.info("waiting for local rank 0 to convert %s -> %s", path, target)
            time.sleep(5)
        return target

    @classmethod
    def load(cls, cache_path: str | os.PathLike) -> Corpus:
        """Memory-map a converted corpus directory."""
        meta = json.loads((Path(cache_path) / "corpus_meta.json").read_text())
        ds = datasets.load_from_disk(str(cache_path))
        return cls(ds, meta["fingerprint"], cache_path)

    @classmethod
    def from_file(cls, path: str | os.PathLike, fmt: str = "auto", **kwargs: Any) -> Corpus:
        """``prepare`` (convert once, cached by fingerprint) then ``load``; kwargs as in :meth:`prepare`."""
        return cls.load(cls.prepare(path, fmt, **kwargs))

    # -- access
    def __len__(self) -> int:
        return self._table.num_rows

    def _col(self, name: str, ids: Sequence[int], missing: Any = "") -> list:
        """Column values for row ids; id -1 (no passage: fewer hits than k) gives ``missing``."""
        if name not in self._table.column_names:
            raise KeyError(f"corpus has no column {name!r} (was its tokenizer given at conversion?)")
        idx = pa.array(ids, type=pa.int64())
        neg = pc.less(idx, 0)
        if not pc.any(neg).as_py():
            return self._table.column(name).take(idx).to_pylist()
        vals = self._table.column(name).take(pc.if_else(neg, pa.scalar(None, pa.int64()), idx)).to_pylist()
        return [missing if v is None else v for v in vals]

    def titles(self, ids: Sequence[int]) -> list[str]:
        return self._col("title", ids)

    def texts(self, ids: Sequence[int]) -> list[str]:
        return self._col("text", ids)

    def ext_ids(self, ids: Sequence[int]) -> list[str]:
        """The source's own string ids (for reporting)."""
        return self._col("id", ids)

    @property
    def has_pages(self) -> bool:
        """Whether the passages carry the ``wikipedia_id`` of their page (KILT)."""
        return PAGE in self._table.column_names

    def page_ids(self, ids: Sequence[int]) -> list[str]:
        """The ``wikipedia_id`` of each passage's page ("" for id -1 or a passage without one)."""
        if not self.has_pages:
            raise KeyError(
                f"corpus has no {PAGE!r} column: KILT provenance needs the passages' pages (use the KILT "
                f"knowledge source, or a tsv / jsonl with a {PAGE} column)"
            )
        return [p or "" for p in self._col(PAGE, ids)]

    def gen_tokens(self, ids: Sequence[int]) -> list[list[int]]:
        """Generator tokens of ``title + title_sep + text``, no special tokens, truncated."""
        return self._col("gen_ids", ids, missing=[])

    def gen_token_rows(self, ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Generator tokens of rows ``ids`` (N,) (tensor / array) as one right-padded (N, L) int64 tensor (pad 0)
        and lengths (N,): gathered from the Arrow offsets / values with numpy, no Python lists."""
        ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64).reshape(-1)
        if self._gen_chunks is None:
            if "gen_ids" not in self._table.column_names:
                raise KeyError("corpus has no column 'gen_ids' (was its tokenizer given at conversion?)")
            chunks = self._table.column("gen_ids").chunks
            starts = np.cumsum([0] + [len(c) for c in chunks])  # first row of each chunk
            arrays = [(c.offsets.to_numpy(), c.values.to_numpy()) for c in chunks]  # zero-copy views
            self._gen_chunks = (starts, arrays)
        starts, arrays = self._gen_chunks
        if len(ids) and (ids.min() < 0 or ids.max() >= starts[-1]):
            raise IndexError(f"passage ids out of range [0, {starts[-1]}): {ids.min()}..{ids.max()}")
        which = np.searchsorted(starts, ids, side="right") - 1  # chunk of each id
        begin, lengths = np.empty(len(ids), np.int64), np.empty(len(ids), np.int64)
        for c in np.unique(which):
            sel = which == c
            off = arrays[c][0]
            local = ids[sel] - starts[c]
            begin[sel], lengths[sel] = off[local], off[local + 1] - off[local]
        width = max(1, int(lengths.max(initial=0)))
        cols = np.arange(width)
        valid = cols < lengths[:, None]  # (N, L)
        out = np.zeros((len(ids), width), np.int64)
        for c in np.unique(which):
            sel = which == c
            idx = np.where(valid[sel], begin[sel, None] + cols, 0)
            out[sel] = np.where(valid[sel], arrays[c][1][idx], 0)
        return torch.from_numpy(out), torch.from_numpy(lengths)

    def doc_tokens(self, ids: Sequence[int]) -> list[list[int]]:
        """Doc-encoder tokens of the pair (title, text) with special tokens, truncated."""
        return self._col("doc_ids", ids, missing=[])

    def doc_token_view(self) -> DocTokenView:
        """``len()`` + ``view[list_of_ids] -> list[list[int]]`` for ``embed_passages``."""
        return DocTokenView(self)

    def id_to_row(self, ext_id: str | int) -> int:
        """Row index of a source id (mapping built lazily on first call). KeyError if absent."""
        if self._id_map is None:
            self._id_map = {s: i for i, s in enumerate(self._table.column("id").to_pylist())}
        return self._id_map[str(ext_id)]

    def __repr__(self) -> str:
        return f"Corpus(n={len(self)}, fingerprint={self.fingerprint!r}, path={str(self.path)!r})"


class DocTokenView:
    """Sequence-like view of a corpus's doc-encoder tokens."""

    def __init__(self, corpus: Corpus) -> None:
        self.corpus = corpus

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, ids: Sequence[int] | int) -> list[list[int]] | list[int]:
        if isinstance(ids, int):
            return self.corpus.doc_tokens([ids])[0]
        if isinstance(ids, slice):
            ids = range(*ids.indices(len(self)))
        return self.corpus.doc_tokens(list(ids))
