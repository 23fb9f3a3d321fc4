//! Names outside the cluster go to the node's upstream resolvers, over UDP, and over TCP when
//! the UDP answer is truncated.
//!
//! Loop guard, in two steps: an upstream that is one of this server's own addresses is never
//! used; and before the first name is forwarded, every upstream gets a probe query of a random
//! name (as CoreDNS's `loop` plugin does): an upstream that sends it back here forwards to this
//! server, and is dropped. Nothing goes upstream until a query needs it.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hickory_net::client::{Client, ClientHandle};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::tcp::TcpClientStream;
use hickory_net::udp::UdpClientStream;
use hickory_server::proto::op::{Message, Query};
use hickory_server::proto::rr::{DNSClass, Name, RecordType};
use rand::Rng;
use tokio::sync::OnceCell;
use tracing::{debug, error, warn};

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolver to forward to")]
    NoUpstream,
    #[error("upstream {addr}: {source}")]
    Upstream {
        addr: SocketAddr,
        #[source]
        source: hickory_net::NetError,
    },
    #[error("upstream {0} did not answer in time")]
    Timeout(SocketAddr),
}

struct Upstream {
    addr: SocketAddr,
    /// The name of the loop probe sent to it.
    probe: Name,
    looped: AtomicBool,
    udp: Mutex<Option<Client<TokioRuntimeProvider>>>,
}

pub struct Forwarder {
    upstreams: Vec<Upstream>,
    timeout: Duration,
    probed: OnceCell<()>,
}

impl Forwarder {
    /// Upstreams `upstreams` less those that are this server: `listen` (the addresses it is
    /// bound to) and `own` (addresses that lead here, on port 53).
    pub fn new(
        upstreams: &[SocketAddr],
        listen: &[SocketAddr],
        own: &[IpAddr],
        timeout: Duration,
    ) -> Forwarder {
        let is_self = |u: &SocketAddr| {
            listen.iter().any(|l| {
                l.port() == u.port()
                    && (l.ip() == u.ip() || (l.ip().is_unspecified() && u.ip().is_loopback()))
            }) || (u.port() == 53 && own.contains(&u.ip()))
        };
        let mut rng = rand::thread_rng();
        let upstreams = upstreams
            .iter()
            .filter(|u| {
                let me = is_self(u);
                if me {
                    error!(upstream = %u, "upstream resolver is this server itself; not forwarding to it");
                }
                !me
            })
            .map(|addr| Upstream {
                addr: *addr,
                probe: Name::from_ascii(format!(
                    "{}.{}.loop-probe.oxlet.invalid.",
                    rng.gen::<u64>(),
                    rng.gen::<u64>()
                ))
                .expect("probe name is valid"),
                looped: AtomicBool::new(false),
                udp: Mutex::new(None),
            })
            .collect();
        Forwarder {
            upstreams,
            timeout,
            probed: OnceCell::new(),
        }
    }

    /// The upstreams in use (after the loop guard).
    pub fn upstreams(&self) -> Vec<SocketAddr> {
        self.upstreams
            .iter()
            .filter(|u| !u.looped.load(Ordering::Relaxed))
            .map(|u| u.addr)
            .collect()
    }

    /// Whether `name` is the loop probe of an upstream; that upstream then is dropped.
    pub fn is_probe(&self, name: &Name) -> bool {
        let Some(u) = self.upstreams.iter().find(|u| u.probe == *name) else {
            return false;
        };
        if !u.looped.swap(true, Ordering::Relaxed) {
            error!(upstream = %u.addr, "forwarding loop: the upstream resolver sends queries back to this server; not forwarding to it");
        }
        true
    }

    /// Sends each upstream its probe, once; the probe that comes back marks its upstream.
    async fn probe_loops(&self) {
        let probes = self.upstreams.iter().map(|u| async move {
            let q = Query::query(u.probe.clone(), RecordType::HINFO);
            if let Err(e) = self.exchange(u, q).await {
                debug!(upstream = %u.addr, error = %e, "loop probe");
            }
        });
        futures_util::future::join_all(probes).await;
    }

    /// The answer of the first upstream that gives one.
    pub async fn forward(&self, query: Query) -> Result<Message, ForwardError> {
        self.probed.get_or_init(|| self.probe_loops()).await;
        let mut last = ForwardError::NoUpstream;
        for u in &self.upstreams {
            if u.looped.load(Ordering::Relaxed) {
                continue;
            }
            match self.exchange(u, query.clone()).await {
                Ok(m) => return Ok(m),
                Err(e) => {
                    warn!(error = %e, "forward {} {}", query.name(), query.query_type());
                    last = e;
                }
            }
        }
        Err(last)
    }

    async fn exchange(&self, u: &Upstream, query: Query) -> Result<Message, ForwardError> {
        let mut client = {
            let mut slot = u.udp.lock().expect("client lock");
            match slot.as_ref() {
                Some(c) => c.clone(),
                None => {
                    let stream = UdpClientStream::builder(u.addr, TokioRuntimeProvider::default())
                        .with_timeout(Some(self.timeout))
                        .build();
                    let (c, bg) = Client::<TokioRuntimeProvider>::from_sender(stream);
                    tokio::spawn(bg);
                    *slot = Some(c.clone());
                    c
                }
            }
        };
        let name = query.name().clone();
        let qtype = query.query_type();
        let res = tokio::time::timeout(
            self.timeout,
            client.query(name.clone(), DNSClass::IN, qtype),
        )
        .await
        .map_err(|_| ForwardError::Timeout(u.addr))?;
        let msg = match res {
            Ok(r) => r.into_message(),
            Err(source) => {
                // A broken client is made anew on the next query.
                *u.udp.lock().expect("client lock") = None;
                return Err(ForwardError::Upstream {
                    addr: u.addr,
                    source,
                });
            }
        };
        if !msg.metadata.truncation {
            return Ok(msg);
        }
        let (connect, handle) = TcpClientStream::new(
            u.addr,
            None,
            Some(self.timeout),
            TokioRuntimeProvider::default(),
        );
        let tcp = async {
            let stream = connect.await?;
            let (mut c, bg) = Client::<TokioRuntimeProvider>::new(stream, handle);
            tokio::spawn(bg);
            c.query(name, DNSClass::IN, qtype).await
        };
        match tokio::time::timeout(self.timeout, tcp).await {
            Ok(Ok(r)) => Ok(r.into_message()),
            Ok(Err(source)) => Err(ForwardError::Upstream {
                addr: u.addr,
                source,
            }),
            Err(_) => Err(ForwardError::Timeout(u.addr)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_addresses_are_not_upstreams() {
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let f = Forwarder::new(
            &[
                sa("192.0.2.2:53"),
                sa("10.96.0.10:53"),
                sa("127.0.0.1:5353"),
                sa("127.0.0.1:53"),
                sa("198.51.100.1:53"),
            ],
            &[sa("192.0.2.2:53"), sa("0.0.0.0:5353")],
            &["10.96.0.10".parse().unwrap()],
            Duration::from_secs(1),
        );
        assert_eq!(
            f.upstreams(),
            vec![sa("127.0.0.1:53"), sa("198.51.100.1:53")]
        );
    }
}
