//! The HTTPS API server: TLS with client-certificate authentication, routing of the API paths.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{header, Method, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::certs::{self, Identity, Pki};
use crate::http::{self, Body};
use crate::registry::Registry;
use crate::rest::{self, Call};
use crate::status::ApiError;
use crate::store::Store;
use crate::{authz, discovery, openapi, resources, watch, Error};

/// How `oxlet up` runs the control plane.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Where the admin kubeconfig is written.
    pub kubeconfig: PathBuf,
    /// Run the controllers and the scheduler (off: the API server alone).
    pub controllers: bool,
    pub controller_cfg: crate::controllers::Config,
    /// Audiences a service account token must name to be accepted (`--api-audiences`; the
    /// issuer when empty).
    pub api_audiences: Vec<String>,
    /// The longest validity of an issued service account token
    /// (`--service-account-max-token-expiration`; none: as asked).
    pub service_account_max_token_expiration: Option<Duration>,
    /// How long the revision log keeps history: a watch may resume from any revision written
    /// within it (5 minutes, as kube-apiserver's etcd compaction).
    pub keep_revisions_for: Duration,
    /// How often history older than that is removed.
    pub compact_every: Duration,
}

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            data_dir: data_dir.into(),
            listen: SocketAddr::from(([0, 0, 0, 0], 6443)),
            kubeconfig: PathBuf::from("/etc/oxlet/admin.kubeconfig"),
            controllers: true,
            controller_cfg: crate::controllers::Config::default(),
            api_audiences: Vec::new(),
            service_account_max_token_expiration: None,
            keep_revisions_for: Duration::from_secs(300),
            compact_every: Duration::from_secs(60),
        }
    }
}

/// A request body the server reads: a network connection's, or an in-process client's.
pub(crate) trait RequestBody:
    hyper::body::Body<Data = bytes::Bytes, Error: Into<http::BoxError>> + Send + Unpin + 'static
{
    /// The network body, for what is proxied with upgrades (exec, attach, port-forward).
    fn into_incoming(self) -> Option<Incoming>;
}

impl RequestBody for Incoming {
    fn into_incoming(self) -> Option<Incoming> {
        Some(self)
    }
}

impl RequestBody for kube::client::Body {
    fn into_incoming(self) -> Option<Incoming> {
        None
    }
}

struct State {
    reg: Registry,
    server_url: String,
    kubelet_tls: Arc<tokio_rustls::rustls::ClientConfig>,
    signer: Arc<crate::tokens::Signer>,
    rbac: authz::Rbac,
}

/// A running server; dropping it does not stop it, `stop` does.
pub struct Server {
    pub addr: SocketAddr,
    pub kubeconfig: PathBuf,
    pub registry: Registry,
    state: Arc<State>,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    /// A client that calls this server in-process (no TCP, no TLS) as `id`: authorization
    /// applies exactly as to the same identity over the network.
    pub fn client(&self, id: Identity) -> kube::Client {
        client(self.state.clone(), id)
    }

    pub fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Opens the store, ensures certificates and kubeconfigs, binds and serves in the background.
pub async fn start(cfg: Config) -> Result<Server, Error> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| Error::Io {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let store = Store::open(&cfg.data_dir.join("state.db"))?;
    let reg = Registry::new(store);
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| Error::Io {
            path: PathBuf::from(cfg.listen.to_string()),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| Error::Io {
        path: PathBuf::from(cfg.listen.to_string()),
        source,
    })?;
    let host = hostname();
    let mut sans: Vec<String> = [
        "127.0.0.1",
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "10.96.0.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sans.push(host.clone());
    if addr.ip().is_unspecified() {
        // Nodes on other machines reach the server by one of this machine's addresses.
        sans.extend(certs::host_addresses());
    } else {
        sans.push(addr.ip().to_string());
    }
    let pki = Pki::new(&cfg.data_dir);
    pki.ensure(&sans)?;
    if !pki.dir.join("node.crt").exists() {
        pki.issue_node("node", &host)?;
    }
    crate::namespaces::bootstrap(&reg).await?;
    crate::rbac_bootstrap::reconcile(&reg).await?;
    let rbac = authz::Rbac::start(&reg).await?;
    if let Some(ip) = crate::namespaces::advertise_address(addr) {
        crate::namespaces::kubernetes_endpoints(&reg, ip, addr.port()).await?;
    }
    let ca_pem = pki.ca_pem()?;
    for ns in crate::namespaces::BUILTIN {
        crate::namespaces::populate(&reg, ns, &ca_pem).await;
    }
    let url_ip = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        addr.ip().to_string()
    };
    let server_url = format!("https://{url_ip}:{}", addr.port());
    pki.write_kubeconfig("admin", "admin", &server_url, &cfg.kubeconfig)?;
    pki.write_kubeconfig(
        "node",
        &format!("{}{host}", certs::NODE_USER_PREFIX),
        &server_url,
        &cfg.data_dir.join("node.kubeconfig"),
    )?;
    let acceptor = TlsAcceptor::from(pki.server_config()?);
    let state = Arc::new(State {
        reg: reg.clone(),
        server_url,
        kubelet_tls: certs::kubelet_client_config(&pki)?,
        signer: Arc::new(
            crate::tokens::Signer::load_or_create(&pki.dir, cfg.api_audiences.clone())?
                .with_max_expiration(
                    cfg.service_account_max_token_expiration
                        .map(|d| d.as_secs() as i64),
                ),
        ),
        rbac,
    });
    info!(%addr, kubeconfig = %cfg.kubeconfig.display(), "API server listening");
    let serve = tokio::spawn(accept_loop(listener, acceptor, state.clone()));
    let ns = tokio::spawn(crate::namespaces::run(reg.clone(), ca_pem));
    let gc = tokio::spawn(crate::gc::run(reg.clone()));
    let compact = tokio::spawn(compactor(
        reg.store.clone(),
        cfg.keep_revisions_for,
        cfg.compact_every,
    ));
    let mut tasks = vec![serve, ns, gc, compact];
    if cfg.controllers {
        let cm = client(
            state.clone(),
            Identity::component("system:kube-controller-manager"),
        );
        let mut watches = tokio::task::JoinSet::new();
        let shared = crate::controllers::Shared::start(&mut watches, &cm);
        tasks.push(tokio::spawn(async move {
            while watches.join_next().await.is_some() {}
        }));
        tasks.push(tokio::spawn(crate::controllers::run(
            cm,
            cfg.controller_cfg.clone(),
            shared.clone(),
        )));
        let sched = client(state.clone(), Identity::component("system:kube-scheduler"));
        tasks.push(tokio::spawn(crate::scheduler::run(sched, shared)));
    }
    Ok(Server {
        addr,
        kubeconfig: cfg.kubeconfig,
        registry: reg,
        state,
        tasks,
    })
}

/// Removes history older than `keep_for`: the revision current `keep_for` ago (sampled every
/// `every`) becomes the compacted one.
async fn compactor(store: Store, keep_for: Duration, every: Duration) {
    let mut samples: std::collections::VecDeque<(tokio::time::Instant, i64)> =
        std::collections::VecDeque::new();
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let now = tokio::time::Instant::now();
        if let Ok(rev) = store.current_rev() {
            samples.push_back((now, rev));
        }
        let mut upto = None;
        while let Some(&(t, rev)) = samples.front() {
            if now.duration_since(t) < keep_for {
                break;
            }
            upto = Some(rev);
            samples.pop_front();
        }
        let Some(rev) = upto else {
            continue;
        };
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.compact(rev)).await {
            Ok(Ok(n)) if n > 0 => debug!(removed = n, rev, "compacted"),
            Ok(Err(e)) => warn!("compaction: {e}"),
            _ => {}
        }
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, state: Arc<State>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    debug!(%peer, "TLS handshake: {e}");
                    return;
                }
            };
            let id = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| certs::identity(c));
            let svc = hyper::service::service_fn(move |req| {
                let (state, id) = (state.clone(), id.clone());
                async move { Ok::<_, Infallible>(route(&state, id.as_ref(), req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                .await
            {
                debug!(%peer, "connection: {e}");
            }
        });
    }
}

fn client(state: Arc<State>, id: Identity) -> kube::Client {
    let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
        let (state, id) = (state.clone(), id.clone());
        async move { Ok::<_, Infallible>(route(&state, Some(&id), req).await) }
    });
    kube::Client::new(svc, "default")
}

fn version() -> serde_json::Value {
    json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-oxlet", "gitCommit": "", "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z", "goVersion": "", "compiler": "rustc", "platform": "linux/amd64"})
}

async fn route<B: RequestBody>(
    state: &State,
    id: Option<&Identity>,
    req: Request<B>,
) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = match dispatch(state, id, req).await {
        Ok(r) => r,
        Err(e) => http::error_response(&e),
    };
    debug!(%method, path, status = resp.status().as_u16(), user = id.map(|i| i.user.as_str()), "request");
    resp
}

async fn dispatch<B: RequestBody>(
    state: &State,
    id: Option<&Identity>,
    req: Request<B>,
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let public = matches!(
        segs.as_slice(),
        ["healthz" | "livez" | "readyz" | "version", ..]
    );
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let token_id;
    let id = match (id, bearer) {
        (Some(id), _) => Some(id),
        (None, Some(t)) => {
            token_id = crate::tokens::authenticate(&state.reg, &state.signer, t);
            if token_id.is_none() {
                // A bad credential is refused even where anonymous access is allowed.
                return Err(ApiError::unauthorized());
            }
            token_id.as_ref()
        }
        (None, None) => None,
    };
    if id.is_none() && !public {
        return Err(ApiError::unauthorized());
    }
    let impersonated = match id {
        Some(id) => authz::impersonation::impersonated(&state.reg, &state.rbac, id, req.headers())?,
        None => None,
    };
    let id = impersonated.as_ref().or(id);
    let resource_path = matches!(segs.as_slice(), ["api", _, _, ..] | ["apis", _, _, _, ..]);
    if let (Some(id), false, false) = (id, public, resource_path) {
        let n = authz::NonResource::of_request(req.method(), req.uri().path());
        authz::check_path(&state.rbac, id, &n)?;
    }
    let accept = http::parse_accept(
        req.headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    let is_get = req.method() == Method::GET;
    match segs.as_slice() {
        ["healthz" | "livez" | "readyz", ..] => return Ok(http::text_response(200, "ok")),
        ["version"] => return Ok(http::json_response(200, &version())),
        ["api"] if is_get => {
            if let Some((v, ct)) = discovery::aggregated_choice(&accept) {
                return Ok(http::typed_response(
                    200,
                    &ct,
                    &discovery::aggregated(true, v),
                ));
            }
            return Ok(http::json_response(
                200,
                &discovery::api_versions(&state.server_url),
            ));
        }
        ["apis"] if is_get => {
            if let Some((v, ct)) = discovery::aggregated_choice(&accept) {
                return Ok(http::typed_response(
                    200,
                    &ct,
                    &discovery::aggregated(false, v),
                ));
            }
            return Ok(http::json_response(200, &discovery::api_group_list()));
        }
        ["apis", g] if is_get => {
            return discovery::api_group(g)
                .map(|v| http::json_response(200, &v))
                .ok_or_else(ApiError::path_not_found);
        }
        ["api", v] | ["apis", _, v] if is_get && segs.len() == 2 + (segs[0] == "apis") as usize => {
            let g = if segs[0] == "apis" { segs[1] } else { "" };
            return discovery::resource_list(g, v)
                .map(|v| http::json_response(200, &v))
                .ok_or_else(ApiError::path_not_found);
        }
        _ => {}
    }
    if is_get {
        let query = http::parse_query(req.uri().query());
        if let Some(r) = openapi::serve(&segs, &query, req.headers(), &accept) {
            return r;
        }
    }
    if let (Some(id), ["apis", group, "v1", plural]) = (id, segs.as_slice()) {
        if req.method() == Method::POST
            && resources::REVIEWS
                .iter()
                .any(|r| r.group == *group && r.plural == *plural)
        {
            let ct = req
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/json")
                .to_string();
            let review = authz::Attributes {
                verb: authz::Verb::Create,
                group: group.to_string(),
                resource: plural.to_string(),
                subresource: String::new(),
                namespace: String::new(),
                name: String::new(),
                fields: Default::default(),
            };
            authz::check(&state.reg, &state.rbac, id, &review)?;
            let body = http::parse_object(&ct, &http::read_body(req.into_body()).await?)?;
            let (reg, rbac) = (&state.reg, &state.rbac);
            let out = match *plural {
                "selfsubjectreviews" => {
                    crate::auth::self_subject_review(id, "authentication.k8s.io/v1")
                }
                "selfsubjectrulesreviews" => {
                    crate::auth::self_subject_rules_review(rbac, id, &body)
                }
                "subjectaccessreviews" => crate::auth::subject_access_review(reg, rbac, &body),
                _ => crate::auth::self_subject_access_review(reg, rbac, id, &body),
            };
            return Ok(http::json_response(201, &out));
        }
    }
    // Everything below is a resource request: authenticated, then authorized.
    let Some(id) = id else {
        return Err(ApiError::unauthorized());
    };
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(ApiError::path_not_found()),
    };
    let namespaced_path = rest.len() >= 3
        && rest[0] == "namespaces"
        && resources::find(group, version, rest[2]).is_some_and(|t| t.namespaced);
    let (ns, plural, name, sub) = if namespaced_path {
        (
            Some(rest[1]),
            rest[2],
            rest.get(3).copied(),
            rest.get(4).copied(),
        )
    } else if let Some(p) = rest.first() {
        (None, *p, rest.get(1).copied(), rest.get(2).copied())
    } else {
        return Err(ApiError::path_not_found());
    };
    if rest.len() > if namespaced_path { 5 } else { 3 } {
        return Err(ApiError::path_not_found());
    }
    let rt = resources::find(group, version, plural).ok_or_else(ApiError::path_not_found)?;
    if rt.namespaced && ns.is_none() && name.is_some() {
        // A namespaced object needs its namespace in the path.
        return Err(ApiError::path_not_found());
    }
    let query = http::parse_query(req.uri().query());
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let call = Call {
        method: req.method().clone(),
        rt,
        ns: ns.map(str::to_string),
        name: name.map(str::to_string),
        sub: sub.map(str::to_string),
        query,
        accept,
        content_type,
    };
    // Before the body is read: a refused write stores nothing.
    let attrs = authz::Attributes::of_call(&call);
    authz::check(&state.reg, &state.rbac, id, &attrs)?;
    if rt.kind == "Pod" && matches!(sub, Some("log" | "exec" | "attach" | "portforward")) {
        let (parts, body) = req.into_parts();
        let Some(incoming) = body.into_incoming() else {
            return Err(ApiError::bad_request(
                "pods/log, exec, attach and portforward are served over the network only",
            ));
        };
        let req = Request::from_parts(parts, incoming);
        return crate::kubelet::proxy(&state.reg, state.kubelet_tls.clone(), call, req).await;
    }
    if rt.kind == "ServiceAccount" && sub == Some("token") && call.method == Method::POST {
        let body = http::read_body(req.into_body()).await?;
        let tr = http::parse_object(&call.content_type, &body)?;
        authz::check_object(&state.reg, id, &attrs, &tr)?;
        let (ns, name) = (
            call.ns.as_deref().unwrap_or(""),
            call.name.as_deref().unwrap_or(""),
        );
        let out = crate::tokens::request(&state.reg, &state.signer, ns, name, &tr)?;
        return Ok(http::json_response(201, &out));
    }
    if call.method == Method::GET && call.name.is_none() && http::flag(&call.query, "watch") {
        return watch::watch(&state.reg, call);
    }
    let body = http::read_body(req.into_body()).await?;
    if authz::needs_object(id, &attrs) {
        let obj = http::parse_object(&call.content_type, &body)?;
        authz::check_object(&state.reg, id, &attrs, &obj)?;
    }
    if authz::escalation::applies(id, &attrs) {
        let obj = written_object(&state.reg, &call, &body).await?;
        authz::escalation::check(&state.reg, &state.rbac, id, &attrs, &obj)?;
    }
    let rbac_write = rt.group == crate::resources::RBAC_GROUP && call.method != Method::GET;
    let work = rest::handle(&state.reg, call, &body);
    // Writes wait for SQLite's fsync; on a multi-threaded runtime, let the other workers carry
    // on with watches and reads meanwhile.
    let handle = tokio::runtime::Handle::current();
    let resp = if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
        tokio::task::block_in_place(|| handle.block_on(work))
    } else {
        work.await
    };
    if rbac_write {
        // The writer's next request is decided by what it just wrote.
        if let Ok(rev) = state.reg.store.current_rev() {
            state.rbac.caught_up(rev).await;
        }
    }
    resp
}

/// The role or binding a write would store: the body of a create or update, the result of a
/// patch (found by a dry run).
async fn written_object(
    reg: &Registry,
    call: &Call,
    body: &[u8],
) -> Result<serde_json::Value, ApiError> {
    if call.method != Method::PATCH {
        return http::parse_object(&call.content_type, body);
    }
    let mut query = call.query.clone();
    query.insert("dryRun".into(), "All".into());
    let dry = Call {
        method: call.method.clone(),
        rt: call.rt,
        ns: call.ns.clone(),
        name: call.name.clone(),
        sub: call.sub.clone(),
        query,
        accept: Vec::new(),
        content_type: call.content_type.clone(),
    };
    let resp = rest::handle(reg, dry, body).await?;
    let ok = resp.status().is_success();
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .map_err(|e| ApiError::new(500, "InternalError", e.to_string()))?
        .to_bytes();
    let obj = http::parse_object("application/json", &bytes)?;
    if !ok {
        return Err(ApiError::new(
            obj["code"].as_u64().unwrap_or(500) as u16,
            "BadRequest",
            obj["message"]
                .as_str()
                .unwrap_or("patch failed")
                .to_string(),
        ));
    }
    Ok(obj)
}

/// Runs the control plane until SIGINT or SIGTERM (the `oxlet up` command).
pub fn up(cfg: Config) -> Result<(), Error> {
    let rt = tokio::runtime::Runtime::new().map_err(|source| Error::Io {
        path: PathBuf::from("tokio runtime"),
        source,
    })?;
    rt.block_on(async {
        let server = start(cfg).await?;
        eprintln!(
            "oxlet API server on https://{} (kubeconfig {})",
            server.addr,
            server.kubeconfig.display()
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|source| Error::Io {
                path: PathBuf::from("signal"),
                source,
            })?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        server.stop();
        Ok(())
    })
}
