"""The retrieval stage's durable ANN store: a usearch HNSW index plus chunk texts and metadata,
persisted as snapshots and a write-ahead log.

Layout under ``data_dir``::

    CURRENT               the live snapshot's sequence number (replaced atomically)
    snap-<seq>/           index.usearch + state.json, complete before CURRENT names it
    wal-<seq>.jsonl       every write after snapshot <seq>, fsynced before it is acknowledged

Recovery loads the snapshot CURRENT names and replays its WAL; a torn last line (a crash
mid-append, so never acknowledged) is dropped.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from usearch.index import Index

Scalar = str | int | float | bool


@dataclass(frozen=True)
class Chunk:
    document_id: str
    text: str
    metadata: Mapping[str, Any]


@dataclass(frozen=True)
class Hit:
    document_id: str
    chunk: str
    score: float
    metadata: Mapping[str, Any]


def _matches(metadata: Mapping[str, Any], where: Mapping[str, Scalar | list[Scalar]]) -> bool:
    """Equality per key; a list means any of its values."""
    for key, want in where.items():
        have = metadata.get(key)
        if isinstance(want, list):
            if have not in want:
                return False
        elif have != want:
            return False
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Store:
    """Not thread-safe: callers serialise writes (the service holds a lock)."""

    data_dir: Path
    dims: int
    metric: str = "cos"
    snapshot_every: int = 2000
    index: Index = field(init=False)
    chunks: dict[int, Chunk] = field(init=False, default_factory=dict)
    documents: dict[str, list[int]] = field(init=False, default_factory=dict)
    next_key: int = field(init=False, default=0)
    seq: int = field(init=False, default=0)  # writes applied, snapshot + WAL
    snapshot_seq: int = field(init=False, default=0)
    _wal: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.index = self._new_index()
        self._recover()

    def _new_index(self) -> Index:
        return Index(ndim=self.dims, metric=self.metric, dtype="f32")

    # ------------------------------------------------------------------ reads

    def __len__(self) -> int:
        return len(self.chunks)

    def document(self, document_id: str) -> list[Chunk] | None:
        keys = self.documents.get(document_id)
        return None if keys is None else [self.chunks[k] for k in keys]

    def search(
        self,
        vector: NDArray[np.float32],
        k: int,
        where: Mapping[str, Scalar | list[Scalar]] | None = None,
    ) -> list[Hit]:
        """Top ``k`` chunks by similarity, filtered by metadata; filtering over-fetches and
        widens the search until ``k`` matches are found or the index is exhausted."""
        total = len(self.index)
        if total == 0:
            return []
        fetch = min(total, k if not where else max(4 * k, 64))
        while True:
            found = self.index.search(vector.astype(np.float32), fetch)
            hits = []
            for key, distance in zip(found.keys, found.distances, strict=True):
                chunk = self.chunks.get(int(key))
                if chunk is None or (where and not _matches(chunk.metadata, where)):
                    continue
                hits.append(
                    Hit(chunk.document_id, chunk.text, 1.0 - float(distance), chunk.metadata)
                )
                if len(hits) == k:
                    return hits
            if fetch >= total:
                return hits
            fetch = min(total, fetch * 4)

    # ----------------------------------------------------------------- writes

    def put(
        self,
        document_id: str,
        chunks: Sequence[tuple[str, Mapping[str, Any]]],
        vectors: NDArray[np.float32],
    ) -> int:
        """Replace a document's chunks (idempotent by id); durable when it returns."""
        entry = self.put_entry(document_id, chunks, vectors)
        self.log(entry)
        self.apply(entry)
        return len(chunks)

    def put_entry(
        self,
        document_id: str,
        chunks: Sequence[tuple[str, Mapping[str, Any]]],
        vectors: NDArray[np.float32],
    ) -> dict[str, Any]:
        """The WAL entry for :meth:`put`, validated; ``log`` then ``apply`` it."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(chunks), self.dims):
            raise ValueError(f"vectors must be ({len(chunks)}, {self.dims}), got {vectors.shape}")
        entry = {
            "op": "put",
            "id": document_id,
            "chunks": [{"text": t, "metadata": dict(m)} for t, m in chunks],
            "vectors": base64.b64encode(vectors.tobytes()).decode(),
        }
        return entry

    def delete(self, document_id: str) -> bool:
        """Remove a document; ``False`` when it was not there (nothing is logged then)."""
        if document_id not in self.documents:
            return False
        entry = {"op": "delete", "id": document_id}
        self.log(entry)
        self.apply(entry)
        return True

    def apply(self, entry: Mapping[str, Any]) -> None:
        """Make a logged entry visible to searches."""
        old = self.documents.pop(entry["id"], [])
        if old:
            self.index.remove(np.array(old, dtype=np.uint64))
            for key in old:
                del self.chunks[key]
        if entry["op"] == "put":
            raw = base64.b64decode(entry["vectors"])
            vectors = np.frombuffer(raw, dtype=np.float32).reshape(-1, self.dims)
            keys = list(range(self.next_key, self.next_key + len(entry["chunks"])))
            self.next_key += len(keys)
            if keys:
                self.index.add(np.array(keys, dtype=np.uint64), vectors)
            for key, c in zip(keys, entry["chunks"], strict=True):
                self.chunks[key] = Chunk(entry["id"], c["text"], c["metadata"])
            self.documents[entry["id"]] = keys
        self.seq += 1

    # ------------------------------------------------------------ durability

    def _wal_path(self, seq: int) -> Path:
        return self.data_dir / f"wal-{seq}.jsonl"

    def log(self, entry: Mapping[str, Any]) -> None:
        """Append ``entry`` to the WAL and fsync it: after this it survives a crash."""
        if self._wal is None:
            self._wal = open(self._wal_path(self.snapshot_seq), "ab")  # noqa: SIM115
        self._wal.write(json.dumps(entry, separators=(",", ":")).encode() + b"\n")
        self._wal.flush()
        os.fsync(self._wal.fileno())

    def maybe_snapshot(self) -> bool:
        """Snapshot when the WAL has grown past ``snapshot_every`` writes."""
        if self.seq - self.snapshot_seq < self.snapshot_every:
            return False
        self.snapshot()
        return True

    def snapshot(self) -> None:
        """Write a complete snapshot, switch CURRENT to it, then drop the older files."""
        seq = self.seq
        snap = self.data_dir / f"snap-{seq}"
        tmp = self.data_dir / f".snap-{seq}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        self.index.save(str(tmp / "index.usearch"))
        state = {
            "seq": seq,
            "next_key": self.next_key,
            "dims": self.dims,
            "chunks": {
                str(k): [c.document_id, c.text, dict(c.metadata)] for k, c in self.chunks.items()
            },
        }
        (tmp / "state.json").write_text(json.dumps(state, separators=(",", ":")))
        for name in ("index.usearch", "state.json"):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        shutil.rmtree(snap, ignore_errors=True)
        tmp.rename(snap)
        current_tmp = self.data_dir / "CURRENT.tmp"
        current_tmp.write_text(str(seq))
        with open(current_tmp, "rb") as f:
            os.fsync(f.fileno())
        current_tmp.rename(self.data_dir / "CURRENT")
        _fsync_dir(self.data_dir)
        if self._wal is not None:
            self._wal.close()
            self._wal = None
        self.snapshot_seq = seq
        for path in self.data_dir.iterdir():
            stale_snap = path.name.startswith("snap-") and path != snap
            stale_wal = path.name.startswith("wal-") and path != self._wal_path(seq)
            if stale_snap:
                shutil.rmtree(path, ignore_errors=True)
            elif stale_wal:
                path.unlink(missing_ok=True)

    def _recover(self) -> None:
        current = self.data_dir / "CURRENT"
        if current.exists():
            seq = int(current.read_text().strip())
            snap = self.data_dir / f"snap-{seq}"
            state = json.loads((snap / "state.json").read_text())
            if state["dims"] != self.dims:
                raise ValueError(f"index has {state['dims']} dimensions, configured {self.dims}")
            self.index = self._new_index()
            self.index.load(str(snap / "index.usearch"))
            for key, (doc, text, metadata) in state["chunks"].items():
                self.chunks[int(key)] = Chunk(doc, text, metadata)
                self.documents.setdefault(doc, []).append(int(key))
            self.next_key, self.seq = state["next_key"], seq
            self.snapshot_seq = seq
        wal = self._wal_path(self.snapshot_seq)
        if not wal.exists():
            return
        lines = wal.read_bytes().split(b"\n")
        good = 0
        for line in lines:
            if not line:
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn tail: the crash came before its fsync, so before any ack
            self.apply(entry)
            good += len(line) + 1
        with open(wal, "r+b") as f:  # cut the torn tail so later appends start clean
            f.truncate(good)

    def close(self) -> None:
        if self._wal is not None:
            self._wal.close()
            self._wal = None
