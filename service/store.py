"""SQLite store of runs, rank registrations, findings and halts.

The store survives service restarts: a run halted before a restart stays
halted. SQLite runs in WAL mode with synchronous=NORMAL, so a committed write
survives a crash of the service process (not necessarily a power loss).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from nanwatch.v1 import nanwatch_pb2 as pb

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    world_size INTEGER NOT NULL,
    created_unix_s REAL NOT NULL,
    last_step INTEGER NOT NULL DEFAULT -1,
    evaluated_codes TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS ranks (
    run_id TEXT NOT NULL,
    rank INTEGER NOT NULL,
    host TEXT NOT NULL,
    client_id TEXT NOT NULL,
    registered_unix_s REAL NOT NULL,
    facts BLOB NOT NULL,
    PRIMARY KEY (run_id, rank)
);
CREATE TABLE IF NOT EXISTS findings (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    rank INTEGER NOT NULL,
    step INTEGER NOT NULL,
    stage INTEGER NOT NULL,
    severity INTEGER NOT NULL,
    code TEXT NOT NULL,
    created_unix_s REAL NOT NULL,
    finding BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS findings_by_run ON findings (run_id, created_unix_s);
CREATE TABLE IF NOT EXISTS halts (
    run_id TEXT PRIMARY KEY,
    step INTEGER NOT NULL,
    reason TEXT NOT NULL,
    source TEXT NOT NULL,
    first_rank INTEGER NOT NULL,
    created_unix_s REAL NOT NULL,
    finding BLOB
);
"""


@dataclass(slots=True)
class RunRecord:
    """A run as stored: its facts, halt and counters."""

    run_id: str
    world_size: int
    created_unix_s: float
    last_step: int
    evaluated_codes: set[str] = field(default_factory=set)


@dataclass(slots=True)
class HaltRecord:
    """The halt of a run; a run is halted at most once."""

    run_id: str
    step: int
    reason: str
    source: str
    first_rank: int
    created_unix_s: float
    finding: pb.Finding | None


@dataclass(slots=True)
class RankRecord:
    run_id: str
    rank: int
    host: str
    client_id: str
    registered_unix_s: float
    facts: pb.RegisterRankRequest


class Store:
    """Thread-safe access to the SQLite database at ``path`` (":memory:" for tests).

    Example:
        store = Store("nanwatch.db")
        store.upsert_run("run-1", world_size=2)
        store.add_finding(finding)
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # NOTE: one connection behind a lock; the service's writes are rare
        # (registrations, findings, halts), step reports are not stored.
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        logger.info("store opened at %s", self.path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- runs ----

    def upsert_run(self, run_id: str, *, world_size: int) -> RunRecord:
        """Insert the run if it is new and return it as stored."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO runs (run_id, world_size, created_unix_s) VALUES (?, ?, ?)",
                (run_id, world_size, time.time()),
            )
        run = self.get_run(run_id)
        assert run is not None
        return run

    def get_run(self, run_id: str) -> RunRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT run_id, world_size, created_unix_s, last_step, evaluated_codes FROM runs WHERE run_id = ?",
                (run_id,),
            ).fetchone()
        return _run_from_row(row) if row else None

    def list_runs(self, limit: int) -> list[RunRecord]:
        """Return up to ``limit`` runs, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT run_id, world_size, created_unix_s, last_step, evaluated_codes FROM runs "
                "ORDER BY created_unix_s DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [_run_from_row(row) for row in rows]

    def update_run_progress(self, run_id: str, *, last_step: int, evaluated_codes: set[str]) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE runs SET last_step = MAX(last_step, ?), evaluated_codes = ? WHERE run_id = ?",
                (last_step, json.dumps(sorted(evaluated_codes)), run_id),
            )

    # ---- ranks ----

    def upsert_rank(self, request: pb.RegisterRankRequest) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO ranks (run_id, rank, host, client_id, registered_unix_s, facts) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    request.run_id,
                    request.rank,
                    request.host,
                    request.client_id,
                    time.time(),
                    request.SerializeToString(),
                ),
            )

    def list_ranks(self, run_id: str) -> list[RankRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT run_id, rank, host, client_id, registered_unix_s, facts FROM ranks "
                "WHERE run_id = ? ORDER BY rank",
                (run_id,),
            ).fetchall()
        return [
            RankRecord(row[0], row[1], row[2], row[3], row[4], pb.RegisterRankRequest.FromString(row[5]))
            for row in rows
        ]

    # ---- findings ----

    def add_finding(self, finding: pb.Finding) -> None:
        evidence = finding.evidence
        with self._lock:
            self._db.execute(
                "INSERT INTO findings (id, run_id, rank, step, stage, severity, code, created_unix_s, finding) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    finding.id,
                    evidence.run_id,
                    evidence.rank,
                    evidence.step,
                    finding.stage,
                    finding.severity,
                    finding.code,
                    finding.created_unix_s,
                    finding.SerializeToString(),
                ),
            )

    def list_findings(self, run_id: str) -> list[pb.Finding]:
        """Return the run's findings in the order they were recorded."""
        with self._lock:
            rows = self._db.execute(
                "SELECT finding FROM findings WHERE run_id = ? ORDER BY created_unix_s, rowid",
                (run_id,),
            ).fetchall()
        return [pb.Finding.FromString(row[0]) for row in rows]

    def count_findings(self, run_id: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM findings WHERE run_id = ?", (run_id,)).fetchone()
        return int(row[0])

    # ---- halts ----

    def add_halt(self, halt: HaltRecord) -> bool:
        """Store the halt; return False when the run was already halted (the first halt stays)."""
        blob = halt.finding.SerializeToString() if halt.finding is not None else None
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO halts (run_id, step, reason, source, first_rank, created_unix_s, finding) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (halt.run_id, halt.step, halt.reason, halt.source, halt.first_rank, halt.created_unix_s, blob),
            )
        return cursor.rowcount == 1

    def update_halt_step(self, run_id: str, step: int) -> None:
        with self._lock:
            self._db.execute("UPDATE halts SET step = ? WHERE run_id = ?", (step, run_id))

    def get_halt(self, run_id: str) -> HaltRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT run_id, step, reason, source, first_rank, created_unix_s, finding FROM halts WHERE run_id = ?",
                (run_id,),
            ).fetchone()
        if row is None:
            return None
        finding = pb.Finding.FromString(row[6]) if row[6] is not None else None
        return HaltRecord(row[0], row[1], row[2], row[3], row[4], row[5], finding)


def _run_from_row(row: tuple) -> RunRecord:
    return RunRecord(
        run_id=row[0],
        world_size=row[1],
        created_unix_s=row[2],
        last_step=row[3],
        evaluated_codes=set(json.loads(row[4])),
    )
