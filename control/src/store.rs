//! The embedded object store: a revision log in SQLite, in the manner of k3s's kine.
//!
//! Every write appends one row; the row's `rev` is the global revision and becomes the object's
//! resourceVersion. The current state of a key is its newest row, unless that row is a deletion.
//! Old rows are removed by compaction; reads or watches below the compacted revision get `Gone`.
//!
//! Writes use group commit: each writer runs its read-modify-write in the open transaction of
//! the current batch (on the calling thread, under the writer lock, so writes are totally
//! ordered), then waits. A committer thread commits the batch (no sync inside SQLite) and then
//! fsyncs the WAL file outside the lock, while the next batch is already being staged. A writer
//! is answered, and its change published to watchers, only once that fsync has returned. Reads
//! use their own WAL snapshot connections and see only published (durable) revisions, so they
//! never wait for a writer and never see a write that could still be lost.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use tokio::sync::broadcast;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("already exists")]
    AlreadyExists,
    /// The expected revision did not match; carries the current one.
    #[error("conflict: current revision is {0}")]
    Conflict(i64),
    #[error("revision {requested} has been compacted (oldest available {compacted})")]
    Gone { requested: i64, compacted: i64 },
    #[error("sqlite: {0}")]
    Sql(#[from] rusqlite::Error),
    /// The batch this write was part of failed to commit; nothing of it was stored.
    #[error("commit failed: {0}")]
    Commit(#[source] Arc<rusqlite::Error>),
    /// The log could not be made durable: the store takes no more writes.
    #[error("syncing the log failed: {0}")]
    Sync(#[source] Arc<std::io::Error>),
    #[error("the store is closed")]
    Closed,
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One stored version of a key.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision that wrote this version.
    pub rev: i64,
    /// The revision that created the key (first version since its last deletion).
    pub create_rev: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Added,
    Modified,
    Deleted,
}

/// A change, as seen by watchers. For `Deleted`, `entry.value` is the last value and
/// `entry.rev` the deletion's revision.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    pub entry: Entry,
    /// The value before a `Modified` change (None when compacted away or not a modification):
    /// lets filtered watches see objects leave or enter their selection.
    pub prev: Option<Vec<u8>>,
    /// What watchers derive from this event (decoded object, serialized form), computed by
    /// the first one and shared by the others.
    pub memo: Memo,
}

/// A slot for data derived once from an event and shared by everyone who holds it.
#[derive(Clone, Default)]
pub struct Memo(std::sync::OnceLock<Arc<dyn std::any::Any + Send + Sync>>);

impl Memo {
    /// The derived value, computing it with `f` the first time; `T` must be the same type
    /// at every call for one event.
    pub fn get_or_init<T: Send + Sync + 'static>(&self, f: impl FnOnce() -> T) -> Arc<T> {
        let any = self.0.get_or_init(|| Arc::new(f())).clone();
        any.downcast::<T>()
            .unwrap_or_else(|_| panic!("one memo type per event"))
    }
}

impl std::fmt::Debug for Memo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "Memo(set)"
        } else {
            "Memo(empty)"
        })
    }
}

/// What a read-modify-write does with the key.
#[derive(Debug)]
pub enum Decision {
    Put(Vec<u8>),
    Delete,
    /// Write nothing.
    Keep,
}

/// One page of a list.
#[derive(Debug)]
pub struct Page {
    pub items: Vec<Entry>,
    /// The revision the list was read at.
    pub rev: i64,
    /// Set when more items follow: the last key returned.
    pub more_after: Option<String>,
    pub remaining: i64,
}

/// A watch: events after the requested revision from the log, then live ones.
pub struct Watch {
    pub backlog: Vec<Event>,
    pub live: broadcast::Receiver<Arc<Event>>,
    /// The last revision already in `backlog` (live events at or below it are skipped).
    pub seen_rev: i64,
}

/// How many published events a watcher may fall behind before it is told to start over.
pub const WATCH_WINDOW: usize = 4096;

/// Readers kept open between reads; more are opened (and closed) under a burst.
const IDLE_READERS: usize = 8;

/// Where connections come from: a database file, or a process-local in-memory database.
enum Source {
    File(PathBuf),
    Memory(String),
}

impl Source {
    fn open(&self, read_only: bool) -> Result<Connection> {
        let mut flags = OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        flags |= if read_only {
            OpenFlags::SQLITE_OPEN_READ_ONLY
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
        };
        let conn = match self {
            Source::File(p) => Connection::open_with_flags(p, flags)?,
            Source::Memory(uri) => Connection::open_with_flags(uri, flags)?,
        };
        // Only the in-memory database (rollback journal) ever locks readers out, and only
        // for the instant of a commit.
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        Ok(conn)
    }
}

/// The outcome of one batch, which all of its writers wait for.
#[derive(Default)]
struct Done {
    result: Mutex<Option<Result<(), StoreError>>>,
    cv: Condvar,
}

impl Done {
    fn set(&self, r: Result<(), StoreError>) {
        *lock(&self.result) = Some(r);
        self.cv.notify_all();
    }

    fn wait(&self) -> Result<()> {
        let mut g = lock(&self.result);
        loop {
            match &*g {
                Some(Ok(())) => return Ok(()),
                Some(Err(e)) => return Err(e.shared()),
                None => g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }
}

impl StoreError {
    /// The same failure for every writer of a batch.
    fn shared(&self) -> StoreError {
        match self {
            StoreError::Commit(e) => StoreError::Commit(e.clone()),
            StoreError::Sync(e) => StoreError::Sync(e.clone()),
            _ => StoreError::Closed,
        }
    }
}

/// The open transaction of the batch being staged.
struct Batch {
    events: Vec<Arc<Event>>,
    done: Arc<Done>,
}

struct Writer {
    conn: Connection,
    batch: Option<Batch>,
    /// The last revision written into the connection (committed or staged).
    rev: i64,
    /// Set when the log could not be synced: writes are refused from then on.
    broken: Option<Arc<std::io::Error>>,
    shutdown: bool,
}

struct Publisher {
    events: broadcast::Sender<Arc<Event>>,
    sinks: Vec<Sink>,
}

/// Called with each durable batch's events, in order, before they are visible to reads.
pub type Sink = Arc<dyn Fn(&[Arc<Event>]) + Send + Sync>;

struct Shared {
    writer: Mutex<Writer>,
    /// Wakes the committer when a batch has been opened (or at shutdown).
    work: Condvar,
    /// Held while a batch's events are sent and `published` moves, so a new watch can read
    /// the revision and subscribe without a gap.
    publisher: Mutex<Publisher>,
    /// Signalled (with `publisher`) after each batch is published.
    durable: Condvar,
    /// The newest revision that is durable and published: what readers see.
    published: AtomicI64,
    readers: Mutex<Vec<Connection>>,
    source: Source,
    /// The WAL file, fsynced after every commit (SQLite itself syncs only at checkpoints).
    wal: Option<File>,
    commits: std::sync::atomic::AtomicU64,
    /// The revision history has been compacted up to.
    compacted: AtomicI64,
}

/// Cheap to clone; all clones share one writer connection, a pool of reader connections and
/// the committer thread, which ends when the last clone is dropped.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Owner>,
}

struct Owner {
    shared: Arc<Shared>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        lock(&self.shared.writer).shutdown = true;
        self.shared.work.notify_all();
    }
}

/// Wakes the committer when dropped.
struct Wake<'a>(&'a Condvar);

impl Drop for Wake<'_> {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock cannot leave SQLite half-written (transactions), so a
    // poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS log (
    rev INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    created INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    prev_rev INTEGER NOT NULL,
    create_rev INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS log_key_rev ON log(key, rev);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('compact_rev', 0);
";

/// Rows from this expression, selected with a `WHERE` on `l`, form an `Entry`.
const ENTRY_COLS: &str = "l.key, l.value, l.rev, l.create_rev";

fn entry(row: &rusqlite::Row) -> rusqlite::Result<Entry> {
    Ok(Entry {
        key: row.get(0)?,
        value: row.get(1)?,
        rev: row.get(2)?,
        create_rev: row.get(3)?,
    })
}

/// The smallest string greater than every string starting with `prefix`.
pub(crate) fn prefix_end(prefix: &str) -> String {
    // Keys are ASCII; U+10FFFF sorts after any of their bytes in SQLite's binary collation.
    format!("{prefix}\u{10FFFF}")
}

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        let source = Source::File(path.to_path_buf());
        let conn = source.open(false)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // SQLite syncs the WAL only at checkpoints (keeping the file consistent); every
        // commit is made durable by the committer's own fsync of the WAL before any writer
        // of it is answered, so kill -9 and power loss keep every acknowledged write.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        let wal_path = PathBuf::from(format!("{}-wal", path.display()));
        let wal = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&wal_path)
            .map_err(|e| StoreError::Sync(Arc::new(e)))?;
        Self::start(conn, source, Some(wal))
    }

    /// A store that lives in this process only (for tests): the same code paths, no fsync.
    pub fn open_in_memory() -> Result<Store> {
        let name = format!("file:/oxlet-store-{}?vfs=memdb", uuid::Uuid::new_v4());
        let source = Source::Memory(name);
        let conn = source.open(false)?;
        conn.execute_batch(SCHEMA)?;
        Self::start(conn, source, None)
    }

    fn start(conn: Connection, source: Source, wal: Option<File>) -> Result<Store> {
        let rev = current_rev(&conn)?;
        let compacted = compacted_rev(&conn)?;
        let (events, _) = broadcast::channel(WATCH_WINDOW);
        let shared = Arc::new(Shared {
            writer: Mutex::new(Writer {
                conn,
                batch: None,
                rev,
                broken: None,
                shutdown: false,
            }),
            work: Condvar::new(),
            publisher: Mutex::new(Publisher {
                events,
                sinks: Vec::new(),
            }),
            durable: Condvar::new(),
            published: AtomicI64::new(rev),
            readers: Mutex::new(Vec::new()),
            source,
            wal,
            commits: std::sync::atomic::AtomicU64::new(0),
            compacted: AtomicI64::new(compacted),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || committer(&s))
            .map_err(|e| StoreError::Sync(Arc::new(e)))?;
        Ok(Store {
            inner: Arc::new(Owner { shared }),
        })
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// Runs `f` in one read transaction (a consistent snapshot) on a reader connection.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let sh = self.shared();
        let pooled = lock(&sh.readers).pop();
        let conn = match pooled {
            Some(c) => c,
            None => sh.source.open(true)?,
        };
        conn.execute_batch("BEGIN")?;
        let out = f(&conn);
        let end = conn.execute_batch("COMMIT");
        if end.is_ok() {
            let mut pool = lock(&sh.readers);
            if pool.len() < IDLE_READERS {
                pool.push(conn);
            }
        }
        let out = out?;
        end?;
        Ok(out)
    }

    /// The newest durable revision (0 on an empty store): everything at or below it is
    /// visible to reads and has been sent to watchers.
    pub fn current_rev(&self) -> Result<i64> {
        Ok(self.shared().published.load(Ordering::Acquire))
    }

    /// Transactions committed since the store was opened (each one fsync).
    pub fn commits(&self) -> u64 {
        self.shared().commits.load(Ordering::Relaxed)
    }

    pub fn compacted_rev(&self) -> Result<i64> {
        Ok(self.shared().compacted.load(Ordering::Acquire))
    }

    pub fn get(&self, key: &str) -> Result<Entry> {
        let at = self.current_rev()?;
        self.read(|c| latest_at(c, key, at))?
            .ok_or(StoreError::NotFound)
    }

    /// Lists live keys under `prefix` in key order, at revision `at` (0: the newest), starting
    /// after key `after`, at most `limit` items (0: no limit).
    pub fn list(&self, prefix: &str, at: i64, after: Option<&str>, limit: usize) -> Result<Page> {
        let current = self.current_rev()?;
        let rev = if at == 0 { current } else { at };
        self.read(|conn| {
            let compacted = compacted_rev(conn)?;
            if at != 0 && at < compacted {
                return Err(StoreError::Gone {
                    requested: at,
                    compacted,
                });
            }
            let start = match after {
                Some(a) => format!("{a}\u{0}"),
                None => prefix.to_string(),
            };
            let end = prefix_end(prefix);
            // Keys with a version at or below `rev`, in order; for each the newest such row.
            let sql = format!(
                "SELECT {ENTRY_COLS}, l.deleted FROM log l JOIN (
                    SELECT key, MAX(rev) AS mr FROM log
                    WHERE key >= ?1 AND key < ?2 AND rev <= ?3 GROUP BY key
                 ) m ON l.rev = m.mr ORDER BY l.key"
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            let mut rows = stmt.query(params![start, end, rev])?;
            let mut items = Vec::new();
            let mut more_after = None;
            while let Some(row) = rows.next()? {
                if row.get::<_, i64>(4)? != 0 {
                    continue;
                }
                if limit > 0 && items.len() >= limit {
                    more_after = items.last().map(|e: &Entry| e.key.clone());
                    break;
                }
                items.push(entry(row)?);
            }
            drop(rows);
            let remaining = match &more_after {
                Some(last) => count_live(conn, &format!("{last}\u{0}"), &end, rev)?,
                None => 0,
            };
            Ok(Page {
                items,
                rev,
                more_after,
                remaining,
            })
        })
    }

    pub fn create(&self, key: &str, value: &[u8]) -> Result<Entry> {
        self.write(key, |cur| match cur {
            Some(_) => Err(StoreError::AlreadyExists),
            None => Ok(Decision::Put(value.to_vec())),
        })
        .map(|e| e.expect("create writes"))
    }

    /// Replaces the value when the current revision is `expected` (or any, when `None`).
    pub fn update(&self, key: &str, value: &[u8], expected: Option<i64>) -> Result<Entry> {
        self.write(key, |cur| match cur {
            None => Err(StoreError::NotFound),
            Some(c) if expected.is_some_and(|e| e != c.rev) => Err(StoreError::Conflict(c.rev)),
            Some(_) => Ok(Decision::Put(value.to_vec())),
        })
        .map(|e| e.expect("update writes"))
    }

    /// Deletes when the current revision is `expected` (or any). Returns the deleted entry,
    /// with the deletion's revision.
    pub fn delete(&self, key: &str, expected: Option<i64>) -> Result<Entry> {
        self.write(key, |cur| match cur {
            None => Err(StoreError::NotFound),
            Some(c) if expected.is_some_and(|e| e != c.rev) => Err(StoreError::Conflict(c.rev)),
            Some(_) => Ok(Decision::Delete),
        })
        .map(|e| e.expect("delete writes"))
    }

    /// Opens the current batch's transaction if none is open; fails when the store is broken
    /// or closing.
    fn begin(w: &mut Writer) -> Result<()> {
        if let Some(e) = &w.broken {
            return Err(StoreError::Sync(e.clone()));
        }
        if w.shutdown {
            return Err(StoreError::Closed);
        }
        if w.batch.is_none() {
            w.conn.execute_batch("BEGIN IMMEDIATE")?;
            w.batch = Some(Batch {
                events: Vec::new(),
                done: Arc::new(Done::default()),
            });
        }
        Ok(())
    }

    /// After a failed statement: when SQLite rolled the whole transaction back, every write
    /// staged in it fails.
    fn after_error(w: &mut Writer, e: rusqlite::Error) -> StoreError {
        if w.conn.is_autocommit() {
            let e = Arc::new(e);
            if let Some(b) = w.batch.take() {
                b.done.set(Err(StoreError::Commit(e.clone())));
            }
            w.rev = current_rev(&w.conn).unwrap_or(w.rev);
            return StoreError::Commit(e);
        }
        StoreError::Sql(e)
    }

    /// Reads the current entry, lets `decide` choose what to write, and writes it: a
    /// read-modify-write with no interleaving (the decision sees every earlier write, durable
    /// or still in the batch). Returns once the write is durable. `Ok(None)` when nothing
    /// was written.
    pub fn write<F, E>(&self, key: &str, decide: F) -> Result<Option<Entry>, E>
    where
        F: FnOnce(Option<&Entry>) -> Result<Decision, E>,
        E: From<StoreError>,
    {
        let sh = self.shared();
        let mut w = lock(&sh.writer);
        Self::begin(&mut w)?;
        // However this ends, the committer closes the batch (even one left empty) soon.
        let _wake = Wake(&sh.work);
        let cur = match latest(&w.conn, key) {
            Ok(c) => c,
            Err(StoreError::Sql(e)) => return Err(Self::after_error(&mut w, e).into()),
            Err(e) => return Err(e.into()),
        };
        let decision = match decide(cur.as_ref()) {
            Ok(d) => d,
            Err(e) => {
                // The refusal may rest on writes still in a batch (a conflict with a version
                // not yet durable): it is answered once those are visible, so the client's
                // next read sees what it was refused for.
                let seen = w.rev;
                drop(w);
                drop(_wake);
                self.wait_published(seen);
                return Err(e);
            }
        };
        let (kind, value, deleted) = match (&cur, decision) {
            (_, Decision::Keep) | (None, Decision::Delete) => return Ok(None),
            (None, Decision::Put(v)) => (EventKind::Added, v, 0),
            (Some(_), Decision::Put(v)) => (EventKind::Modified, v, 0),
            (Some(c), Decision::Delete) => (EventKind::Deleted, c.value.clone(), 1),
        };
        let rev = w.rev + 1;
        let create_rev = match (&cur, kind) {
            (Some(c), EventKind::Modified | EventKind::Deleted) => c.create_rev,
            _ => rev,
        };
        let prev_rev = cur.as_ref().map_or(0, |c| c.rev);
        if let Err(e) = insert(
            &w.conn,
            key,
            &value,
            (rev, create_rev),
            kind,
            deleted,
            prev_rev,
        ) {
            return Err(Self::after_error(&mut w, e).into());
        }
        w.rev = rev;
        let e = Entry {
            key: key.to_string(),
            value,
            rev,
            create_rev,
        };
        let prev = match kind {
            EventKind::Modified => cur.map(|c| c.value),
            _ => None,
        };
        let batch = w.batch.as_mut().expect("begun above");
        batch.events.push(Arc::new(Event {
            kind,
            entry: e.clone(),
            prev,
            memo: Memo::default(),
        }));
        let done = batch.done.clone();
        drop(w);
        sh.work.notify_one();
        done.wait()?;
        Ok(Some(e))
    }

    /// Waits until revision `rev` is durable and visible (or the store has failed).
    fn wait_published(&self, rev: i64) {
        let sh = self.shared();
        loop {
            if sh.published.load(Ordering::Acquire) >= rev || lock(&sh.writer).broken.is_some() {
                return;
            }
            let p = lock(&sh.publisher);
            if sh.published.load(Ordering::Acquire) < rev {
                let _ = sh
                    .durable
                    .wait_timeout(p, std::time::Duration::from_millis(100));
            }
        }
    }

    /// Registers `sink` for every durable batch from now on; returns the revision it starts
    /// after (the sink gets every event above it, and none at or below).
    pub fn on_commit(&self, sink: Sink) -> i64 {
        let mut p = lock(&self.shared().publisher);
        p.sinks.push(sink);
        self.shared().published.load(Ordering::Acquire)
    }

    /// Starts a watch of keys under `prefix` for changes after revision `after`.
    pub fn watch(&self, prefix: &str, after: i64) -> Result<Watch> {
        // Subscribing and reading the published revision under the publisher lock, then
        // reading the backlog up to that revision, leaves no gap and no duplicate between the
        // two: every later event arrives through the subscription.
        let (live, upto) = {
            let p = lock(&self.shared().publisher);
            (p.events.subscribe(), self.current_rev()?)
        };
        let backlog = self.history(prefix, after, upto)?;
        Ok(Watch {
            backlog,
            live,
            seen_rev: upto,
        })
    }

    /// The changes of keys under `prefix` with revisions in `(after, upto]`, from the log;
    /// `Gone` when `after` has been compacted.
    pub fn history(&self, prefix: &str, after: i64, upto: i64) -> Result<Vec<Event>> {
        self.read(|conn| {
            let compacted = compacted_rev(conn)?;
            if after < compacted {
                return Err(StoreError::Gone {
                    requested: after,
                    compacted,
                });
            }
            let sql = format!(
                "SELECT {ENTRY_COLS}, l.created, l.deleted, p.value FROM log l
                 LEFT JOIN log p ON p.rev = l.prev_rev
                 WHERE l.rev > ?1 AND l.rev <= ?4 AND l.key >= ?2 AND l.key < ?3 ORDER BY l.rev"
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            let mut rows = stmt.query(params![after, prefix, prefix_end(prefix), upto])?;
            let mut backlog = Vec::new();
            while let Some(row) = rows.next()? {
                let kind = if row.get::<_, i64>(5)? != 0 {
                    EventKind::Deleted
                } else if row.get::<_, i64>(4)? != 0 {
                    EventKind::Added
                } else {
                    EventKind::Modified
                };
                let prev = match kind {
                    EventKind::Modified => row.get(6)?,
                    _ => None,
                };
                backlog.push(Event {
                    kind,
                    entry: entry(row)?,
                    prev,
                    memo: Memo::default(),
                });
            }
            Ok(backlog)
        })
    }

    /// Removes history at or below `rev`: superseded versions and deletion records. Current
    /// values stay. Watches and lists from revisions below `rev` then get `Gone`.
    pub fn compact(&self, rev: i64) -> Result<usize> {
        let sh = self.shared();
        let mut w = lock(&sh.writer);
        Self::begin(&mut w)?;
        let rev = rev.min(self.current_rev()?);
        let run = |conn: &Connection| -> rusqlite::Result<usize> {
            let compacted: i64 = conn.query_row(
                "SELECT value FROM meta WHERE name = 'compact_rev'",
                [],
                |r| r.get(0),
            )?;
            if rev <= compacted {
                return Ok(0);
            }
            let n = conn.execute(
                "DELETE FROM log WHERE rev <= ?1 AND (deleted = 1 OR EXISTS (
                    SELECT 1 FROM log n WHERE n.key = log.key AND n.rev > log.rev AND n.rev <= ?1))",
                params![rev],
            )?;
            conn.execute(
                "UPDATE meta SET value = ?1 WHERE name = 'compact_rev'",
                params![rev],
            )?;
            Ok(n)
        };
        let n = match run(&w.conn) {
            Ok(n) => n,
            Err(e) => return Err(Self::after_error(&mut w, e)),
        };
        let done = w.batch.as_ref().expect("begun above").done.clone();
        drop(w);
        sh.work.notify_one();
        done.wait()?;
        if n > 0 || rev > sh.compacted.load(Ordering::Acquire) {
            sh.compacted.fetch_max(rev, Ordering::AcqRel);
        }
        Ok(n)
    }
}

/// Commits batches as they are staged; each commit's fsync runs outside the writer lock, so
/// the next batch fills meanwhile.
fn committer(sh: &Shared) {
    loop {
        let mut w = lock(&sh.writer);
        while w.batch.is_none() && !w.shutdown {
            w = sh.work.wait(w).unwrap_or_else(|e| e.into_inner());
        }
        let Some(batch) = w.batch.take() else {
            return;
        };
        if let Err(e) = w.conn.execute_batch("COMMIT") {
            let _ = w.conn.execute_batch("ROLLBACK");
            w.rev = current_rev(&w.conn).unwrap_or(w.rev);
            drop(w);
            tracing::error!("store commit: {e}");
            batch.done.set(Err(StoreError::Commit(Arc::new(e))));
            continue;
        }
        drop(w);
        sh.commits.fetch_add(1, Ordering::Relaxed);
        if let Some(wal) = &sh.wal {
            if let Err(e) = wal.sync_data() {
                // The batch may or may not be on disk; nothing more is acknowledged.
                tracing::error!("store: fsync of the log failed: {e}");
                let e = Arc::new(e);
                lock(&sh.writer).broken = Some(e.clone());
                batch.done.set(Err(StoreError::Sync(e)));
                continue;
            }
        }
        {
            let p = lock(&sh.publisher);
            if !batch.events.is_empty() {
                for sink in &p.sinks {
                    sink(&batch.events);
                }
            }
            if let Some(last) = batch.events.last() {
                sh.published.store(last.entry.rev, Ordering::Release);
            }
            for ev in batch.events {
                // No receivers is fine: nobody is watching.
                let _ = p.events.send(ev);
            }
            sh.durable.notify_all();
        }
        batch.done.set(Ok(()));
    }
}

/// Appends one row at revision `revs.0` for a key created at `revs.1`.
fn insert(
    tx: &Connection,
    key: &str,
    value: &[u8],
    revs: (i64, i64),
    kind: EventKind,
    deleted: i64,
    prev_rev: i64,
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO log (rev, key, value, created, deleted, prev_rev, create_rev)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    stmt.execute(params![
        revs.0,
        key,
        value,
        (kind == EventKind::Added) as i64,
        deleted,
        prev_rev,
        revs.1
    ])?;
    Ok(())
}

fn latest(conn: &Connection, key: &str) -> Result<Option<Entry>> {
    latest_at(conn, key, i64::MAX)
}

/// The key's newest version at or below revision `at`, unless that is a deletion.
fn latest_at(conn: &Connection, key: &str, at: i64) -> Result<Option<Entry>> {
    let sql = format!(
        "SELECT {ENTRY_COLS}, l.deleted FROM log l WHERE l.key = ?1 AND l.rev <= ?2
         ORDER BY l.rev DESC LIMIT 1"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let row = stmt
        .query_row(params![key, at], |r| Ok((entry(r)?, r.get::<_, i64>(4)?)))
        .optional()?;
    Ok(row.and_then(|(e, deleted)| (deleted == 0).then_some(e)))
}

/// Live keys in `[start, end)` at revision `at`, counted without reading their values.
fn count_live(conn: &Connection, start: &str, end: &str, at: i64) -> Result<i64> {
    let mut stmt = conn.prepare_cached(
        "SELECT COUNT(*) FROM log l JOIN (
            SELECT key, MAX(rev) AS mr FROM log
            WHERE key >= ?1 AND key < ?2 AND rev <= ?3 GROUP BY key
         ) m ON l.rev = m.mr WHERE l.deleted = 0",
    )?;
    Ok(stmt.query_row(params![start, end, at], |r| r.get(0))?)
}

fn current_rev(conn: &Connection) -> Result<i64> {
    // AUTOINCREMENT keeps the counter in sqlite_sequence even after compaction removed the
    // newest rows, so revisions are never reused.
    let seq: Option<i64> = conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'log'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(seq.unwrap_or(0))
}

fn compacted_rev(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row(
        "SELECT value FROM meta WHERE name = 'compact_rev'",
        [],
        |r| r.get(0),
    )?)
}

#[cfg(test)]
mod tests;
