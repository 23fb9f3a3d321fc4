use super::*;

fn store() -> Store {
    Store::open_in_memory().unwrap()
}

#[test]
fn create_get_update_delete_use_one_revision_counter() {
    let s = store();
    let a = s.create("pods/default/a", b"1").unwrap();
    assert_eq!(a.rev, 1);
    assert_eq!(a.create_rev, 1);
    let b = s.create("pods/default/b", b"x").unwrap();
    assert_eq!(b.rev, 2);
    assert!(matches!(
        s.create("pods/default/a", b"again"),
        Err(StoreError::AlreadyExists)
    ));
    let a2 = s.update("pods/default/a", b"2", Some(1)).unwrap();
    assert_eq!((a2.rev, a2.create_rev), (3, 1));
    assert!(matches!(
        s.update("pods/default/a", b"3", Some(1)),
        Err(StoreError::Conflict(3))
    ));
    assert_eq!(s.get("pods/default/a").unwrap().value, b"2");
    let d = s.delete("pods/default/a", None).unwrap();
    assert_eq!(d.rev, 4);
    assert_eq!(d.value, b"2");
    assert!(matches!(s.get("pods/default/a"), Err(StoreError::NotFound)));
    assert!(matches!(
        s.delete("pods/default/a", None),
        Err(StoreError::NotFound)
    ));
    assert_eq!(s.current_rev().unwrap(), 4);
    // Re-creating starts a new life of the key.
    let a3 = s.create("pods/default/a", b"new").unwrap();
    assert_eq!((a3.rev, a3.create_rev), (5, 5));
}

#[test]
fn list_pages_in_key_order_at_a_fixed_revision() {
    let s = store();
    for n in ["c", "a", "b", "d"] {
        s.create(&format!("cm/ns1/{n}"), n.as_bytes()).unwrap();
    }
    s.create("cm/ns10/z", b"other namespace").unwrap();
    let p1 = s.list("cm/ns1/", 0, None, 2).unwrap();
    let keys: Vec<_> = p1.items.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["cm/ns1/a", "cm/ns1/b"]);
    assert_eq!(p1.more_after.as_deref(), Some("cm/ns1/b"));
    assert_eq!(p1.remaining, 2);
    // Changes after the first page do not show in the next pages of the same list.
    s.delete("cm/ns1/c", None).unwrap();
    s.create("cm/ns1/e", b"late").unwrap();
    let p2 = s.list("cm/ns1/", p1.rev, Some("cm/ns1/b"), 2).unwrap();
    let keys: Vec<_> = p2.items.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["cm/ns1/c", "cm/ns1/d"]);
    assert!(p2.more_after.is_none());
    let now = s.list("cm/ns1/", 0, None, 0).unwrap();
    let keys: Vec<_> = now.items.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["cm/ns1/a", "cm/ns1/b", "cm/ns1/d", "cm/ns1/e"]);
    assert_eq!(s.list("cm/", 0, None, 0).unwrap().items.len(), 5);
}

#[tokio::test]
async fn watch_replays_backlog_then_live_events() {
    let s = store();
    s.create("a/1", b"v1").unwrap();
    s.update("a/1", b"v2", None).unwrap();
    s.create("b/1", b"other prefix").unwrap();
    s.delete("a/1", None).unwrap();
    let mut w = s.watch("a/", 1).unwrap();
    let kinds: Vec<_> = w.backlog.iter().map(|e| (e.kind, e.entry.rev)).collect();
    assert_eq!(kinds, [(EventKind::Modified, 2), (EventKind::Deleted, 4)]);
    assert_eq!(w.backlog[1].entry.value, b"v2");
    assert_eq!(w.seen_rev, 4);
    s.create("a/2", b"live").unwrap();
    let ev = w.live.recv().await.unwrap();
    assert_eq!((ev.kind, ev.entry.rev), (EventKind::Added, 5));
}

#[test]
fn compaction_keeps_current_values_and_gones_old_revisions() {
    let s = store();
    s.create("k/a", b"1").unwrap();
    s.update("k/a", b"2", None).unwrap();
    s.create("k/b", b"1").unwrap();
    s.delete("k/b", None).unwrap();
    s.create("k/c", b"1").unwrap();
    let removed = s.compact(4).unwrap();
    assert_eq!(removed, 3, "k/a@1, k/b@3, k/b deletion@4");
    assert_eq!(s.get("k/a").unwrap().value, b"2");
    assert_eq!(s.list("k/", 0, None, 0).unwrap().items.len(), 2);
    assert!(matches!(
        s.watch("k/", 2),
        Err(StoreError::Gone {
            requested: 2,
            compacted: 4
        })
    ));
    assert!(matches!(
        s.list("k/", 3, None, 0),
        Err(StoreError::Gone { .. })
    ));
    let w = s.watch("k/", 4).unwrap();
    assert_eq!(w.backlog.len(), 1);
    // The counter never goes back, even when the newest row was compacted away.
    s.delete("k/c", None).unwrap();
    s.compact(100).unwrap();
    assert_eq!(s.create("k/d", b"1").unwrap().rev, 7);
}

#[test]
fn reopening_the_file_keeps_data_and_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let s = Store::open(&path).unwrap();
        s.create("x/a", b"1").unwrap();
        s.update("x/a", b"2", Some(1)).unwrap();
    }
    let s = Store::open(&path).unwrap();
    let e = s.get("x/a").unwrap();
    assert_eq!((e.rev, e.value.as_slice()), (2, b"2".as_slice()));
    assert_eq!(s.create("x/b", b"1").unwrap().rev, 3);
}

#[test]
fn concurrent_writers_share_commits_and_get_distinct_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("state.db")).unwrap();
    let threads: Vec<_> = (0..32)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                (0..40)
                    .map(|i| s.create(&format!("k/{t}-{i}"), b"v").unwrap().rev)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut revs: Vec<i64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    revs.sort();
    assert_eq!(revs, (1..=32 * 40).collect::<Vec<_>>());
    assert_eq!(s.current_rev().unwrap(), 32 * 40);
    assert_eq!(s.list("k/", 0, None, 0).unwrap().items.len(), 32 * 40);
    let commits = s.commits();
    assert!(
        commits < 32 * 40,
        "{commits} commits for {} writes: concurrent writers were not batched",
        32 * 40
    );
    drop(s);
    let s = Store::open(&dir.path().join("state.db")).unwrap();
    assert_eq!(s.current_rev().unwrap(), 32 * 40);
}

#[test]
fn reads_do_not_wait_for_a_writer() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("state.db")).unwrap();
    s.create("r/a", b"1").unwrap();
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let w = {
        let s = s.clone();
        std::thread::spawn(move || {
            s.write("r/a", |_| -> Result<Decision> {
                entered_tx.send(()).unwrap();
                // The writer holds its lock until told to go on.
                release_rx.recv().unwrap();
                Ok(Decision::Put(b"2".to_vec()))
            })
            .unwrap()
        })
    };
    entered.recv().unwrap();
    let t = std::time::Instant::now();
    assert_eq!(s.get("r/a").unwrap().value, b"1");
    assert_eq!(s.list("r/", 0, None, 0).unwrap().items.len(), 1);
    let watch = s.watch("r/", 0).unwrap();
    assert_eq!(watch.backlog.len(), 1);
    assert!(t.elapsed() < std::time::Duration::from_secs(2));
    release.send(()).unwrap();
    let e = w.join().unwrap().unwrap();
    assert_eq!(e.rev, 2);
    assert_eq!(s.get("r/a").unwrap().value, b"2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_started_during_writes_see_every_revision_once() {
    let s = store();
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    s.create(&format!("w/{t}-{i}"), b"v").unwrap();
                }
            })
        })
        .collect();
    let mut watches = Vec::new();
    for _ in 0..5 {
        std::thread::sleep(std::time::Duration::from_millis(2));
        watches.push(s.watch("w/", 0).unwrap());
    }
    for w in writers {
        w.join().unwrap();
    }
    for mut w in watches {
        let mut revs: Vec<i64> = w.backlog.iter().map(|e| e.entry.rev).collect();
        while let Ok(ev) = w.live.try_recv() {
            if ev.entry.rev > w.seen_rev {
                revs.push(ev.entry.rev);
            }
        }
        assert_eq!(revs, (1..=800).collect::<Vec<_>>());
    }
}

#[test]
fn a_failed_decision_writes_nothing_and_later_writes_go_on() {
    let s = store();
    s.create("f/a", b"1").unwrap();
    let r: Result<Option<Entry>> = s.write("f/a", |_| Err(StoreError::Conflict(7)));
    assert!(matches!(r, Err(StoreError::Conflict(7))));
    assert_eq!(s.create("f/b", b"1").unwrap().rev, 2);
    assert_eq!(s.current_rev().unwrap(), 2);
}
