//! The embedded object store: a revision log in SQLite, in the manner of k3s's kine.
//!
//! Every write appends one row; the row's `rev` is the global revision and becomes the object's
//! resourceVersion. The current state of a key is its newest row, unless that row is a deletion.
//! Old rows are removed by compaction; reads or watches below the compacted revision get `Gone`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};
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

struct Inner {
    conn: Connection,
    events: broadcast::Sender<Arc<Event>>,
}

/// Cheap to clone; all clones share one connection. Writes are serialised by the mutex, which
/// also orders broadcasts so watchers see revisions in order.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Mutex<Inner>>,
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
fn prefix_end(prefix: &str) -> String {
    // Keys are ASCII; U+10FFFF sorts after any of their bytes in SQLite's binary collation.
    format!("{prefix}\u{10FFFF}")
}

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path)?;
        // WAL with FULL sync: a commit is on disk before we acknowledge it, so kill -9 and
        // power loss keep every acknowledged write.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self::from_conn(conn))
    }

    pub fn open_in_memory() -> Result<Store> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self::from_conn(conn))
    }

    fn from_conn(conn: Connection) -> Store {
        let (events, _) = broadcast::channel(4096);
        Store {
            inner: Arc::new(Mutex::new(Inner { conn, events })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions), so
        // a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest revision written (0 on an empty store).
    pub fn current_rev(&self) -> Result<i64> {
        current_rev(&self.lock().conn)
    }

    pub fn compacted_rev(&self) -> Result<i64> {
        compacted_rev(&self.lock().conn)
    }

    pub fn get(&self, key: &str) -> Result<Entry> {
        latest(&self.lock().conn, key)?.ok_or(StoreError::NotFound)
    }

    /// Lists live keys under `prefix` in key order, at revision `at` (0: the newest), starting
    /// after key `after`, at most `limit` items (0: no limit).
    pub fn list(&self, prefix: &str, at: i64, after: Option<&str>, limit: usize) -> Result<Page> {
        let inner = self.lock();
        let conn = &inner.conn;
        let current = current_rev(conn)?;
        let rev = if at == 0 { current } else { at };
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
        let sql = format!(
            "SELECT {ENTRY_COLS} FROM log l JOIN (
                SELECT key, MAX(rev) AS mr FROM log
                WHERE key >= ?1 AND key < ?2 AND rev <= ?3 GROUP BY key
             ) m ON l.rev = m.mr WHERE l.deleted = 0 ORDER BY l.key"
        );
        let mut stmt = conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(params![start, end, rev])?;
        let mut items = Vec::new();
        let mut remaining = 0i64;
        while let Some(row) = rows.next()? {
            if limit > 0 && items.len() >= limit {
                remaining += 1;
                continue;
            }
            items.push(entry(row)?);
        }
        let more_after = if remaining > 0 {
            items.last().map(|e| e.key.clone())
        } else {
            None
        };
        Ok(Page {
            items,
            rev,
            more_after,
            remaining,
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

    /// Reads the current entry, lets `decide` choose what to write, and writes it, all under
    /// the store lock: a read-modify-write with no interleaving. `Ok(None)` when nothing was
    /// written.
    pub fn write<F, E>(&self, key: &str, decide: F) -> Result<Option<Entry>, E>
    where
        F: FnOnce(Option<&Entry>) -> Result<Decision, E>,
        E: From<StoreError>,
    {
        let mut inner = self.lock();
        let tx = inner.conn.transaction().map_err(StoreError::from)?;
        let cur = latest(&tx, key)?;
        let (kind, value, deleted) = match (&cur, decide(cur.as_ref())?) {
            (_, Decision::Keep) | (None, Decision::Delete) => return Ok(None),
            (None, Decision::Put(v)) => (EventKind::Added, v, 0),
            (Some(_), Decision::Put(v)) => (EventKind::Modified, v, 0),
            (Some(c), Decision::Delete) => (EventKind::Deleted, c.value.clone(), 1),
        };
        let prev_rev = cur.as_ref().map_or(0, |c| c.rev);
        let rev = insert(&tx, key, &value, kind, deleted, prev_rev, cur.as_ref())?;
        tx.commit().map_err(StoreError::from)?;
        let e = Entry {
            key: key.to_string(),
            value,
            rev: rev.0,
            create_rev: rev.1,
        };
        // No receivers is fine: nobody is watching.
        let prev = match kind {
            EventKind::Modified => cur.map(|c| c.value),
            _ => None,
        };
        let _ = inner.events.send(Arc::new(Event {
            kind,
            entry: e.clone(),
            prev,
        }));
        Ok(Some(e))
    }

    /// Starts a watch of keys under `prefix` for changes after revision `after`.
    pub fn watch(&self, prefix: &str, after: i64) -> Result<Watch> {
        let inner = self.lock();
        let conn = &inner.conn;
        let compacted = compacted_rev(conn)?;
        if after < compacted {
            return Err(StoreError::Gone {
                requested: after,
                compacted,
            });
        }
        // Subscribing under the lock, after reading the backlog under the same lock, leaves
        // no gap and no duplicate between the two.
        let live = inner.events.subscribe();
        let sql = format!(
            "SELECT {ENTRY_COLS}, l.created, l.deleted, p.value FROM log l
             LEFT JOIN log p ON p.rev = l.prev_rev
             WHERE l.rev > ?1 AND l.key >= ?2 AND l.key < ?3 ORDER BY l.rev"
        );
        let mut stmt = conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(params![after, prefix, prefix_end(prefix)])?;
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
            });
        }
        Ok(Watch {
            backlog,
            live,
            seen_rev: current_rev(conn)?,
        })
    }

    /// Removes history at or below `rev`: superseded versions and deletion records. Current
    /// values stay. Watches and lists from revisions below `rev` then get `Gone`.
    pub fn compact(&self, rev: i64) -> Result<usize> {
        let mut inner = self.lock();
        let tx = inner.conn.transaction()?;
        let rev = rev.min(current_rev(&tx)?);
        if rev <= compacted_rev(&tx)? {
            return Ok(0);
        }
        let n = tx.execute(
            "DELETE FROM log WHERE rev <= ?1 AND (deleted = 1 OR EXISTS (
                SELECT 1 FROM log n WHERE n.key = log.key AND n.rev > log.rev AND n.rev <= ?1))",
            params![rev],
        )?;
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE name = 'compact_rev'",
            params![rev],
        )?;
        tx.commit()?;
        Ok(n)
    }
}

/// Appends one row; returns its revision and the key's create revision.
fn insert(
    tx: &Connection,
    key: &str,
    value: &[u8],
    kind: EventKind,
    deleted: i64,
    prev_rev: i64,
    cur: Option<&Entry>,
) -> Result<(i64, i64)> {
    tx.execute(
        "INSERT INTO log (key, value, created, deleted, prev_rev, create_rev)
         VALUES (?1, ?2, ?3, ?4, ?5, 0)",
        params![
            key,
            value,
            (kind == EventKind::Added) as i64,
            deleted,
            prev_rev
        ],
    )?;
    let rev = tx.last_insert_rowid();
    let create_rev = match (cur, kind) {
        (Some(c), EventKind::Modified | EventKind::Deleted) => c.create_rev,
        _ => rev,
    };
    tx.execute(
        "UPDATE log SET create_rev = ?1 WHERE rev = ?2",
        params![create_rev, rev],
    )?;
    Ok((rev, create_rev))
}

fn latest(conn: &Connection, key: &str) -> Result<Option<Entry>> {
    let sql = format!(
        "SELECT {ENTRY_COLS}, l.deleted FROM log l WHERE l.key = ?1 ORDER BY l.rev DESC LIMIT 1"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let row = stmt
        .query_row(params![key], |r| Ok((entry(r)?, r.get::<_, i64>(4)?)))
        .optional()?;
    Ok(row.and_then(|(e, deleted)| (deleted == 0).then_some(e)))
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
