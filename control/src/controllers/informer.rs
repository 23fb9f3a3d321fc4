//! Shared caches of one kind each (kube-runtime reflectors) that tell subscribers which objects
//! changed, so every controller in the process reads from one watch per kind.

use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Resource;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::warn;

type Subscribers<K> = Arc<Mutex<Vec<mpsc::UnboundedSender<Arc<K>>>>>;

/// A watched kind: its cache and the subscribers told of every applied or deleted object.
pub struct Informer<K: Resource<DynamicType = ()> + 'static> {
    store: Store<K>,
    subs: Subscribers<K>,
    /// True once the first list is in the store. kube's `Store::wait_until_ready` wakes only
    /// the last of several concurrent waiters (one oneshot waker), so readiness is kept here.
    ready: tokio::sync::watch::Receiver<bool>,
}

impl<K: Resource<DynamicType = ()> + 'static> Clone for Informer<K> {
    fn clone(&self) -> Self {
        Informer {
            store: self.store.clone(),
            subs: self.subs.clone(),
            ready: self.ready.clone(),
        }
    }
}

impl<K> Informer<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    /// Starts the watch on `tasks`; the cache fills in the background.
    pub fn start(tasks: &mut JoinSet<()>, api: Api<K>, cfg: watcher::Config) -> Self {
        let (store, mut writer) = reflector::store();
        let subs: Subscribers<K> = Arc::default();
        let (ready_tx, ready) = tokio::sync::watch::channel(false);
        let inf = Informer {
            store: store.clone(),
            subs: subs.clone(),
            ready,
        };
        tasks.spawn(async move {
            let mut events = watcher::watcher(api, cfg).default_backoff().boxed();
            // Objects before a relist, to tell of those that went away while the watch was down.
            let mut before: Vec<Arc<K>> = Vec::new();
            let mut relisted: Vec<Arc<K>> = Vec::new();
            while let Some(ev) = events.next().await {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => {
                        warn!(kind = %K::kind(&()), "watch: {e}");
                        continue;
                    }
                };
                if matches!(ev, Event::Init) {
                    before = store.state();
                }
                writer.apply_watcher_event(&ev);
                match ev {
                    Event::Apply(o) | Event::Delete(o) => notify(&subs, &[Arc::new(o)]),
                    Event::Init => relisted.clear(),
                    Event::InitApply(o) => relisted.push(Arc::new(o)),
                    Event::InitDone => {
                        let gone: Vec<Arc<K>> = before
                            .drain(..)
                            .filter(|o| store.get(&ObjectRef::from_obj(o.as_ref())).is_none())
                            .collect();
                        notify(&subs, &gone);
                        notify(&subs, &std::mem::take(&mut relisted));
                        ready_tx.send_replace(true);
                    }
                }
            }
        });
        inf
    }
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> Informer<K> {
    pub fn store(&self) -> &Store<K> {
        &self.store
    }

    /// Every object applied or deleted from now on (and all of them after each relist).
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<Arc<K>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.subs.lock().expect("subscribers lock").push(tx);
        rx
    }

    pub async fn ready(&self) {
        let _ = self.ready.clone().wait_for(|r| *r).await;
    }

    /// The cached objects of one namespace.
    pub fn in_namespace(&self, ns: &str) -> Vec<Arc<K>> {
        self.store
            .state()
            .into_iter()
            .filter(|o| o.meta().namespace.as_deref() == Some(ns))
            .collect()
    }

    pub fn get(&self, ns: Option<&str>, name: &str) -> Option<Arc<K>> {
        let mut r = ObjectRef::new(name);
        if let Some(ns) = ns {
            r = r.within(ns);
        }
        self.store.get(&r)
    }
}

fn notify<K>(subs: &Subscribers<K>, objs: &[Arc<K>]) {
    if objs.is_empty() {
        return;
    }
    let mut subs = subs.lock().expect("subscribers lock");
    subs.retain(|tx| objs.iter().all(|o| tx.send(o.clone()).is_ok()));
}
