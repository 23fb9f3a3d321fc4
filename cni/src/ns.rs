//! Network namespaces: work in a pod's netns from a dedicated std thread, never a tokio worker.

use nix::sched::{setns, CloneFlags};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::proto::Connection;
use rtnetlink::Handle;
use std::fs::File;
use std::io;
use std::path::Path;

/// Opens a netns file (`/run/netns/x`, `/proc/PID/ns/net`).
pub fn open(path: impl AsRef<Path>) -> io::Result<File> {
    File::open(path)
}

/// Runs `f` on a fresh std thread that entered `netns` first; the thread ends with `f`.
pub fn run_in<T: Send>(netns: &File, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(netns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
    })
}

/// A route-netlink connection whose socket lives in `netns`, registered with the runtime `rt`.
/// The caller spawns the connection future on that runtime.
pub fn connect_in(
    netns: &File,
    rt: &tokio::runtime::Handle,
) -> io::Result<(Connection<RouteNetlinkMessage>, Handle)> {
    run_in(netns, || {
        let _guard = rt.enter();
        rtnetlink::new_connection().map(|(c, h, _)| (c, h))
    })?
}

/// [`connect_in`] on a thread started now, so its start overlaps other work; join it later.
pub fn spawn_connect_in(
    netns: File,
    rt: tokio::runtime::Handle,
) -> std::thread::JoinHandle<io::Result<(Connection<RouteNetlinkMessage>, Handle)>> {
    std::thread::spawn(move || {
        setns(&netns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let _guard = rt.enter();
        rtnetlink::new_connection().map(|(c, h, _)| (c, h))
    })
}
