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
//! # Schema (version 7, in `PRAGMA user_version`)
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
//! - `retained(topic TEXT PRIMARY KEY, payload BLOB, qos INTEGER)`
//!   (version 7): the built-in broker's retained messages
//!   ([`RetainedMessages`]), written in the writer's next transaction.
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
use crate::state::Entries;
use crate::state::{FunctionState, StateWrite};

mod deployments;
mod inspect;
mod writer;

pub use deployments::{Deployments, StoredBundle, Versions};
pub use inspect::{Inspector, Selection, StoredDeadLetter, dead_letters};

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
    "
    CREATE TABLE retained (
        topic   TEXT PRIMARY KEY,
        payload BLOB NOT NULL,
        qos     INTEGER NOT NULL
    ) WITHOUT ROWID;
",
];

/// Seqs reserved at a time (see invariant 4): one `counters` write per
/// this many records, and the most a restart skips.
pub const SEQ_BLOCK: i64 = 4096;

/// Bytes per database page, for new databases (and existing ones,
/// `convert_page_size`). A WAL frame is one page plus 24 bytes, and a
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
    /// (the same sum as `DEAD_LETTER_SIZE` in SQL).
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
    /// Retained messages set (`Some`) or cleared (`None`) since the last
    /// transaction, by topic.
    retained: Mutex<std::collections::HashMap<String, Option<Retained>>>,
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
    // until `convert_page_size`.
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
            dead_letter_warning: crate::throttle::Throttle::per_minute(1),
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
    dead_letter_warning: crate::throttle::Throttle,
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

    /// The built-in broker's retained messages, as last committed.
    pub fn retained(&self) -> Result<Vec<Retained>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT topic, payload, qos FROM retained ORDER BY topic")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Retained {
                    topic: r.get(0)?,
                    payload: r.get(1)?,
                    qos: r.get(2)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// The handle with which the built-in broker keeps its retained messages.
    pub fn retained_messages(&self) -> RetainedMessages {
        RetainedMessages(self.shared.clone())
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

/// A retained message of the built-in broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retained {
    /// Its topic.
    pub topic: String,
    /// Its payload (never empty: an empty retained publish clears).
    pub payload: Vec<u8>,
    /// Its QoS, 0 to 2.
    pub qos: u8,
}

/// Keeps the built-in broker's retained messages: a change is written in
/// the writer's next transaction (which it wakes), after the message was
/// acknowledged to its publisher, as retained messages are kept by
/// Mosquitto's `persistence`: a crash can lose the latest changes, never
/// records.
#[derive(Debug, Clone)]
pub struct RetainedMessages(Arc<Shared>);

impl RetainedMessages {
    /// Remembers `message` as the one retained on its topic.
    pub fn set(&self, message: Retained) {
        self.change(message.topic.clone(), Some(message));
    }

    /// Forgets the message retained on `topic`.
    pub fn clear(&self, topic: &str) {
        self.change(topic.to_owned(), None);
    }

    fn change(&self, topic: String, value: Option<Retained>) {
        self.0
            .retained
            .lock()
            .expect("retained lock")
            .insert(topic, value);
        self.0.leaving_ready.notify_one();
    }
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

#[cfg(test)]
mod tests;
