//! The dead letters as `edgefn dead-letters` and the replayer see them,
//! on a connection of their own.

use super::*;

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
