//! A work queue as client-go's: a key waits at most once, is never worked on by two workers at
//! once, and failures back off per key (5 ms doubling to a cap).

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;

/// What a reconcile asks of the queue afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing until something changes.
    Done,
    /// Look again after this long (a deadline, minReadySeconds, expectations).
    After(Duration),
}

struct Inner<T> {
    queue: VecDeque<T>,
    dirty: HashSet<T>,
    processing: HashSet<T>,
    failures: HashMap<T, u32>,
}

pub struct Queue<T> {
    inner: Mutex<Inner<T>>,
    ready: Notify,
    max_backoff: Duration,
}

impl<T: Hash + Eq + Clone + Send + Sync + std::fmt::Debug + 'static> Queue<T> {
    pub fn new(max_backoff: Duration) -> Arc<Self> {
        Arc::new(Queue {
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                dirty: HashSet::new(),
                processing: HashSet::new(),
                failures: HashMap::new(),
            }),
            ready: Notify::new(),
            max_backoff,
        })
    }

    pub fn add(&self, item: T) {
        let mut q = self.inner.lock().expect("queue lock");
        if !q.dirty.insert(item.clone()) {
            return;
        }
        if !q.processing.contains(&item) {
            q.queue.push_back(item);
            drop(q);
            self.ready.notify_one();
        }
    }

    pub fn add_after(self: &Arc<Self>, item: T, after: Duration) {
        if after.is_zero() {
            return self.add(item);
        }
        let q = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Some(q) = q.upgrade() {
                q.add(item);
            }
        });
    }

    async fn get(&self) -> T {
        loop {
            let notified = self.ready.notified();
            {
                let mut q = self.inner.lock().expect("queue lock");
                if let Some(item) = q.queue.pop_front() {
                    q.dirty.remove(&item);
                    q.processing.insert(item.clone());
                    if !q.queue.is_empty() {
                        self.ready.notify_one();
                    }
                    return item;
                }
            }
            notified.await;
        }
    }

    fn done(&self, item: &T) {
        let mut q = self.inner.lock().expect("queue lock");
        q.processing.remove(item);
        if q.dirty.contains(item) {
            q.queue.push_back(item.clone());
            drop(q);
            self.ready.notify_one();
        }
    }

    /// The delay before retrying `item` after one more failure.
    fn failed(&self, item: &T) -> Duration {
        let mut q = self.inner.lock().expect("queue lock");
        let n = q.failures.entry(item.clone()).or_insert(0);
        *n += 1;
        let d = Duration::from_millis(5).saturating_mul(1u32 << (*n - 1).min(20));
        d.min(self.max_backoff)
    }

    fn forget(&self, item: &T) {
        self.inner.lock().expect("queue lock").failures.remove(item);
    }

    /// Runs `workers` workers calling `reconcile` for each key taken from the queue.
    pub fn run<F, Fut, E>(self: &Arc<Self>, tasks: &mut JoinSet<()>, workers: usize, reconcile: F)
    where
        F: Fn(T) -> Fut + Send + Sync + Clone + 'static,
        Fut: Future<Output = Result<Action, E>> + Send,
        E: std::fmt::Display,
    {
        for _ in 0..workers {
            let (q, reconcile) = (self.clone(), reconcile.clone());
            tasks.spawn(async move {
                loop {
                    let item = q.get().await;
                    match reconcile(item.clone()).await {
                        Ok(action) => {
                            q.forget(&item);
                            if let Action::After(d) = action {
                                q.add_after(item.clone(), d);
                            }
                        }
                        Err(e) => {
                            let d = q.failed(&item);
                            tracing::info!(key = ?item, retry_in = ?d, "reconcile: {e}");
                            q.add_after(item.clone(), d);
                        }
                    }
                    q.done(&item);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_waits_once_and_backs_off() {
        let q = Queue::<&str>::new(Duration::from_millis(40));
        q.add("a");
        q.add("a");
        q.add("b");
        assert_eq!(q.get().await, "a");
        q.add("a"); // while processing: comes back once done
        assert_eq!(q.get().await, "b");
        q.done(&"a");
        assert_eq!(q.get().await, "a");
        assert_eq!(q.failed(&"a"), Duration::from_millis(5));
        assert_eq!(q.failed(&"a"), Duration::from_millis(10));
        for _ in 0..10 {
            q.failed(&"a");
        }
        assert_eq!(q.failed(&"a"), Duration::from_millis(40));
        q.forget(&"a");
        assert_eq!(q.failed(&"a"), Duration::from_millis(5));
    }
}
