//! The writer's connection: the one transaction per group commit
//! (invariants 1 to 4 of the module doc), and what rides in it: records,
//! dead letters, state, deletes of forwarded records, the size bound.

use super::*;

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
        let retained = std::mem::take(&mut *self.shared.retained.lock().expect("retained lock"));
        let result = self.write(batch, incoming, &taken, subscriptions.as_ref(), &retained);
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
        if result.is_err() {
            // For the next transaction, unless newer changes came meanwhile.
            let mut pending = self.shared.retained.lock().expect("retained lock");
            for (topic, value) in retained {
                pending.entry(topic).or_insert(value);
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
        retained: &std::collections::HashMap<String, Option<Retained>>,
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
        save_retained(&tx, retained).map_err(err)?;
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
                if rows > 0
                    && let Some(not_logged) = self.dead_letter_warning.admit()
                {
                    tracing::warn!(
                        dropped = rows,
                        bytes,
                        not_logged,
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

    /// Whether the local session's filters or retained messages wait for
    /// a transaction.
    fn has_subscriptions_to_save(&self) -> bool {
        self.shared
            .subscriptions
            .lock()
            .expect("subscriptions lock")
            .is_some()
            || !self
                .shared
                .retained
                .lock()
                .expect("retained lock")
                .is_empty()
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

/// Writes the retained messages set or cleared since the last transaction.
fn save_retained(
    tx: &rusqlite::Transaction<'_>,
    retained: &std::collections::HashMap<String, Option<Retained>>,
) -> rusqlite::Result<()> {
    for (topic, value) in retained {
        match value {
            Some(m) => tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO retained (topic, payload, qos) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![topic, m.payload, m.qos])?,
            None => tx
                .prepare_cached("DELETE FROM retained WHERE topic = ?1")?
                .execute([topic])?,
        };
    }
    Ok(())
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
