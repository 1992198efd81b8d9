//! The durable buffer: one SQLite database, `edgefn.db` in `data_dir`.
//!
//! # Invariants (the delivery promise rests on these)
//!
//! 1. **Commit before ack.** Everything an invocation emitted, or the dead
//!    letter that records its failure, is written in the same transaction
//!    as its input's other outcomes ([`Writer::commit`]); the input is
//!    acknowledged only after that transaction commits. Many inputs share
//!    one transaction (group commit).
//! 2. **Delete after upstream ack.** An outbox row leaves only after the
//!    upstream broker's PUBACK for it; when the upstream refuses it or can
//!    never take it, moved to the dead letters in the same transaction; or
//!    when the `drop_oldest` policy makes room, which is counted in
//!    `counters` (`dropped_records`) and logged. The forwarder reports
//!    PUBACKed records ([`Outbox::acknowledged`]) and refused ones
//!    ([`Outbox::refused`]); the writer takes them out in its next
//!    transaction, so there is one writing connection and no lock to wait
//!    for. When no input arrives, the commit thread wakes for them
//!    ([`Writer::acknowledgements`]); a commit waiting for room in a full
//!    buffer wakes for either (any way a record leaves makes room).
//! 3. **On disk when acknowledged.** With `durability = "full"` (default)
//!    the database runs in WAL mode with `synchronous = FULL`: each commit
//!    fsyncs the WAL, so a power cut loses nothing acknowledged. `"relaxed"`
//!    (`synchronous = NORMAL`) survives a crash of the process, not a power
//!    cut. A delete lost to a power cut only re-sends a record (a counted
//!    duplicate), never loses one.
//! 4. **Order.** `outbox.seq` is strictly increasing and never reused, even
//!    after deletes and restarts (with gaps after a restart). Records are
//!    forwarded in `seq` order, and `seq` order is commit order, which is
//!    ingest order. The writer hands out seqs itself and reserves them in
//!    blocks of [`SEQ_BLOCK`] in `counters` (`seq_reserved`, written in the
//!    same transaction as the first record of a block); at open it goes on
//!    after both the highest seq in the outbox and the reservation. SQLite's
//!    `AUTOINCREMENT` would do the same by rewriting `sqlite_sequence` in
//!    every transaction: one more 4 KiB WAL page per commit, measured
//!    2.33 instead of 1.33 pages for a one-record commit.
//! 5. **Ids are never reused.** A record's id is `<gateway id>:<incarnation>:<seq>`.
//!    The incarnation is a random 64-bit number drawn when the database is
//!    created (`counters`, `incarnation`), in a synced transaction: a
//!    database lost whole (a power cut with `durability = "relaxed"` can
//!    lose a new one, or an operator deletes it) starts a new incarnation,
//!    so its seqs, which start again at 1, make new ids. Within one
//!    incarnation a seq is used only after its reservation is on disk: with
//!    `full` the reservation rides in the (synced) transaction of the first
//!    record of its block; with `relaxed` it gets a synced transaction of
//!    its own before the records that use it, because a commit that is not
//!    synced can vanish after its records were sent upstream.
//!
//! # Schema (version 6, in `PRAGMA user_version`)
//!
//! - `outbox(seq INTEGER PRIMARY KEY, topic TEXT, payload BLOB,
//!   created_ms INTEGER)`: records waiting for upstream. `topic` is what the
//!   function emitted, without the upstream prefix (the prefix may change
//!   between runs). A record's stable id is `<gateway id>:<incarnation>:<seq>`
//!   (invariant 5). (Version
//!   1 had `AUTOINCREMENT` here; migration 2 copies the rows and carries
//!   the sequence over as `seq_reserved`.)
//! - `dead_letters(id INTEGER PRIMARY KEY AUTOINCREMENT, function TEXT,
//!   topic TEXT, payload BLOB, kind TEXT, error TEXT, attempts INTEGER,
//!   created_ms INTEGER)`: inputs whose every attempt failed, and records
//!   the upstream refused (function `upstream`, kind `rejected`).
//! - `counters(name TEXT PRIMARY KEY, value INTEGER)`: totals that must
//!   survive restarts (`dropped_records`, `dead_letters_dropped`,
//!   `seq_reserved`, `incarnation`).
//! - `local_subscriptions(session TEXT, filter TEXT)` (version 3): the
//!   topic filters an external local broker may hold for edgefn's
//!   persistent session, so ingest can unsubscribe those no function uses
//!   any more ([`SessionFilters`]).
//! - `function_versions(name TEXT PRIMARY KEY, highest INTEGER)` (version
//!   4): per function name, the highest bundle version ever accepted or
//!   removed, so a replayed older bundle cannot downgrade the gateway
//!   ([`Deployments`]). Versions are at most `i64::MAX`
//!   ([`crate::bundle::MAX_VERSION`]), so they compare correctly in SQL.
//!   `floor` (version 6): the highest `min_version` of the bundles
//!   accepted for the name; nothing below it runs again, rollbacks
//!   included.
//! - `deployed_functions(name TEXT PRIMARY KEY, version INTEGER, bundle
//!   BLOB, previous_version INTEGER, previous_bundle BLOB)` (version 4):
//!   the bundle each deployed function runs, and the one before it.
//! - `function_state(function TEXT, key BLOB, value BLOB)` (version 5):
//!   each function's durable state (`state_set`), written in the
//!   transaction of the invocation's outcome; deleted with the function.
//! - `schedule_runs(function TEXT PRIMARY KEY, last_ms INTEGER)` (version
//!   5): when each scheduled function's last run was committed, for the
//!   one catch-up run at start-up ([`crate::schedule`]).
//! - `dead_letters.version`, `dead_letters.replay` (version 5): the
//!   version of the function that failed (0 for a function of the
//!   configuration file; none before version 5), and whether an operator
//!   asked for a replay ([`Inspector`]), which the daemon picks up.
//!
//! Later schema versions append to `MIGRATIONS`; a database newer than
//! this binary is refused rather than misread.
//!
//! # The recent tail (memory)
//!
//! After each commit the writer also keeps the new records in memory, so
//! the forwarder need not read back what was just written: [`Outbox`]
//! holds every committed record with `seq > from`, oldest first, up to
//! [`TAIL_RECORDS`] records and [`TAIL_BYTES`] bytes. When it overflows,
//! or the forwarder takes records out, `from` moves up; records at or
//! below `from` are read from SQLite ([`Reader::after`]). The tail is a
//! copy, never the truth: a record leaves it when it is published, and it
//! stays in the outbox until its PUBACK (invariant 2). Records dropped by
//! `drop_oldest` leave the tail too.
//!
//! # Size bound
//!
//! The bound (`[buffer] max_size`) is on the bytes of buffered topics and
//! payloads, tracked in memory ([`Writer::outbox_bytes`]) and recomputed at
//! open; SQLite's own overhead (pages, indexes, WAL) comes on top.
//!
//! Dead letters have a bound of their own (`[buffer]
//! dead_letters_max_size`, on [`DeadLetter::size`]: names, topic, payload
//! and error text), also tracked in memory and recomputed at open. The
//! transaction that takes them past it deletes the oldest, keeping at least
//! the newest, and counts them (`dead_letters_dropped`).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use crate::config::UPSTREAM;
use crate::config::{BufferConfig, Durability, FullPolicy};
use crate::runtime::state::Entries;
use crate::runtime::{FunctionState, StateWrite};

/// File name of the database inside `data_dir`.
pub const DB_FILE: &str = "edgefn.db";

/// Schema migrations; entry `i` moves `user_version` from `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE outbox (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        topic      TEXT    NOT NULL,
        payload    BLOB    NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE dead_letters (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        function   TEXT    NOT NULL,
        topic      TEXT    NOT NULL,
        payload    BLOB    NOT NULL,
        kind       TEXT    NOT NULL,
        error      TEXT    NOT NULL,
        attempts   INTEGER NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE counters (
        name  TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID;
",
    "
    CREATE TABLE outbox_v2 (
        seq        INTEGER PRIMARY KEY,
        topic      TEXT    NOT NULL,
        payload    BLOB    NOT NULL,
        created_ms INTEGER NOT NULL
    );
    INSERT INTO outbox_v2 SELECT seq, topic, payload, created_ms FROM outbox;
    INSERT INTO counters (name, value)
        SELECT 'seq_reserved', seq FROM sqlite_sequence WHERE name = 'outbox';
    DROP TABLE outbox;
    ALTER TABLE outbox_v2 RENAME TO outbox;
",
    "
    CREATE TABLE local_subscriptions (
        session TEXT NOT NULL,
        filter  TEXT NOT NULL,
        PRIMARY KEY (session, filter)
    ) WITHOUT ROWID;
",
    "
    CREATE TABLE function_versions (
        name    TEXT PRIMARY KEY,
        highest INTEGER NOT NULL
    );
    CREATE TABLE deployed_functions (
        name             TEXT PRIMARY KEY,
        version          INTEGER NOT NULL,
        bundle           BLOB NOT NULL,
        previous_version INTEGER,
        previous_bundle  BLOB
    );
",
    "
    CREATE TABLE function_state (
        function TEXT NOT NULL,
        key      BLOB NOT NULL,
        value    BLOB NOT NULL,
        PRIMARY KEY (function, key)
    ) WITHOUT ROWID;
    CREATE TABLE schedule_runs (
        function TEXT PRIMARY KEY,
        last_ms  INTEGER NOT NULL
    ) WITHOUT ROWID;
    ALTER TABLE dead_letters ADD COLUMN version INTEGER;
    ALTER TABLE dead_letters ADD COLUMN replay INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX dead_letters_replay ON dead_letters (id) WHERE replay = 1;
",
    "
    ALTER TABLE function_versions ADD COLUMN floor INTEGER;
",
];

/// Seqs reserved at a time (see invariant 4): one `counters` write per
/// this many records, and the most a restart skips.
pub const SEQ_BLOCK: i64 = 4096;

/// Bytes per database page, for new databases (and existing ones,
/// [`convert_page_size`]). A WAL frame is one page plus 24 bytes, and a
/// commit of one small record writes one frame, so this, not the record,
/// sizes what a one-record commit writes: 4 KiB pages make 4,120-byte
/// frames, which always span two 4 KiB pages of the file (8 KiB to the
/// card per fsync); 512-byte frames mostly fit in one (docs/DELIVERY.md
/// "SD cards").
pub const PAGE_SIZE: i64 = 512;

/// Largest database (bytes in use) rewritten at open to [`PAGE_SIZE`]
/// (1 MiB in the unit tests, which fill one past it).
const CONVERT_LIMIT: u64 = if cfg!(test) { 1 << 20 } else { 64 << 20 };

/// Most records the recent tail holds: a few upstream windows, so the
/// forwarder reads from memory while it keeps up.
pub const TAIL_RECORDS: usize = 4096;

/// Most bytes (topics + payloads) the recent tail holds.
pub const TAIL_BYTES: usize = 4 << 20;

/// Says yes at most once per period: for warnings that would otherwise be
/// logged on every commit.
#[derive(Debug)]
struct Every {
    /// The period.
    period: Duration,
    /// When it last said yes.
    last: Option<std::time::Instant>,
}

impl Every {
    fn new(period: Duration) -> Every {
        Every { period, last: None }
    }

    /// True if the period passed since the last true (or never was one).
    fn due(&mut self) -> bool {
        let now = std::time::Instant::now();
        let due = self
            .last
            .is_none_or(|t| now.duration_since(t) >= self.period);
        if due {
            self.last = Some(now);
        }
        due
    }
}

/// SQL for the bytes a dead letter counts against its bound (see
/// [`DeadLetter::size`]).
const DEAD_LETTER_SIZE: &str = "length(CAST(function AS BLOB)) + length(CAST(topic AS BLOB)) \
     + length(payload) + length(CAST(error AS BLOB))";

/// How long SQLite waits for the other connection's lock before failing.
/// Writers are short (one group commit), so this is only ever reached when
/// the disk itself stalls.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite reported an error (full disk, I/O error, corruption …).
    #[error("database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The database was written by a newer edgefn.
    #[error(
        "database {path} has schema version {found}, newer than this edgefn's {supported}; upgrade edgefn"
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Its version.
        found: i64,
        /// Ours.
        supported: i64,
    },
    /// The database is older than this edgefn's tools read; the daemon
    /// migrates it when it starts.
    #[error(
        "database {path} has schema version {found}, older than this edgefn's {supported}; \
         start the daemon of this edgefn once (it migrates the database), then try again"
    )]
    TooOld {
        /// The database file.
        path: PathBuf,
        /// Its version.
        found: i64,
        /// Ours.
        supported: i64,
    },
}

/// A record one invocation emitted, to be committed.
#[derive(Debug, Clone)]
pub struct NewRecord {
    /// Topic as emitted (no upstream prefix).
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
}

/// An input whose every attempt failed.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The function that failed.
    pub function: String,
    /// The input's topic.
    pub topic: String,
    /// The input's payload.
    pub payload: Vec<u8>,
    /// `Failure::kind`.
    pub kind: &'static str,
    /// The failure, as text.
    pub error: String,
    /// Attempts made.
    pub attempts: u32,
    /// The version of the function that failed (a deployed one's).
    pub version: Option<u64>,
}

/// What became of a replayed dead letter (`edgefn dead-letters replay`).
#[derive(Debug, Clone)]
pub enum Replayed {
    /// It ran: the dead letter goes.
    Done {
        /// Its id.
        id: i64,
    },
    /// It failed again: it stays, with the attempts counted up.
    Failed {
        /// Its id.
        id: i64,
        /// The new failure.
        letter: DeadLetter,
    },
    /// Its function is not on the gateway: it stays as it was.
    NoFunction {
        /// Its id.
        id: i64,
    },
}

/// What one group commit did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Committed {
    /// Records added to the outbox.
    pub records: u64,
    /// Dead letters added.
    pub dead_letters: u64,
    /// Old records deleted to make room (`drop_oldest`).
    pub dropped: u64,
    /// Acknowledged records deleted (some may have been dropped already).
    pub deleted: u64,
    /// Refused records moved to the dead letters.
    pub refused: u64,
    /// Old dead letters deleted to keep them within their bound.
    pub dead_letters_dropped: u64,
    /// The highest `seq` written, if any.
    pub last_seq: Option<i64>,
    /// Transactions committed: 1, or 0 when there was nothing to write.
    /// Each one fsyncs the WAL with `durability = "full"`.
    pub transactions: u64,
}

/// A buffered record, as the forwarder reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Position in the outbox; part of the record's id.
    pub seq: i64,
    /// Topic (no prefix).
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
}

impl DeadLetter {
    /// Bytes it counts against `dead_letters_max_size`: its text and payload
    /// (the same sum as [`DEAD_LETTER_SIZE`] in SQL).
    pub fn size(&self) -> u64 {
        (self.function.len() + self.topic.len() + self.payload.len() + self.error.len()) as u64
    }
}

impl Record {
    /// Bytes this record counts against the buffer bound.
    pub fn size(&self) -> u64 {
        (self.topic.len() + self.payload.len()) as u64
    }
}

/// Recently committed records; see the module doc.
#[derive(Debug, Default)]
struct Tail {
    /// Every committed record with `seq > from`, oldest first.
    records: VecDeque<Record>,
    /// Bytes of topics and payloads in `records`.
    bytes: usize,
    /// Records at or below this seq are only in SQLite.
    from: i64,
}

impl Tail {
    /// Removes the oldest record, moving `from` past it.
    fn pop(&mut self) -> Option<Record> {
        let r = self.records.pop_front()?;
        self.bytes -= r.size() as usize;
        self.from = self.from.max(r.seq);
        Some(r)
    }

    /// Forgets records at or below `seq`.
    fn forget_through(&mut self, seq: i64) {
        while self.records.front().is_some_and(|r| r.seq <= seq) {
            self.pop();
        }
        self.from = self.from.max(seq);
    }
}

/// Records on their way out of the outbox: acknowledged by the upstream
/// (deleted) or refused by it (moved to the dead letters). Either way the
/// writer does it in its next transaction.
#[derive(Debug, Default)]
struct Leaving {
    /// Seqs the upstream acknowledged, for the next transaction.
    delivered: Vec<i64>,
    /// Seqs the upstream refused, with the reason, for the next transaction.
    refused: Vec<(i64, String)>,
    /// Seqs of both kinds in a transaction that has not committed yet.
    in_transaction: Vec<i64>,
}

/// What one transaction takes out of [`Leaving`].
#[derive(Debug, Default)]
struct Taken {
    /// Acknowledged seqs, to delete.
    delivered: Vec<i64>,
    /// Refused seqs and why, to move to the dead letters.
    refused: Vec<(i64, String)>,
}

impl Taken {
    fn is_empty(&self) -> bool {
        self.delivered.is_empty() && self.refused.is_empty()
    }
}

impl Leaving {
    /// Whether nothing waits for a transaction.
    fn is_empty(&self) -> bool {
        self.delivered.is_empty() && self.refused.is_empty()
    }

    /// Takes what waits, for a transaction.
    fn start(&mut self) -> Taken {
        let taken = Taken {
            delivered: std::mem::take(&mut self.delivered),
            refused: std::mem::take(&mut self.refused),
        };
        self.in_transaction.extend_from_slice(&taken.delivered);
        self.in_transaction
            .extend(taken.refused.iter().map(|(seq, _)| *seq));
        taken
    }

    /// After the transaction: done, or (`failed`) back to waiting.
    fn finish(&mut self, taken: Taken, failed: bool) {
        self.in_transaction.clear();
        if failed {
            self.delivered.extend(taken.delivered);
            self.refused.extend(taken.refused);
        }
    }

    /// Every seq on its way out (never to be sent again).
    fn seqs(&self) -> impl Iterator<Item = i64> + '_ {
        self.delivered
            .iter()
            .copied()
            .chain(self.refused.iter().map(|(seq, _)| *seq))
            .chain(self.in_transaction.iter().copied())
    }
}

/// State shared by the writer, the reader and the forwarder's [`Outbox`].
#[derive(Debug, Default)]
struct Shared {
    /// Bytes of topics + payloads in the outbox.
    bytes: AtomicU64,
    /// Records in the outbox.
    records: AtomicU64,
    /// Highest committed seq (for waking the forwarder).
    last_seq: AtomicU64,
    /// Records the upstream acknowledged or refused, still in the outbox;
    /// the condvar wakes a writer waiting for room.
    leaving: (Mutex<Leaving>, Condvar),
    /// Wakes an idle commit thread when `leaving` gains entries.
    leaving_ready: tokio::sync::Notify,
    /// Recently committed records.
    tail: Mutex<Tail>,
    /// The local broker session's filters, to write in the next transaction.
    subscriptions: Mutex<Option<(String, Vec<String>)>>,
    /// This database's incarnation (invariant 5).
    incarnation: u64,
}

fn now_ms() -> i64 {
    crate::clock::now_ms() as i64
}

fn open_connection(path: &Path, synchronous: &str) -> Result<Connection, StoreError> {
    let err = |source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let conn = Connection::open(path).map_err(err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
    // Takes effect only in a database without pages yet (then before WAL
    // mode writes its first page); an existing one keeps its page size
    // until [`convert_page_size`].
    conn.pragma_update(None, "page_size", PAGE_SIZE)
        .map_err(err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(err)?;
    conn.pragma_update(None, "synchronous", synchronous)
        .map_err(err)?;
    Ok(conn)
}

/// Rewrites a database whose pages are not [`PAGE_SIZE`] bytes (one made
/// by an older edgefn, or by another program) with pages of that size, if
/// it is at most [`CONVERT_LIMIT`] bytes (as it is while the upstream
/// keeps up): `VACUUM` in rollback-journal mode, synced, so a crash
/// meanwhile leaves the old database or the new one. A larger one keeps
/// its pages (logged); it is converted at a later start, once forwarded.
/// Nothing is lost if the rewrite fails (a tool holding the database, a
/// full disk): logged, and the database stays as it was.
fn convert_page_size(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let err = |source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let want = PAGE_SIZE;
    let found: i64 = conn
        .pragma_query_value(None, "page_size", |r| r.get(0))
        .map_err(err)?;
    if found == want {
        return Ok(());
    }
    let (pages, free): (i64, i64) = (
        conn.pragma_query_value(None, "page_count", |r| r.get(0))
            .map_err(err)?,
        conn.pragma_query_value(None, "freelist_count", |r| r.get(0))
            .map_err(err)?,
    );
    let used = (pages - free).max(0) as u64 * found as u64;
    if used > CONVERT_LIMIT {
        tracing::info!(
            path = %path.display(),
            page_size = found,
            used_bytes = used,
            "the database keeps its page size: it is rewritten with {want}-byte pages \
             (fewer bytes written per commit) at a start when it holds at most {} MiB",
            CONVERT_LIMIT >> 20
        );
        return Ok(());
    }
    let started = std::time::Instant::now();
    let rewritten = conn
        .pragma_update(None, "journal_mode", "DELETE")
        .and_then(|()| conn.pragma_update(None, "page_size", want))
        .and_then(|()| conn.execute_batch("VACUUM"));
    // Back to WAL whatever happened: the store runs in no other mode.
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(err)?;
    match rewritten {
        Ok(()) => {
            let now: i64 = conn
                .pragma_query_value(None, "page_size", |r| r.get(0))
                .map_err(err)?;
            tracing::info!(
                path = %path.display(),
                from = found,
                to = now,
                took = ?started.elapsed(),
                "database rewritten with smaller pages"
            );
        }
        Err(e) => {
            // Left as it was; the next start tries again.
            tracing::warn!(
                path = %path.display(),
                page_size = found,
                error = %e,
                "could not rewrite the database with smaller pages; it keeps its page size"
            );
        }
    }
    Ok(())
}

/// Opens (creating and migrating if needed) the database in `data_dir`,
/// returning its single writer and a reader for the forwarder.
///
/// Fails if the directory or database cannot be created, or the schema is
/// newer than this binary knows.
pub fn open(data_dir: &Path, buffer: &BufferConfig) -> Result<(Writer, Reader), StoreError> {
    std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
        path: data_dir.to_owned(),
        source,
    })?;
    let path = data_dir.join(DB_FILE);
    let err = |source| StoreError::Sqlite {
        path: path.clone(),
        source,
    };
    let sync = match buffer.durability {
        Durability::Full => "FULL",
        Durability::Relaxed => "NORMAL",
    };
    // Creating and migrating the schema, and the incarnation, are synced
    // whatever the durability: ids rest on them (invariant 5).
    let mut conn = open_connection(&path, "FULL")?;
    migrate(&mut conn, &path)?;
    convert_page_size(&conn, &path)?;
    let incarnation = incarnation(&mut conn).map_err(err)?;
    conn.pragma_update(None, "synchronous", sync).map_err(err)?;
    let (bytes, last, records): (i64, Option<i64>, i64) = conn
        .query_row(
            "SELECT COALESCE(SUM(length(CAST(topic AS BLOB)) + length(payload)), 0), MAX(seq),
                    COUNT(*) FROM outbox",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .map_err(err)?;
    let reserved: i64 = conn
        .query_row(
            "SELECT COALESCE(MAX(value), 0) FROM counters WHERE name = 'seq_reserved'",
            [],
            |r| r.get(0),
        )
        .map_err(err)?;
    let dead_bytes: i64 = conn
        .query_row(
            &format!("SELECT COALESCE(SUM({DEAD_LETTER_SIZE}), 0) FROM dead_letters"),
            [],
            |r| r.get(0),
        )
        .map_err(err)?;
    let purges_seen: i64 = conn
        .query_row(
            "SELECT COALESCE(MAX(value), 0) FROM counters WHERE name = 'dead_letters_purges'",
            [],
            |r| r.get(0),
        )
        .map_err(err)?;
    // Seqs up to the reservation may have been handed out before a crash.
    let next_seq = last.unwrap_or(0).max(reserved) + 1;
    let shared = Arc::new(Shared {
        incarnation,
        ..Shared::default()
    });
    shared.bytes.store(bytes as u64, Ordering::Relaxed);
    shared.records.store(records as u64, Ordering::Relaxed);
    shared
        .last_seq
        .store(last.unwrap_or(0) as u64, Ordering::Relaxed);
    // What is buffered already is read from SQLite.
    shared.tail.lock().expect("tail lock").from = last.unwrap_or(0);
    let reader = Reader {
        conn: open_connection(&path, "NORMAL")?,
        path: path.clone(),
        shared: shared.clone(),
    };
    Ok((
        Writer {
            conn,
            path,
            shared,
            max_size: buffer.max_size,
            policy: buffer.full_policy,
            durability: buffer.durability,
            next_seq,
            reserved: next_seq - 1,
            dead_bytes: dead_bytes as u64,
            dead_letters_max_size: buffer.dead_letters_max_size,
            dead_letter_warning: Every::new(Duration::from_secs(60)),
            purges_seen,
            #[cfg(test)]
            disk_full: Arc::default(),
        },
        reader,
    ))
}

/// This database's incarnation, drawn and stored (synced: the connection
/// is in `synchronous = FULL` here) the first time.
fn incarnation(conn: &mut Connection) -> rusqlite::Result<u64> {
    let tx = conn.transaction()?;
    let stored: Option<i64> = tx
        .query_row(
            "SELECT value FROM counters WHERE name = 'incarnation'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let value = match stored {
        Some(v) => v,
        None => {
            // Never 0, so an id can always tell it was set; SQLite keeps
            // the 64 bits as a signed integer.
            let v = fastrand::u64(1..) as i64;
            tx.execute(
                "INSERT INTO counters (name, value) VALUES ('incarnation', ?1)",
                [v],
            )?;
            v
        }
    };
    tx.commit()?;
    Ok(value as u64)
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let err = |source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(err)?;
    let supported = MIGRATIONS.len() as i64;
    if version > supported {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found: version,
            supported,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction().map_err(err)?;
        tx.execute_batch(sql).map_err(err)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)
            .map_err(err)?;
        tx.commit().map_err(err)?;
    }
    Ok(())
}

/// The one writing connection, owned by the commit stage's thread.
pub struct Writer {
    /// The connection (`synchronous` per durability).
    conn: Connection,
    /// For error messages.
    path: PathBuf,
    /// Shared with the reader.
    shared: Arc<Shared>,
    /// `[buffer] max_size`.
    max_size: u64,
    /// `[buffer] full_policy`.
    policy: FullPolicy,
    /// `[buffer] durability`.
    durability: Durability,
    /// The seq the next record gets.
    next_seq: i64,
    /// The highest seq reserved in `counters` (`seq_reserved`).
    reserved: i64,
    /// Bytes of dead letters ([`DeadLetter::size`]), recomputed at open.
    dead_bytes: u64,
    /// `[buffer] dead_letters_max_size`.
    dead_letters_max_size: u64,
    /// Rate limit of the warning about dropped dead letters.
    dead_letter_warning: Every,
    /// `dead_letters_purges` when the dead letters' bytes were last
    /// counted.
    purges_seen: i64,
    /// See [`Writer::disk_full_switch`].
    #[cfg(test)]
    disk_full: Arc<std::sync::atomic::AtomicBool>,
}

/// One input's outcomes, as committed.
#[derive(Debug, Default, Clone)]
pub struct Outcomes {
    /// Records for upstream, in order.
    pub records: Vec<NewRecord>,
    /// Failures, one per failed function.
    pub dead_letters: Vec<DeadLetter>,
    /// State writes of successful invocations, per function, in order
    /// (already applied to the [`FunctionState`]s in memory).
    pub state: Vec<(Arc<FunctionState>, Vec<StateWrite>)>,
    /// Scheduled runs: the function and when it was due.
    pub schedule_runs: Vec<(Arc<str>, u64)>,
    /// Replayed dead letters.
    pub replays: Vec<Replayed>,
}

impl Outcomes {
    /// Bytes its records count against the buffer bound.
    pub fn bytes(&self) -> u64 {
        self.records
            .iter()
            .map(|r| (r.topic.len() + r.payload.len()) as u64)
            .sum()
    }
}

impl Writer {
    /// Commits the outcomes of many inputs in one transaction (invariant 1).
    ///
    /// With the `backpressure` policy and a full buffer this blocks until
    /// the forwarder makes room (or `give_up` returns true, then it returns
    /// `Ok(None)` having written nothing). Fails on any SQLite error, having
    /// written nothing; the caller retries and must not acknowledge.
    ///
    /// The same transaction deletes the records the upstream acknowledged
    /// since the last commit ([`Outbox::acknowledged`]) and moves those it
    /// refused to the dead letters ([`Outbox::refused`]); an empty `batch`
    /// commits only those (nothing at all if there are none).
    ///
    /// After a successful commit the records are moved out of `batch` into
    /// the recent tail (dead letters stay).
    pub fn commit(
        &mut self,
        batch: &mut [&mut Outcomes],
        give_up: &dyn Fn() -> bool,
    ) -> Result<Option<Committed>, StoreError> {
        #[cfg(test)]
        self.fill_disk(self.disk_full.load(Ordering::Relaxed));
        let incoming: u64 = batch.iter().map(|o| o.bytes()).sum();
        if !self.wait_for_room(incoming, give_up)? {
            return Ok(None);
        }
        let taken = self.shared.leaving.0.lock().expect("leaving lock").start();
        if batch.is_empty() && taken.is_empty() && !self.has_subscriptions_to_save() {
            return Ok(Some(Committed::default()));
        }
        self.write_taken(batch, incoming, taken).map(Some)
    }

    /// [`Writer::write`] with `taken` from [`Leaving::start`], handed back
    /// with [`Leaving::finish`]: if the transaction failed, they wait for
    /// the next one.
    fn write_taken(
        &mut self,
        batch: &mut [&mut Outcomes],
        incoming: u64,
        taken: Taken,
    ) -> Result<Committed, StoreError> {
        let subscriptions = self
            .shared
            .subscriptions
            .lock()
            .expect("subscriptions lock")
            .take();
        let result = self.write(batch, incoming, &taken, subscriptions.as_ref());
        if result.is_err() && subscriptions.is_some() {
            let mut pending = self
                .shared
                .subscriptions
                .lock()
                .expect("subscriptions lock");
            if pending.is_none() {
                *pending = subscriptions;
            }
        }
        self.shared
            .leaving
            .0
            .lock()
            .expect("leaving lock")
            .finish(taken, result.is_err());
        // Room may have been made: a writer waiting for it looks again.
        self.shared.leaving.1.notify_all();
        result
    }

    /// One transaction: deletes what the upstream acknowledged, moves what
    /// it refused to the dead letters, makes room (`drop_oldest`), writes
    /// `batch`, and keeps the dead letters within their bound.
    fn write(
        &mut self,
        batch: &mut [&mut Outcomes],
        incoming: u64,
        taken: &Taken,
        subscriptions: Option<&(String, Vec<String>)>,
    ) -> Result<Committed, StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let now = now_ms();
        let mut done = Committed::default();
        let mut dropped_through = None;
        let records: i64 = batch.iter().map(|o| o.records.len() as i64).sum();
        if self.durability == Durability::Relaxed && self.next_seq + records - 1 > self.reserved {
            // Not synced, this transaction may be lost with records already
            // sent upstream: the seqs it uses must be reserved durably first.
            self.reserve_synced(self.next_seq + records - 1 + SEQ_BLOCK)?;
        }
        let first = self.next_seq;
        let mut next = first;
        let mut reserved = self.reserved;
        let mut dead_bytes = self.dead_bytes;
        let tx = self.conn.transaction().map_err(err)?;
        let (mut gone, mut freed) = delete(&tx, &taken.delivered).map_err(err)?;
        done.deleted = taken.delivered.len() as u64;
        if let Some((session, filters)) = subscriptions {
            save_subscriptions(&tx, session, filters).map_err(err)?;
        }
        {
            let refused = refuse(&tx, &taken.refused, now).map_err(err)?;
            freed += refused.outbox_bytes;
            gone += refused.rows;
            dead_bytes += refused.dead_letter_bytes;
            done.refused = refused.rows;
            if self.policy == FullPolicy::DropOldest {
                let used = self.shared.bytes.load(Ordering::Relaxed);
                let over = (used.saturating_sub(freed) + incoming).saturating_sub(self.max_size);
                if over > 0 {
                    let dropped_bytes;
                    (done.dropped, dropped_bytes, dropped_through) =
                        drop_oldest(&tx, over).map_err(err)?;
                    freed += dropped_bytes;
                    gone += done.dropped;
                }
            }
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO outbox (seq, topic, payload, created_ms) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(err)?;
            for outcome in batch.iter() {
                for r in &outcome.records {
                    insert
                        .execute(params![next, r.topic, r.payload, now])
                        .map_err(err)?;
                    next += 1;
                }
            }
            if next - 1 > reserved {
                reserved = next - 1 + SEQ_BLOCK;
                tx.execute(
                    "INSERT INTO counters (name, value) VALUES ('seq_reserved', ?1)
                     ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                    [reserved],
                )
                .map_err(err)?;
            }
            done.records = (next - first) as u64;
            done.last_seq = (next > first).then_some(next - 1);
            let mut dead = tx
                .prepare_cached(
                    "INSERT INTO dead_letters (function, topic, payload, kind, error, attempts, created_ms, version)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(err)?;
            for outcome in batch.iter() {
                for d in &outcome.dead_letters {
                    dead.execute(params![
                        d.function,
                        d.topic,
                        d.payload,
                        d.kind,
                        d.error,
                        d.attempts,
                        now,
                        d.version.map(|v| v as i64)
                    ])
                    .map_err(err)?;
                    dead_bytes += d.size();
                    done.dead_letters += 1;
                }
            }
            dead_bytes = replay(&tx, batch, dead_bytes).map_err(err)?;
            if dead_bytes > self.dead_letters_max_size {
                // `edgefn dead-letters purge` may have deleted some: count
                // again, only then.
                let purges: i64 = tx
                    .query_row(
                        "SELECT COALESCE(MAX(value), 0) FROM counters WHERE name = 'dead_letters_purges'",
                        [],
                        |r| r.get(0),
                    )
                    .map_err(err)?;
                if purges != self.purges_seen {
                    dead_bytes = dead_letter_bytes(&tx).map_err(err)?;
                    self.purges_seen = purges;
                }
            }
            if dead_bytes > self.dead_letters_max_size {
                let (rows, bytes) =
                    drop_oldest_dead_letters(&tx, dead_bytes - self.dead_letters_max_size)
                        .map_err(err)?;
                dead_bytes -= bytes.min(dead_bytes);
                done.dead_letters_dropped = rows;
                if rows > 0 && self.dead_letter_warning.due() {
                    tracing::warn!(
                        dropped = rows,
                        bytes,
                        "dead letters full: dropped the oldest (buffer.dead_letters_max_size); \
                         more drops are counted (dead_letters_dropped) but not logged for a minute"
                    );
                }
            }
            write_state(&tx, batch).map_err(err)?;
            for (name, n) in [
                ("dropped_records", done.dropped),
                ("dead_letters_dropped", done.dead_letters_dropped),
            ] {
                if n > 0 {
                    tx.execute(
                        "INSERT INTO counters (name, value) VALUES (?1, ?2)
                         ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                        params![name, n as i64],
                    )
                    .map_err(err)?;
                }
            }
        }
        tx.commit().map_err(err)?;
        done.transactions = 1;
        self.next_seq = next;
        self.reserved = reserved;
        self.dead_bytes = dead_bytes;
        let b = &self.shared.bytes;
        b.fetch_add(incoming, Ordering::Relaxed);
        b.fetch_sub(freed.min(b.load(Ordering::Relaxed)), Ordering::Relaxed);
        let n = &self.shared.records;
        n.fetch_add(done.records, Ordering::Relaxed);
        n.fetch_sub(gone.min(n.load(Ordering::Relaxed)), Ordering::Relaxed);
        self.keep_recent(batch, first, dropped_through);
        if let Some(seq) = done.last_seq {
            self.shared.last_seq.store(seq as u64, Ordering::Release);
        }
        Ok(done)
    }

    /// Reserves seqs up to `upto` in a transaction of its own, synced even
    /// with `durability = "relaxed"` (invariant 5).
    fn reserve_synced(&mut self, upto: i64) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        self.conn
            .pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        let reserved = self.conn.execute(
            "INSERT INTO counters (name, value) VALUES ('seq_reserved', ?1)
             ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            [upto],
        );
        let restored = self.conn.pragma_update(None, "synchronous", "NORMAL");
        reserved.map_err(err)?;
        restored.map_err(err)?;
        self.reserved = upto;
        Ok(())
    }

    /// Resolves when the forwarder has reported acknowledged or refused
    /// records since the last call (immediately if it did while nobody
    /// waited). The commit thread waits on this and on new input; then
    /// [`Writer::commit`] with an empty batch deals with them.
    pub fn acknowledgements(&self) -> impl std::future::Future<Output = ()> + '_ {
        self.shared.leaving_ready.notified()
    }

    /// Whether acknowledged or refused records (or the local session's
    /// filters) wait for a transaction.
    pub fn has_acknowledged(&self) -> bool {
        !self
            .shared
            .leaving
            .0
            .lock()
            .expect("leaving lock")
            .is_empty()
            || self.has_subscriptions_to_save()
    }

    fn has_subscriptions_to_save(&self) -> bool {
        self.shared
            .subscriptions
            .lock()
            .expect("subscriptions lock")
            .is_some()
    }

    /// Moves the records just committed, with seqs from `first` on, into
    /// the recent tail.
    fn keep_recent(&self, batch: &mut [&mut Outcomes], first: i64, dropped: Option<i64>) {
        let mut tail = self.shared.tail.lock().expect("tail lock");
        if let Some(seq) = dropped {
            tail.forget_through(seq);
        }
        let records = batch.iter_mut().flat_map(|o| o.records.drain(..));
        for (r, seq) in records.zip(first..) {
            let r = Record {
                seq,
                topic: r.topic,
                payload: r.payload,
            };
            tail.bytes += r.size() as usize;
            tail.records.push_back(r);
        }
        while tail.records.len() > TAIL_RECORDS || tail.bytes > TAIL_BYTES {
            tail.pop();
        }
    }

    /// With the `backpressure` policy, waits until `incoming` bytes fit,
    /// taking records out of the outbox as the upstream acknowledges or
    /// refuses them meanwhile (any way a record leaves makes room). Returns
    /// at once with `drop_oldest`. Returns false if `give_up` said so;
    /// fails if a transaction that takes records out fails.
    pub fn wait_for_room(
        &mut self,
        incoming: u64,
        give_up: &dyn Fn() -> bool,
    ) -> Result<bool, StoreError> {
        if self.policy != FullPolicy::Backpressure {
            return Ok(true);
        }
        let max_size = self.max_size;
        let fits = move |shared: &Shared| {
            let used = shared.bytes.load(Ordering::Relaxed);
            // An empty buffer always takes the batch, however large, so one
            // oversized batch cannot wedge the gateway.
            used == 0 || used + incoming <= max_size
        };
        if fits(&self.shared) {
            return Ok(true);
        }
        tracing::warn!(
            used = self.shared.bytes.load(Ordering::Relaxed),
            max_size = self.max_size,
            "buffer full: devices are not acknowledged until the upstream drains it"
        );
        loop {
            let taken = {
                let (lock, cvar) = &self.shared.leaving;
                let mut leaving = lock.lock().expect("leaving lock");
                while leaving.is_empty() {
                    if give_up() {
                        return Ok(false);
                    }
                    leaving = cvar
                        .wait_timeout(leaving, Duration::from_millis(200))
                        .expect("leaving lock")
                        .0;
                }
                leaving.start()
            };
            self.write_taken(&mut [], 0, taken)?;
            if fits(&self.shared) {
                return Ok(true);
            }
        }
    }

    /// Bytes of topics and payloads in the outbox.
    pub fn outbox_bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::Relaxed)
    }

    /// A switch that, while on, caps the database at its current size
    /// before each commit, so growth fails as on a full disk (SQLITE_FULL).
    /// For tests of the layers above, which own the writer on their thread.
    #[cfg(test)]
    pub(crate) fn disk_full_switch(&mut self) -> Arc<std::sync::atomic::AtomicBool> {
        self.disk_full.clone()
    }

    /// Caps the database at its current size (`full`), or lifts the cap.
    #[cfg(test)]
    fn fill_disk(&self, full: bool) {
        let pages: i64 = if full {
            self.conn
                .pragma_query_value(None, "page_count", |r| r.get(0))
                .unwrap()
        } else {
            1 << 30
        };
        self.conn
            .pragma_update(None, "max_page_count", pages)
            .unwrap();
    }

    /// A durable counter's value (0 if never set).
    pub fn counter(&self, name: &str) -> Result<i64, StoreError> {
        self.conn
            .query_row("SELECT value FROM counters WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
            .map(Option::unwrap_or_default)
            .map_err(|source| StoreError::Sqlite {
                path: self.path.clone(),
                source,
            })
    }
}

/// Replaces the remembered filters with `filters` of `session`.
fn save_subscriptions(
    tx: &rusqlite::Transaction<'_>,
    session: &str,
    filters: &[String],
) -> rusqlite::Result<()> {
    tx.execute("DELETE FROM local_subscriptions", [])?;
    let mut insert = tx.prepare_cached(
        "INSERT OR IGNORE INTO local_subscriptions (session, filter) VALUES (?1, ?2)",
    )?;
    for f in filters {
        insert.execute([session, f])?;
    }
    Ok(())
}

/// The rows of `sql`, a name and a non-negative number each.
fn named_numbers<C: FromIterator<(String, u64)>>(
    conn: &Connection,
    sql: &str,
) -> rusqlite::Result<C> {
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
    })?;
    rows.collect()
}

/// Settles the batch's replayed dead letters; returns `dead_bytes` after.
fn replay(
    tx: &rusqlite::Transaction<'_>,
    batch: &[&mut Outcomes],
    mut dead_bytes: u64,
) -> rusqlite::Result<u64> {
    let mut done = tx.prepare_cached(&format!(
        "DELETE FROM dead_letters WHERE id = ?1 RETURNING {DEAD_LETTER_SIZE}"
    ))?;
    let mut failed = tx.prepare_cached(
        "UPDATE dead_letters SET attempts = attempts + ?2, kind = ?3, error = ?4, version = ?5,
             replay = 0 WHERE id = ?1",
    )?;
    let mut kept = tx.prepare_cached("UPDATE dead_letters SET replay = 0 WHERE id = ?1")?;
    for outcome in batch {
        for r in &outcome.replays {
            match r {
                Replayed::Done { id } => {
                    let mut rows = done.query([id])?;
                    while let Some(row) = rows.next()? {
                        dead_bytes = dead_bytes.saturating_sub(row.get::<_, i64>(0)? as u64);
                    }
                }
                Replayed::Failed { id, letter } => {
                    failed.execute(params![
                        id,
                        letter.attempts,
                        letter.kind,
                        letter.error,
                        letter.version.map(|v| v as i64)
                    ])?;
                }
                Replayed::NoFunction { id } => {
                    kept.execute([id])?;
                }
            }
        }
    }
    // A failure's new error text changes its size: count them again.
    if batch.iter().any(|o| {
        o.replays
            .iter()
            .any(|r| matches!(r, Replayed::Failed { .. }))
    }) {
        dead_bytes = dead_letter_bytes(tx)?;
    }
    Ok(dead_bytes)
}

/// The bytes the dead letters count against their bound, counted.
fn dead_letter_bytes(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<u64> {
    tx.query_row(
        &format!("SELECT COALESCE(SUM({DEAD_LETTER_SIZE}), 0) FROM dead_letters"),
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n as u64)
}

/// Writes the batch's state changes (of functions not removed meanwhile)
/// and scheduled runs.
fn write_state(tx: &rusqlite::Transaction<'_>, batch: &[&mut Outcomes]) -> rusqlite::Result<()> {
    let mut set = tx.prepare_cached(
        "INSERT INTO function_state (function, key, value) VALUES (?1, ?2, ?3)
         ON CONFLICT(function, key) DO UPDATE SET value = excluded.value",
    )?;
    let mut delete =
        tx.prepare_cached("DELETE FROM function_state WHERE function = ?1 AND key = ?2")?;
    let mut run = tx.prepare_cached(
        "INSERT INTO schedule_runs (function, last_ms) VALUES (?1, ?2)
         ON CONFLICT(function) DO UPDATE SET last_ms = excluded.last_ms",
    )?;
    for outcome in batch {
        for (state, writes) in &outcome.state {
            if state.is_removed() {
                continue;
            }
            for w in writes {
                match &w.value {
                    Some(v) => set.execute(params![state.name(), w.key, v])?,
                    None => delete.execute(params![state.name(), w.key])?,
                };
            }
        }
        for (function, due_ms) in &outcome.schedule_runs {
            run.execute(params![&**function, *due_ms as i64])?;
        }
    }
    Ok(())
}

/// Deletes acknowledged records by seq; returns the bytes freed.
fn delete(tx: &rusqlite::Transaction<'_>, acked: &[i64]) -> rusqlite::Result<(u64, u64)> {
    if acked.is_empty() {
        return Ok((0, 0));
    }
    let mut seqs = acked.to_vec();
    seqs.sort_unstable();
    seqs.dedup();
    // Acknowledgements come in seq order, so they form a few contiguous
    // runs: one range delete per run instead of one statement per row
    // (hundreds of single deletes made every tenth commit a millisecond
    // longer). The bytes freed are what was there: a row already dropped by
    // `drop_oldest` frees nothing twice.
    let mut stmt = tx.prepare_cached(
        "DELETE FROM outbox WHERE seq BETWEEN ?1 AND ?2
         RETURNING length(CAST(topic AS BLOB)) + length(payload)",
    )?;
    let (mut deleted, mut freed) = (0, 0);
    let mut start = 0;
    while start < seqs.len() {
        let mut end = start;
        while end + 1 < seqs.len() && seqs[end + 1] == seqs[end] + 1 {
            end += 1;
        }
        let mut rows = stmt.query([seqs[start], seqs[end]])?;
        while let Some(row) = rows.next()? {
            freed += row.get::<_, i64>(0)? as u64;
            deleted += 1;
        }
        start = end + 1;
    }
    Ok((deleted, freed))
}

/// What moving refused records to the dead letters did.
struct Refused {
    /// Records moved.
    rows: u64,
    /// Bytes they took in the outbox (topics and payloads).
    outbox_bytes: u64,
    /// Bytes they take as dead letters ([`DeadLetter::size`]).
    dead_letter_bytes: u64,
}

/// Moves records the upstream refused to the dead letters (function
/// `upstream`, kind `rejected`, the reason as error).
fn refuse(
    tx: &rusqlite::Transaction<'_>,
    refused: &[(i64, String)],
    now: i64,
) -> rusqlite::Result<Refused> {
    let mut done = Refused {
        rows: 0,
        outbox_bytes: 0,
        dead_letter_bytes: 0,
    };
    if refused.is_empty() {
        return Ok(done);
    }
    let mut copy = tx.prepare_cached(&format!(
        "INSERT INTO dead_letters (function, topic, payload, kind, error, attempts, created_ms)
         SELECT '{UPSTREAM}', topic, payload, 'rejected', ?2, 1, ?3 FROM outbox WHERE seq = ?1
         RETURNING {DEAD_LETTER_SIZE}"
    ))?;
    let mut remove = tx.prepare_cached(
        "DELETE FROM outbox WHERE seq = ?1 RETURNING length(CAST(topic AS BLOB)) + length(payload)",
    )?;
    for (seq, why) in refused {
        let mut rows = copy.query(params![seq, why, now])?;
        while let Some(row) = rows.next()? {
            done.dead_letter_bytes += row.get::<_, i64>(0)? as u64;
            done.rows += 1;
        }
        drop(rows);
        let mut rows = remove.query([seq])?;
        while let Some(row) = rows.next()? {
            done.outbox_bytes += row.get::<_, i64>(0)? as u64;
        }
    }
    Ok(done)
}

/// Deletes the oldest dead letters until at least `need` bytes are freed,
/// keeping the newest one whatever its size. Returns (rows, bytes).
fn drop_oldest_dead_letters(
    tx: &rusqlite::Transaction<'_>,
    need: u64,
) -> rusqlite::Result<(u64, u64)> {
    let newest: i64 = tx.query_row("SELECT COALESCE(MAX(id), 0) FROM dead_letters", [], |r| {
        r.get(0)
    })?;
    let select =
        format!("SELECT id, {DEAD_LETTER_SIZE} FROM dead_letters WHERE id < ?1 ORDER BY id");
    let (rows, freed, _) = delete_oldest(
        tx,
        &select,
        newest,
        "DELETE FROM dead_letters WHERE id <= ?1",
        need,
    )?;
    Ok((rows, freed))
}

/// Deletes the oldest records until at least `need` bytes are freed.
/// Returns (rows, bytes, the last seq) deleted.
fn drop_oldest(
    tx: &rusqlite::Transaction<'_>,
    need: u64,
) -> rusqlite::Result<(u64, u64, Option<i64>)> {
    let done = delete_oldest(
        tx,
        "SELECT seq, length(CAST(topic AS BLOB)) + length(payload) FROM outbox
         WHERE seq < ?1 ORDER BY seq",
        i64::MAX,
        "DELETE FROM outbox WHERE seq <= ?1",
        need,
    )?;
    if done.0 > 0 {
        tracing::warn!(
            records = done.0,
            bytes = done.1,
            "buffer full: dropped the oldest records (drop_oldest policy)"
        );
    }
    Ok(done)
}

/// Walks the rows `select` yields (key, bytes; oldest first, below `below`)
/// until they add up to `need` bytes, then deletes them all with `delete`
/// (which gets the last key). Returns (rows, bytes, the last key).
fn delete_oldest(
    tx: &rusqlite::Transaction<'_>,
    select: &str,
    below: i64,
    delete: &str,
    need: u64,
) -> rusqlite::Result<(u64, u64, Option<i64>)> {
    let mut rows = 0;
    let mut freed = 0;
    let mut last = None;
    {
        let mut stmt = tx.prepare_cached(select)?;
        let mut it = stmt.query([below])?;
        while freed < need {
            let Some(row) = it.next()? else { break };
            let (key, size): (i64, i64) = (row.get(0)?, row.get(1)?);
            freed += size as u64;
            rows += 1;
            last = Some(key);
        }
    }
    if let Some(last) = last {
        tx.execute(delete, [last])?;
    }
    Ok((rows, freed, last))
}

/// The forwarder's connection: reads records in order to catch up, moves refused
/// ones to the dead letters. Acknowledged records go through [`Outbox`].
pub struct Reader {
    /// A second connection (WAL lets it read while the writer writes).
    conn: Connection,
    /// For error messages.
    path: PathBuf,
    /// Shared with the writer.
    shared: Arc<Shared>,
}

impl Reader {
    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Up to `limit` records with `seq > after`, in order, except those
    /// acknowledged but not yet deleted (which are never sent again).
    pub fn after(&self, after: i64, limit: usize) -> Result<Vec<Record>, StoreError> {
        // Taken before the query: a delete that commits after this point is
        // filtered here, one that committed before is not in the snapshot.
        let gone: std::collections::HashSet<i64> = self
            .shared
            .leaving
            .0
            .lock()
            .expect("leaving lock")
            .seqs()
            .collect();
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq, topic, payload FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(self.err())?;
        let rows = stmt
            // Rows on their way out are skipped below: ask for that many
            // more, so a head of them cannot hide the records behind it.
            .query_map(params![after, (limit + gone.len()) as i64], |r| {
                Ok(Record {
                    seq: r.get(0)?,
                    topic: r.get(1)?,
                    payload: r.get(2)?,
                })
            })
            .map_err(self.err())?;
        let mut records = Vec::with_capacity(limit.min(256));
        for r in rows {
            let r = r.map_err(self.err())?;
            if !gone.contains(&r.seq) && records.len() < limit {
                records.push(r);
            }
        }
        Ok(records)
    }

    /// Records in the outbox (kept in memory).
    pub fn records(&self) -> u64 {
        self.shared.records.load(Ordering::Relaxed)
    }

    /// When the oldest record in the outbox was committed, ms since the
    /// epoch.
    pub fn oldest_created_ms(&self) -> Result<Option<u64>, StoreError> {
        self.conn
            .query_row(
                "SELECT created_ms FROM outbox ORDER BY seq LIMIT 1",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|v| v.map(|v| v as u64))
            .map_err(self.err())
    }

    /// Number of records waiting.
    pub fn pending(&self) -> Result<u64, StoreError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(self.err())
    }

    /// The forwarder's handle, usable without this reader's lock.
    pub fn outbox(&self) -> Outbox {
        Outbox(self.shared.clone())
    }

    /// Every function's committed state (`function_state`), by function.
    pub fn function_states(
        &self,
    ) -> Result<std::collections::HashMap<String, Entries>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT function, key, value FROM function_state")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?)))
            .map_err(self.err())?;
        let mut out: std::collections::HashMap<String, Vec<_>> = Default::default();
        for row in rows {
            let (function, key, value) = row.map_err(self.err())?;
            out.entry(function).or_default().push((key, value));
        }
        Ok(out)
    }

    /// When each scheduled function's last run was due (`schedule_runs`).
    pub fn schedule_runs(&self) -> Result<std::collections::HashMap<String, u64>, StoreError> {
        named_numbers(&self.conn, "SELECT function, last_ms FROM schedule_runs").map_err(self.err())
    }

    /// The filters remembered for the local broker session `session` (see
    /// [`SessionFilters`]); none for another session.
    pub fn local_subscriptions(&self, session: &str) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT filter FROM local_subscriptions WHERE session = ?1 ORDER BY filter")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([session], |r| r.get(0))
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// The handle with which ingest remembers its session's filters.
    pub fn session_filters(&self) -> SessionFilters {
        SessionFilters(self.shared.clone())
    }

    /// This database's incarnation: a random number drawn when it was
    /// created, part of every record's id (invariant 5).
    pub fn incarnation(&self) -> u64 {
        self.shared.incarnation
    }

    /// Highest committed seq so far (0 if none).
    pub fn last_seq(&self) -> i64 {
        self.shared.last_seq.load(Ordering::Acquire) as i64
    }

    /// Bytes of topics and payloads in the outbox.
    pub fn outbox_bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::Relaxed)
    }
}

/// The forwarder's side of the outbox that never waits for I/O: it takes
/// records from the recent tail and reports acknowledged ones.
#[derive(Debug, Clone)]
pub struct Outbox(Arc<Shared>);

impl Outbox {
    /// Reports the seqs of records the upstream acknowledged; the writer
    /// deletes them in its next transaction (invariant 2).
    pub fn acknowledged(&self, acked: &[i64]) {
        if acked.is_empty() {
            return;
        }
        self.leave(|l| l.delivered.extend_from_slice(acked));
    }

    /// Reports a record the upstream refused (or cannot ever take); the
    /// writer moves it to the dead letters (function `upstream`, kind
    /// `rejected`, `why` as the error) in its next transaction. Like an
    /// acknowledgement, this makes room in a full buffer.
    pub fn refused(&self, seq: i64, why: String) {
        self.leave(|l| l.refused.push((seq, why)));
    }

    /// Changes [`Leaving`] and wakes whoever waits for records to leave.
    fn leave(&self, change: impl FnOnce(&mut Leaving)) {
        let (lock, cvar) = &self.0.leaving;
        change(&mut lock.lock().expect("leaving lock"));
        cvar.notify_all();
        self.0.leaving_ready.notify_one();
    }

    /// Takes up to `limit` records with `seq > after` out of memory, in
    /// order, if memory holds all of them; `None` if some are only in
    /// SQLite (read them with [`Reader::after`]). Never blocks on I/O.
    pub fn take(&self, after: i64, limit: usize) -> Option<Vec<Record>> {
        let mut tail = self.0.tail.lock().expect("tail lock");
        if after < tail.from {
            return None;
        }
        tail.forget_through(after);
        let n = limit.min(tail.records.len());
        Some((0..n).filter_map(|_| tail.pop()).collect())
    }
}

/// Remembers which topic filters the local broker may hold for edgefn's
/// persistent session. MQTT has no way to list a session's subscriptions,
/// so this is how a filter that no function uses any more is found and
/// unsubscribed after a restart. The writer saves them in its next
/// transaction (table `local_subscriptions`).
#[derive(Debug, Clone)]
pub struct SessionFilters(Arc<Shared>);

impl SessionFilters {
    /// Replaces the filters remembered, for the session named `session`
    /// (broker and client id), with `filters`.
    pub fn save(&self, session: &str, filters: Vec<String>) {
        *self.0.subscriptions.lock().expect("subscriptions lock") =
            Some((session.to_owned(), filters));
        self.0.leaving_ready.notify_one();
    }
}

/// The deployed functions' bundles and version counters, on a connection
/// of its own (synced: a deploy is rare, and what it records decides what
/// runs after a power cut). Open it after [`open`], which creates the
/// tables.
pub struct Deployments {
    /// The connection (`synchronous = FULL`).
    conn: Connection,
    /// For error messages.
    path: PathBuf,
}

/// What is recorded of a function name's versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Versions {
    /// The highest version ever accepted or removed.
    pub highest: u64,
    /// The highest `min_version` of the bundles accepted, if any.
    pub floor: Option<u64>,
}

/// A deployed function's bundle as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBundle {
    /// The function's name.
    pub name: String,
    /// The bundle's version.
    pub version: u64,
    /// The floor recorded for the name, if any.
    pub floor: Option<u64>,
    /// The bundle, as received.
    pub bundle: Vec<u8>,
}

impl Deployments {
    /// Opens the database in `data_dir` for deployments.
    pub fn open(data_dir: &Path) -> Result<Deployments, StoreError> {
        let path = data_dir.join(DB_FILE);
        Ok(Deployments {
            conn: open_connection(&path, "FULL")?,
            path,
        })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// The highest version ever accepted or removed for `name`.
    pub fn highest(&self, name: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.versions(name)?.map(|v| v.highest))
    }

    /// The highest version and the floor recorded for `name`, if any
    /// bundle for it was ever accepted.
    pub fn versions(&self, name: &str) -> Result<Option<Versions>, StoreError> {
        self.conn
            .query_row(
                "SELECT highest, floor FROM function_versions WHERE name = ?1",
                [name],
                |r| {
                    Ok(Versions {
                        highest: r.get::<_, i64>(0)? as u64,
                        floor: r.get::<_, Option<i64>>(1)?.map(|f| f as u64),
                    })
                },
            )
            .optional()
            .map_err(self.err())
    }

    /// Records `bundle` as what `name` runs, the one before kept as its
    /// previous, `version` as the highest for the name, and raises its
    /// floor to `floor` (the bundle's `min_version`).
    pub fn deploy(
        &mut self,
        name: &str,
        version: u64,
        floor: Option<u64>,
        bundle: &[u8],
    ) -> Result<(), StoreError> {
        self.in_transaction(|tx| {
            raise_highest(tx, name, version)?;
            if let Some(floor) = floor {
                tx.execute(
                    "UPDATE function_versions SET floor = MAX(COALESCE(floor, 0), ?2) WHERE name = ?1",
                    rusqlite::params![name, floor as i64],
                )?;
            }
            tx.execute(
                "INSERT INTO deployed_functions (name, version, bundle) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET
                    previous_version = version, previous_bundle = bundle,
                    version = excluded.version, bundle = excluded.bundle",
                rusqlite::params![name, version as i64, bundle],
            )
        })
    }

    /// Deletes the state of the function called `name`.
    pub fn delete_state(&mut self, name: &str) -> Result<(), StoreError> {
        self.in_transaction(|tx| {
            tx.execute("DELETE FROM function_state WHERE function = ?1", [name])
        })
    }

    /// Records that `name` no longer runs, and `version` (a tombstone's) as
    /// the highest for the name.
    pub fn remove(&mut self, name: &str, version: u64) -> Result<(), StoreError> {
        self.in_transaction(|tx| {
            raise_highest(tx, name, version)?;
            tx.execute("DELETE FROM function_state WHERE function = ?1", [name])?;
            tx.execute("DELETE FROM schedule_runs WHERE function = ?1", [name])?;
            tx.execute("DELETE FROM deployed_functions WHERE name = ?1", [name])
        })
    }

    /// Makes the bundle `name` ran before its current one the current one
    /// again (no previous: `name` no longer runs). The highest version
    /// stays: the rolled-back version is never accepted again.
    pub fn roll_back(&mut self, name: &str) -> Result<(), StoreError> {
        self.in_transaction(|tx| {
            tx.execute(
                "DELETE FROM deployed_functions WHERE name = ?1 AND previous_bundle IS NULL",
                [name],
            )?;
            tx.execute(
                "UPDATE deployed_functions SET version = previous_version, bundle = previous_bundle,
                    previous_version = NULL, previous_bundle = NULL WHERE name = ?1",
                [name],
            )
        })
    }

    /// Runs `f` in a transaction and commits it (synced).
    fn in_transaction(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction) -> rusqlite::Result<usize>,
    ) -> Result<(), StoreError> {
        let done = self.conn.transaction().and_then(|tx| {
            f(&tx)?;
            tx.commit()
        });
        done.map_err(|source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }

    /// Every deployed function's current bundle, by name.
    pub fn all(&self) -> Result<Vec<StoredBundle>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT d.name, d.version, v.floor, d.bundle FROM deployed_functions d
                 LEFT JOIN function_versions v ON v.name = d.name ORDER BY d.name",
            )
            .map_err(self.err())?;
        stmt.query_map([], |r| {
            Ok(StoredBundle {
                name: r.get(0)?,
                version: r.get::<_, i64>(1)? as u64,
                floor: r.get::<_, Option<i64>>(2)?.map(|f| f as u64),
                bundle: r.get(3)?,
            })
        })
        .and_then(|rows| rows.collect())
        .map_err(self.err())
    }
}

/// Makes `version` the highest of `name` unless a higher one is recorded.
fn raise_highest(tx: &rusqlite::Transaction, name: &str, version: u64) -> rusqlite::Result<usize> {
    tx.execute(
        "INSERT INTO function_versions (name, highest) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET highest = MAX(highest, excluded.highest)",
        rusqlite::params![name, version as i64],
    )
}

/// Reads the dead letters, oldest first.
pub fn dead_letters(data_dir: &Path) -> Result<Vec<DeadLetter>, StoreError> {
    Ok(Inspector::open(data_dir)?
        .list(None)?
        .into_iter()
        .map(|d| d.letter)
        .collect())
}

/// A dead letter as stored.
#[derive(Debug, Clone)]
pub struct StoredDeadLetter {
    /// Its id.
    pub id: i64,
    /// What failed, and on what.
    pub letter: DeadLetter,
    /// When it was first stored, ms since the epoch.
    pub created_ms: u64,
    /// Whether a replay was asked for and not yet done.
    pub replay: bool,
}

/// Which dead letters `edgefn dead-letters replay` or `purge` takes.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// These ids (none: not narrowed by id).
    pub ids: Vec<i64>,
    /// Only this function's.
    pub function: Option<String>,
    /// Only those stored before this time, ms since the epoch.
    pub before_ms: Option<u64>,
}

/// The database as the tools see it (`edgefn dead-letters`, `edgefn
/// status --config`) and the daemon's replays: a connection of its own,
/// so it works beside a running daemon.
pub struct Inspector {
    conn: Connection,
    path: PathBuf,
}

/// A failure kind as stored, as the `&'static str` [`DeadLetter`] holds.
fn kind_of(kind: &str) -> &'static str {
    match kind {
        "error" => "error",
        "timeout" => "timeout",
        "fuel" => "fuel",
        "trap" => "trap",
        "exit" => "exit",
        "rejected" => "rejected",
        _ => "start",
    }
}

const STORED_COLUMNS: &str =
    "id, function, topic, payload, kind, error, attempts, version, created_ms, replay";

fn stored(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredDeadLetter> {
    let kind: String = r.get(4)?;
    Ok(StoredDeadLetter {
        id: r.get(0)?,
        letter: DeadLetter {
            function: r.get(1)?,
            topic: r.get(2)?,
            payload: r.get(3)?,
            kind: kind_of(&kind),
            error: r.get(5)?,
            attempts: r.get(6)?,
            version: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
        },
        created_ms: r.get::<_, i64>(8)? as u64,
        replay: r.get::<_, i64>(9)? != 0,
    })
}

impl Inspector {
    /// Opens the database in `data_dir`.
    ///
    /// Fails if there is none: the gateway has not run with this
    /// `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Inspector, StoreError> {
        let path = data_dir.join(DB_FILE);
        if !path.exists() {
            return Err(StoreError::DataDir {
                path: path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no database here: has the gateway run with this data_dir?",
                ),
            });
        }
        let conn = open_connection(&path, "FULL")?;
        // Never migrated here: a tool run beside an older daemon must not
        // change the schema under it.
        let found: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|source| StoreError::Sqlite {
                path: path.clone(),
                source,
            })?;
        let supported = MIGRATIONS.len() as i64;
        if found > supported {
            return Err(StoreError::TooNew {
                path,
                found,
                supported,
            });
        }
        if found < supported {
            return Err(StoreError::TooOld {
                path,
                found,
                supported,
            });
        }
        Ok(Inspector { conn, path })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Every dead letter (of `function`, if given), oldest first.
    pub fn list(&self, function: Option<&str>) -> Result<Vec<StoredDeadLetter>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {STORED_COLUMNS} FROM dead_letters
                 WHERE ?1 IS NULL OR function = ?1 ORDER BY id"
            ))
            .map_err(self.err())?;
        let rows = stmt.query_map([function], stored).map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// The dead letter `id`, if there is one.
    pub fn get(&self, id: i64) -> Result<Option<StoredDeadLetter>, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT {STORED_COLUMNS} FROM dead_letters WHERE id = ?1"),
                [id],
                stored,
            )
            .optional()
            .map_err(self.err())
    }

    /// Up to `limit` dead letters a replay was asked for, oldest first.
    pub fn requested(&self, limit: usize) -> Result<Vec<StoredDeadLetter>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {STORED_COLUMNS} FROM dead_letters WHERE replay = 1 ORDER BY id LIMIT ?1"
            ))
            .map_err(self.err())?;
        let rows = stmt.query_map([limit as i64], stored).map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// The ids `selection` takes, oldest first.
    pub fn select(&self, selection: &Selection) -> Result<Vec<i64>, StoreError> {
        let all = self.list(selection.function.as_deref())?;
        Ok(all
            .into_iter()
            .filter(|d| selection.ids.is_empty() || selection.ids.contains(&d.id))
            .filter(|d| selection.before_ms.is_none_or(|b| d.created_ms < b))
            .map(|d| d.id)
            .collect())
    }

    /// Asks the daemon to replay the dead letters `ids`: returns how many
    /// were marked.
    pub fn request_replay(&mut self, ids: &[i64]) -> Result<usize, StoreError> {
        self.each(ids, "UPDATE dead_letters SET replay = 1 WHERE id = ?1")
    }

    /// Deletes the dead letters `ids`: returns how many. Counted in
    /// `dead_letters_purges`, so the daemon counts their bytes again.
    pub fn purge(&mut self, ids: &[i64]) -> Result<usize, StoreError> {
        let n = self.each(ids, "DELETE FROM dead_letters WHERE id = ?1")?;
        self.conn
            .execute(
                "INSERT INTO counters (name, value) VALUES ('dead_letters_purges', 1)
                 ON CONFLICT(name) DO UPDATE SET value = value + 1",
                [],
            )
            .map_err(self.err())?;
        Ok(n)
    }

    fn each(&mut self, ids: &[i64], sql: &str) -> Result<usize, StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        let mut n = 0;
        {
            let mut stmt = tx.prepare(sql).map_err(err)?;
            for id in ids {
                n += stmt.execute([id]).map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        Ok(n)
    }

    /// The buffer: (records, bytes, when the oldest was committed).
    pub fn buffer(&self) -> Result<(u64, u64, Option<u64>), StoreError> {
        self.conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(length(CAST(topic AS BLOB)) + length(payload)), 0),
                        (SELECT created_ms FROM outbox ORDER BY seq LIMIT 1) FROM outbox",
                [],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        r.get::<_, i64>(1)? as u64,
                        r.get::<_, Option<i64>>(2)?.map(|v| v as u64),
                    ))
                },
            )
            .map_err(self.err())
    }

    /// Per function: (dead letters, replays asked for).
    pub fn dead_letter_counts(
        &self,
    ) -> Result<std::collections::BTreeMap<String, (u64, u64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT function, COUNT(*), SUM(replay) FROM dead_letters GROUP BY function")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    (r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64),
                ))
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Per function: bytes of state (keys and values).
    pub fn state_bytes(&self) -> Result<std::collections::BTreeMap<String, u64>, StoreError> {
        named_numbers(
            &self.conn,
            "SELECT function, SUM(length(key) + length(value)) FROM function_state GROUP BY function",
        )
        .map_err(self.err())
    }

    /// The deployed functions: (name, version).
    pub fn deployed(&self) -> Result<Vec<(String, u64)>, StoreError> {
        named_numbers(
            &self.conn,
            "SELECT name, version FROM deployed_functions ORDER BY name",
        )
        .map_err(self.err())
    }

    /// The names of the deployed functions (for checking a replay's
    /// function is still on the gateway).
    pub fn deployed_functions(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name FROM deployed_functions ORDER BY name")
            .map_err(self.err())?;
        let rows = stmt.query_map([], |r| r.get(0)).map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(topic: &str, payload: &str) -> NewRecord {
        NewRecord {
            topic: topic.into(),
            payload: payload.as_bytes().to_vec(),
        }
    }

    fn outcomes(records: Vec<NewRecord>) -> Outcomes {
        Outcomes {
            records,
            dead_letters: vec![],
            ..Default::default()
        }
    }

    const NEVER: &dyn Fn() -> bool = &|| false;

    /// A buffer configuration with these settings and the other defaults.
    fn buffer(durability: Durability, max_size: u64, full_policy: FullPolicy) -> BufferConfig {
        BufferConfig {
            durability,
            max_size,
            full_policy,
            ..BufferConfig::default()
        }
    }

    /// A durable store of 1 MiB with backpressure.
    fn open_plain(dir: &Path) -> (Writer, Reader) {
        open(
            dir,
            &buffer(Durability::Full, 1 << 20, FullPolicy::Backpressure),
        )
        .unwrap()
    }

    #[test]
    fn records_come_back_in_commit_order_and_go_on_delete() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, r) = open_plain(dir.path());
        let mut a = outcomes(vec![rec("t/1", "a"), rec("t/2", "b")]);
        let mut b = outcomes(vec![rec("t/3", "c")]);
        let done = w.commit(&mut [&mut a, &mut b], NEVER).unwrap().unwrap();
        assert_eq!(done.records, 3);
        assert_eq!(r.last_seq(), done.last_seq.unwrap());
        let got = r.after(0, 10).unwrap();
        let topics: Vec<_> = got.iter().map(|r| r.topic.as_str()).collect();
        assert_eq!(topics, ["t/1", "t/2", "t/3"]);
        assert_eq!(w.outbox_bytes(), 3 * 4);
        r.outbox().acknowledged(&[got[0].seq]);
        // Not sent again while its delete waits for the next transaction.
        assert_eq!(r.after(0, 10).unwrap(), got[1..]);
        assert_eq!(r.pending().unwrap(), 3);
        assert_eq!(w.commit(&mut [], NEVER).unwrap().unwrap().deleted, 1);
        assert_eq!(r.after(0, 10).unwrap(), got[1..]);
        assert_eq!(r.pending().unwrap(), 2);
        assert_eq!(w.outbox_bytes(), 2 * 4);
    }

    fn page_size_of(dir: &Path) -> i64 {
        Connection::open(dir.join(DB_FILE))
            .unwrap()
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .unwrap()
    }

    /// Rewrites the database in `dir` with `size`-byte pages, as an older
    /// edgefn made it.
    fn set_page_size(dir: &Path, size: i64) {
        let c = Connection::open(dir.join(DB_FILE)).unwrap();
        c.pragma_update(None, "journal_mode", "DELETE").unwrap();
        c.pragma_update(None, "page_size", size).unwrap();
        c.execute_batch("VACUUM").unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        drop(c);
        assert_eq!(page_size_of(dir), size);
    }

    #[test]
    fn new_databases_get_small_pages_and_old_ones_are_rewritten_keeping_everything() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, last) = {
            let (mut w, r) = open_plain(dir.path());
            let mut a = outcomes(vec![rec("t/1", "a"), rec("t/2", "b"), rec("t/3", "c")]);
            w.commit(&mut [&mut a], NEVER).unwrap();
            let all = r.after(0, 10).unwrap();
            r.outbox().acknowledged(&[all[0].seq]);
            w.commit(&mut [], NEVER).unwrap();
            (all[1..].to_vec(), all[2].seq)
        };
        assert_eq!(page_size_of(dir.path()), PAGE_SIZE);
        set_page_size(dir.path(), 4096);
        let (mut w, r) = open_plain(dir.path());
        assert_eq!(page_size_of(dir.path()), PAGE_SIZE);
        assert_eq!(r.after(0, 10).unwrap(), kept);
        assert_eq!(w.outbox_bytes(), 2 * 4);
        let done = w
            .commit(&mut [&mut outcomes(vec![rec("t", "d")])], NEVER)
            .unwrap()
            .unwrap();
        assert!(done.last_seq.unwrap() > last);
        let mode: String = w
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn a_database_past_the_rewrite_limit_keeps_its_pages_until_it_is_forwarded() {
        let dir = tempfile::tempdir().unwrap();
        let big = "x".repeat(4096);
        let seqs: Vec<i64> = {
            let (mut w, r) = open(
                dir.path(),
                &buffer(Durability::Relaxed, 1 << 30, FullPolicy::Backpressure),
            )
            .unwrap();
            let mut a = outcomes((0..400).map(|_| rec("t", &big)).collect());
            w.commit(&mut [&mut a], NEVER).unwrap();
            r.after(0, 1000).unwrap().iter().map(|r| r.seq).collect()
        };
        set_page_size(dir.path(), 4096);
        {
            let (mut w, r) = open_plain(dir.path());
            assert_eq!(
                page_size_of(dir.path()),
                4096,
                "more than CONVERT_LIMIT in use"
            );
            assert_eq!(r.pending().unwrap(), 400);
            r.outbox().acknowledged(&seqs);
            w.commit(&mut [], NEVER).unwrap();
        }
        let (_w, r) = open_plain(dir.path());
        assert_eq!(page_size_of(dir.path()), PAGE_SIZE);
        assert_eq!(r.pending().unwrap(), 0);
    }

    #[test]
    fn records_survive_reopening_and_seq_is_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let last = {
            let (mut w, r) = open_plain(dir.path());
            let mut a = outcomes(vec![rec("t", "1"), rec("t", "2")]);
            w.commit(&mut [&mut a], NEVER).unwrap();
            let all = r.after(0, 10).unwrap();
            r.outbox().acknowledged(&[all[1].seq]);
            w.commit(&mut [], NEVER).unwrap();
            all[1].seq
        };
        let (mut w, r) = open_plain(dir.path());
        assert_eq!(r.after(0, 10).unwrap().len(), 1);
        assert_eq!(w.outbox_bytes(), 2);
        let done = w
            .commit(&mut [&mut outcomes(vec![rec("t", "3")])], NEVER)
            .unwrap()
            .unwrap();
        assert!(done.last_seq.unwrap() > last);
    }

    #[test]
    fn a_version_1_database_keeps_its_records_and_its_sequence() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            for p in ["a", "b", "c"] {
                c.execute(
                    "INSERT INTO outbox (topic, payload, created_ms) VALUES ('t', ?1, 0)",
                    [p.as_bytes()],
                )
                .unwrap();
            }
            // The newest was delivered: AUTOINCREMENT remembers seq 3.
            c.execute("DELETE FROM outbox WHERE seq = 3", []).unwrap();
        }
        let (mut w, r) = open_plain(dir.path());
        let kept: Vec<(i64, Vec<u8>)> = r
            .after(0, 10)
            .unwrap()
            .into_iter()
            .map(|r| (r.seq, r.payload))
            .collect();
        assert_eq!(kept, [(1, b"a".to_vec()), (2, b"b".to_vec())]);
        assert_eq!(w.outbox_bytes(), 4);
        let done = w
            .commit(&mut [&mut outcomes(vec![rec("t", "d")])], NEVER)
            .unwrap()
            .unwrap();
        assert_eq!(done.last_seq, Some(4));
    }

    #[test]
    fn drop_oldest_makes_room_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, r) = open(
            dir.path(),
            &buffer(Durability::Relaxed, 10, FullPolicy::DropOldest),
        )
        .unwrap();
        for i in 0..5 {
            // 5 bytes each: "t" + 4-byte payload
            w.commit(
                &mut [&mut outcomes(vec![rec("t", &format!("{i:04}"))])],
                NEVER,
            )
            .unwrap();
        }
        let left: Vec<_> = r.after(0, 10).unwrap();
        assert_eq!(left.len(), 2);
        assert_eq!(left[1].payload, b"0004");
        assert_eq!(w.counter("dropped_records").unwrap(), 3);
        assert!(w.outbox_bytes() <= 10);
        // Dropped records left the recent tail too.
        let recent = r.outbox();
        assert_eq!(recent.take(0, 10), None);
        assert_eq!(recent.take(left[0].seq - 1, 10), Some(left));
    }

    #[test]
    fn the_recent_tail_serves_new_records_and_sends_the_rest_to_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            open(
                dir.path(),
                &buffer(Durability::Full, 1 << 30, FullPolicy::Backpressure),
            )
        };
        let (mut w, r) = open().unwrap();
        let recent = r.outbox();
        let mut a = outcomes(vec![rec("t", "1"), rec("t", "2"), rec("t", "3")]);
        w.commit(&mut [&mut a], NEVER).unwrap().unwrap();
        let all = r.after(0, 10).unwrap();
        // From memory, in order, as many as asked.
        assert_eq!(recent.take(0, 2), Some(all[..2].to_vec()));
        assert_eq!(recent.take(2, 2), Some(all[2..].to_vec()));
        assert_eq!(recent.take(3, 2), Some(vec![]));
        // Taken is not delivered: after a reconnect the forwarder starts
        // again from the oldest, which only SQLite has.
        assert_eq!(recent.take(0, 10), None);
        assert_eq!(r.after(0, 10).unwrap(), all);

        // An overflow leaves the oldest to SQLite and keeps the newest.
        let mut many = outcomes(
            (0..TAIL_RECORDS + 10)
                .map(|i| rec("t", &i.to_string()))
                .collect(),
        );
        w.commit(&mut [&mut many], NEVER).unwrap().unwrap();
        assert_eq!(recent.take(3, 1), None);
        let first_kept = 3 + 10;
        let kept = recent.take(first_kept, 1).unwrap();
        assert_eq!(kept[0].seq, first_kept + 1);
        assert_eq!(kept[0].payload, b"10");
        drop((w, r));

        // After a restart everything buffered comes from SQLite.
        let (_w, r) = open().unwrap();
        assert_eq!(r.outbox().take(0, 10), None);
        assert_eq!(r.after(0, 3).unwrap(), all);
    }

    /// A durable store with room for 5 bytes, holding one record of 5 (which
    /// it returns).
    fn full_store(dir: &Path) -> (Writer, Reader, Record) {
        let (mut w, r) = open(dir, &buffer(Durability::Full, 5, FullPolicy::Backpressure)).unwrap();
        w.commit(&mut [&mut outcomes(vec![rec("t", "0000")])], NEVER)
            .unwrap();
        let first = r.after(0, 1).unwrap().remove(0);
        (w, r, first)
    }

    /// Commits a second record on its own thread, returning once that commit
    /// waits for room (it asks whether to give up while it waits: that says
    /// it waits). The thread returns what the commit did, and the writer.
    fn commit_waiting_for_room(mut w: Writer) -> std::thread::JoinHandle<(Committed, Writer)> {
        let waiting = Arc::new(std::sync::Barrier::new(2));
        let t = {
            let waiting = waiting.clone();
            std::thread::spawn(move || {
                let mut second = outcomes(vec![rec("t", "0001")]);
                let once = std::sync::Once::new();
                let asked = || {
                    once.call_once(|| {
                        waiting.wait();
                    });
                    false
                };
                let done = w.commit(&mut [&mut second], &asked).unwrap().unwrap();
                (done, w)
            })
        };
        waiting.wait();
        t
    }

    #[test]
    fn backpressure_waits_for_room() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, r, first) = full_store(dir.path());
        // Full: a commit that may give up does so without writing.
        let mut second = outcomes(vec![rec("t", "0001")]);
        assert_eq!(w.commit(&mut [&mut second], &|| true).unwrap(), None);
        assert_eq!(r.pending().unwrap(), 1);
        // The forwarder reports the first record delivered from another
        // thread; the blocked commit deletes it and then goes through.
        let t = commit_waiting_for_room(w);
        r.outbox().acknowledged(&[first.seq]);
        assert_eq!(t.join().unwrap().0.records, 1);
        assert_eq!(r.pending().unwrap(), 1);
        assert_eq!(r.after(0, 10).unwrap()[0].payload, b"0001");
    }

    #[test]
    fn a_refused_record_makes_room_for_a_commit_waiting_on_a_full_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let (w, r, first) = full_store(dir.path());
        let t = commit_waiting_for_room(w);
        // The upstream refuses the first record instead of acknowledging it.
        r.outbox()
            .refused(first.seq, "too large for the upstream".into());
        let (done, w) = t.join().unwrap();
        assert_eq!(done.records, 1);
        let left: Vec<_> = r.after(0, 10).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].payload, b"0001");
        let dead = dead_letters(dir.path()).unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (
                dead[0].function.as_str(),
                dead[0].kind,
                dead[0].error.as_str()
            ),
            (UPSTREAM, "rejected", "too large for the upstream")
        );
        assert_eq!(dead[0].payload, b"0000");
        assert_eq!(w.outbox_bytes(), 5);
    }

    #[test]
    fn a_head_of_acknowledged_records_does_not_hide_the_backlog_behind_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, r) = open_plain(dir.path());
        let mut many = outcomes((0..10).map(|i| rec("t", &i.to_string())).collect());
        w.commit(&mut [&mut many], NEVER).unwrap();
        let all = r.after(0, 10).unwrap();
        // Acknowledged, not yet deleted: the forwarder reads on from the
        // oldest after a reconnect and must get the next unsent ones.
        let acked: Vec<i64> = all[..5].iter().map(|r| r.seq).collect();
        r.outbox().acknowledged(&acked);
        assert_eq!(r.after(0, 3).unwrap(), all[5..8]);
        // The same for a refused record at the head.
        r.outbox().refused(all[5].seq, "no".into());
        assert_eq!(r.after(0, 3).unwrap(), all[6..9]);
    }

    #[test]
    fn dead_letters_are_bounded_oldest_first_and_the_drops_counted() {
        let dir = tempfile::tempdir().unwrap();
        let config = BufferConfig {
            dead_letters_max_size: 100,
            ..BufferConfig::default()
        };
        let letter = |i: usize| DeadLetter {
            function: "f".into(),
            topic: "in".into(),
            payload: vec![b'x'; 40],
            kind: "trap",
            error: format!("e{i}"),
            attempts: 1,
            version: None,
        };
        // 45 bytes each: two fit in 100, a third pushes the oldest out.
        assert_eq!(letter(0).size(), 45);
        let (mut w, _r) = open(dir.path(), &config).unwrap();
        let mut dropped = 0;
        for i in 0..4 {
            let mut o = Outcomes {
                records: vec![],
                dead_letters: vec![letter(i)],
                ..Default::default()
            };
            dropped += w
                .commit(&mut [&mut o], NEVER)
                .unwrap()
                .unwrap()
                .dead_letters_dropped;
        }
        assert_eq!(dropped, 2);
        let errors: Vec<String> = dead_letters(dir.path())
            .unwrap()
            .into_iter()
            .map(|d| d.error)
            .collect();
        assert_eq!(errors, ["e2", "e3"]);
        assert_eq!(w.counter("dead_letters_dropped").unwrap(), 2);
        drop(w);
        // The size is recomputed at open: one more still drops one.
        let (mut w, _r) = open(dir.path(), &config).unwrap();
        let mut o = Outcomes {
            records: vec![],
            dead_letters: vec![letter(4)],
            ..Default::default()
        };
        let done = w.commit(&mut [&mut o], NEVER).unwrap().unwrap();
        assert_eq!(done.dead_letters_dropped, 1);
        // One dead letter larger than the bound is kept on its own.
        let mut big = letter(5);
        big.payload = vec![b'x'; 1000];
        let mut o = Outcomes {
            records: vec![],
            dead_letters: vec![big],
            ..Default::default()
        };
        w.commit(&mut [&mut o], NEVER).unwrap();
        let left = dead_letters(dir.path()).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].error, "e5");
    }

    #[test]
    fn deployments_keep_the_highest_version_through_removals_and_reopening() {
        const MAX: u64 = crate::bundle::MAX_VERSION;
        let dir = tempfile::tempdir().unwrap();
        let _store = open_plain(dir.path());
        let mut d = Deployments::open(dir.path()).unwrap();
        assert_eq!(d.highest("f").unwrap(), None);
        d.deploy("f", 5, None, b"five").unwrap();
        d.deploy("f", 7, Some(3), b"seven").unwrap();
        d.deploy("g", MAX, None, b"max").unwrap();
        assert_eq!(
            d.versions("f").unwrap(),
            Some(Versions {
                highest: 7,
                floor: Some(3)
            })
        );
        let stored = |d: &Deployments| -> Vec<(String, u64, Vec<u8>)> {
            d.all()
                .unwrap()
                .into_iter()
                .map(|b| (b.name, b.version, b.bundle))
                .collect()
        };
        assert_eq!(
            stored(&d),
            [
                ("f".into(), 7, b"seven".to_vec()),
                ("g".into(), MAX, b"max".to_vec())
            ]
        );
        d.roll_back("f").unwrap();
        assert_eq!(stored(&d)[0], ("f".into(), 5, b"five".to_vec()));
        assert_eq!(d.highest("f").unwrap(), Some(7));
        d.roll_back("f").unwrap();
        assert_eq!(stored(&d).len(), 1, "nothing before five: gone");
        d.deploy("f", 8, Some(2), b"eight").unwrap();
        d.remove("f", 9).unwrap();
        // The highest compares as a number, the largest version included.
        d.deploy("g", MAX - 1, None, b"lower").unwrap();
        drop(d);
        let d = Deployments::open(dir.path()).unwrap();
        assert_eq!(
            d.versions("f").unwrap(),
            Some(Versions {
                highest: 9,
                floor: Some(3)
            })
        );
        assert_eq!(d.highest("g").unwrap(), Some(MAX));
        assert_eq!(stored(&d), [("g".into(), MAX - 1, b"lower".to_vec())]);
    }

    #[test]
    fn the_incarnation_stays_with_the_database_and_a_new_database_draws_another() {
        let dir = tempfile::tempdir().unwrap();
        let first = open_plain(dir.path()).1.incarnation();
        assert_ne!(first, 0);
        assert_eq!(open_plain(dir.path()).1.incarnation(), first);
        std::fs::remove_dir_all(dir.path()).unwrap();
        assert_ne!(open_plain(dir.path()).1.incarnation(), first);
    }

    #[test]
    fn with_relaxed_durability_a_block_of_seqs_is_reserved_before_it_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _r) = open(
            dir.path(),
            &buffer(Durability::Relaxed, 1 << 20, FullPolicy::Backpressure),
        )
        .unwrap();
        let done = w
            .commit(&mut [&mut outcomes(vec![rec("t", "1")])], NEVER)
            .unwrap()
            .unwrap();
        assert_eq!(done.last_seq, Some(1));
        // Reserved by a transaction of its own, before the record's.
        assert_eq!(w.counter("seq_reserved").unwrap(), 1 + SEQ_BLOCK);
    }

    #[test]
    fn dead_letters_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _r) = open_plain(dir.path());
        let mut o = Outcomes {
            records: vec![],
            dead_letters: vec![DeadLetter {
                function: "f".into(),
                topic: "in".into(),
                payload: b"x".to_vec(),
                kind: "trap",
                error: "boom".into(),
                attempts: 2,
                version: None,
            }],
            ..Default::default()
        };
        assert_eq!(
            w.commit(&mut [&mut o], NEVER)
                .unwrap()
                .unwrap()
                .dead_letters,
            1
        );
        let d = dead_letters(dir.path()).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].kind, d[0].attempts), ("trap", 2));
    }

    #[test]
    fn a_full_disk_fails_the_commit_whole_and_it_succeeds_once_there_is_room() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, r) = open(
            dir.path(),
            &buffer(Durability::Full, 1 << 30, FullPolicy::Backpressure),
        )
        .unwrap();
        let full = w.disk_full_switch();
        full.store(true, Ordering::Relaxed);
        let mut big = outcomes((0..200).map(|i| rec("t", &format!("{i:0>2000}"))).collect());
        let err = w.commit(&mut [&mut big], NEVER).unwrap_err();
        assert!(err.to_string().contains("full"), "{err}");
        assert_eq!(r.pending().unwrap(), 0);
        assert_eq!(w.outbox_bytes(), 0);
        full.store(false, Ordering::Relaxed);
        assert_eq!(
            w.commit(&mut [&mut big], NEVER).unwrap().unwrap().records,
            200
        );
        assert_eq!(r.pending().unwrap(), 200);
    }

    #[test]
    fn deletes_in_a_failed_commit_are_done_by_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, r) = open_plain(dir.path());
        w.commit(
            &mut [&mut outcomes(vec![rec("t", "1"), rec("t", "2")])],
            NEVER,
        )
        .unwrap();
        let sent = r.after(0, 10).unwrap();
        r.outbox().acknowledged(&[sent[0].seq]);
        // The transaction that carries the delete fails whole.
        let full = w.disk_full_switch();
        full.store(true, Ordering::Relaxed);
        let mut big = outcomes((0..200).map(|i| rec("t", &format!("{i:0>2000}"))).collect());
        assert!(w.commit(&mut [&mut big], NEVER).is_err());
        assert_eq!(r.pending().unwrap(), 2);
        // Still gone for the forwarder, and deleted by the next commit.
        assert_eq!(r.after(0, 10).unwrap(), sent[1..]);
        assert!(w.has_acknowledged());
        full.store(false, Ordering::Relaxed);
        assert_eq!(w.commit(&mut [], NEVER).unwrap().unwrap().deleted, 1);
        assert_eq!(r.pending().unwrap(), 1);
        assert!(!w.has_acknowledged());
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
            c.pragma_update(None, "user_version", 99).unwrap();
        }
        let e = open(
            dir.path(),
            &buffer(Durability::Full, 1, FullPolicy::Backpressure),
        )
        .err()
        .unwrap();
        assert!(matches!(e, StoreError::TooNew { found: 99, .. }), "{e}");
    }
}
