//! Deployed bundles and their version counters (highest, floor), on a
//! connection of their own.

use super::*;

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
