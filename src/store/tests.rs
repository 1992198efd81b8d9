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

#[test]
fn retained_messages_are_written_in_the_next_transaction_and_read_back_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut w, r) = open_plain(dir.path());
        let retained = r.retained_messages();
        let message = |topic: &str, payload: &str| Retained {
            topic: topic.into(),
            payload: payload.into(),
            qos: 1,
        };
        retained.set(message("dev/config/a", "one"));
        retained.set(message("dev/config/b", "two"));
        retained.set(message("dev/config/a", "three"));
        assert!(w.has_acknowledged(), "a change waits for a transaction");
        assert!(r.retained().unwrap().is_empty(), "not before it");
        w.commit(&mut [], NEVER).unwrap();
        assert!(!w.has_acknowledged());
        retained.clear("dev/config/b");
        w.commit(&mut [], NEVER).unwrap();
        assert_eq!(r.retained().unwrap(), [message("dev/config/a", "three")]);
    }
    let (_w, r) = open_plain(dir.path());
    let kept = r.retained().unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].payload, b"three");
}
