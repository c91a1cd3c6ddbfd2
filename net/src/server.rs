//! The HTTP/1.1 JSON API of the contract, on hyper 1.
//!
//! Every request is answered: bad input gets a JSON error with a 4xx and the
//! connection stays usable; the server never answers 500 for a client's
//! mistake. Limits are named constants enforced up front.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::{Body as _, Frame, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustci_core::model::{JobId, JobState, NodeState};
use rustci_core::replica::{Command, CommandError, Replica, Reply};
use rustci_core::scheduler::unplaced_reason;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};

use crate::control::{BackupError, ControlPlane, Unavailable};
use crate::dto::{
    event_json, ClusterView, ErrorBody, ErrorDetail, EventList, JobList, JobView, NodeList,
    NodeView, ReplicaView, SubmitRequest,
};

/// Largest request body accepted; larger ones get 413.
pub const BODY_BYTES_MAX: usize = 1 << 20;
/// Connections served at once (mini-redis style); more wait in the backlog.
pub const CONNECTIONS_MAX: usize = 1024;
/// Events returned by one `GET /v1/events`.
pub const EVENTS_PAGE_MAX: usize = 1000;
/// Longest long-poll of `GET /v1/events`.
pub const EVENTS_WAIT_SECS_MAX: u64 = 60;
/// How often `logs?follow=true` looks for new output.
pub const LOG_FOLLOW_POLL_MS: u64 = 100;
/// Queued jobs looked at for the queue metrics, in placement order.
pub const METRICS_QUEUE_SCAN_MAX: usize = 10_000;
/// Bytes of output sent per chunk of a followed log.
pub const LOG_CHUNK_BYTES: usize = 64 * 1024;

/// Longest a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub type Body = BoxBody<Bytes, Infallible>;

#[derive(Clone, Default)]
pub struct ServerConfig {
    /// When set, every `/v1` request must carry `Authorization: Bearer <token>`.
    pub api_token: Option<String>,
    /// The agent endpoint (`GET /v1/agent` with `Upgrade: rustci-agent`);
    /// `None`: agents are refused.
    pub agents: Option<Arc<crate::agent_link::LinkContext>>,
}

/// Serves the API on `listener` until `shutdown` resolves, then lets open
/// requests finish.
pub async fn serve(
    listener: TcpListener,
    cp: ControlPlane,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) {
    let limit = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    // Graceful shutdown by hand: hyper-util's helper does not take
    // connections that may switch to the agent protocol.
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    let state = Arc::new((cp, config));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let service = service_fn(move |req| {
            let state = state.clone();
            async move {
                if req.uri().path() == crate::agent_link::AGENT_PATH {
                    return Ok::<_, Infallible>(agent_upgrade(&state.1, peer, req));
                }
                Ok::<_, Infallible>(route(&state.0, &state.1, peer, req).await)
            }
        });
        let conn = http1::Builder::new()
            .keep_alive(true)
            // A client that half-closes after its request still gets the
            // answer (an acknowledged write must never look dropped).
            .half_close(true)
            // A connection that never finishes its headers cannot hold a
            // connection slot for ever (slowloris).
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let mut closing = closing_rx.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = closing.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, %peer, "connection ended");
            }
            drop(permit);
        });
    }
    let _ = closing_tx.send(true);
    let all = CONNECTIONS_MAX as u32;
    if tokio::time::timeout(Duration::from_secs(5), limit.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("connections still open after 5 s; closing");
    }
}

/// An API error: a status and the contract's `{"error": {code, message}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }
    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl From<Unavailable> for ApiError {
    fn from(e: Unavailable) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> ApiError {
        let (status, code) = match &e {
            CommandError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            CommandError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            CommandError::NotLeader { .. } => (StatusCode::SERVICE_UNAVAILABLE, "no_leader"),
            CommandError::Overloaded => (StatusCode::TOO_MANY_REQUESTS, "overloaded"),
            CommandError::Stopping => (StatusCode::SERVICE_UNAVAILABLE, "stopping"),
            CommandError::StorageFull => (StatusCode::INSUFFICIENT_STORAGE, "storage_full"),
            _ => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

type ApiResult = Result<Response<Body>, ApiError>;

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(value).expect("API views always serialize");
    let mut resp = Response::new(Full::new(Bytes::from(bytes)).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn text(status: StatusCode, body: impl Into<Bytes>, content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn error_response(e: ApiError) -> Response<Body> {
    json(
        e.status,
        &ErrorBody {
            error: ErrorDetail {
                code: e.code.to_string(),
                message: e.message,
            },
        },
    )
}

/// Switches an agent's connection to the agent protocol
/// (`crate::agent_link`); anything else on that path is refused.
fn agent_upgrade(
    config: &ServerConfig,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Response<Body> {
    use crate::agent_link::AGENT_UPGRADE;
    let Some(ctx) = config.agents.clone() else {
        return error_response(ApiError::not_found("this server takes no agents"));
    };
    let wants = req
        .headers()
        .get(hyper::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(AGENT_UPGRADE));
    if req.method() != Method::GET || !wants {
        return error_response(ApiError::bad_request(
            "upgrade_required",
            format!(
                "{} is for agents: GET with `Upgrade: {AGENT_UPGRADE}`",
                crate::agent_link::AGENT_PATH
            ),
        ));
    }
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                crate::agent_link::serve_agent(TokioIo::new(upgraded), ctx, peer.to_string()).await
            }
            Err(e) => tracing::debug!(%peer, error = %e, "agent upgrade failed"),
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()).boxed());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut().insert(
        hyper::header::UPGRADE,
        HeaderValue::from_static(AGENT_UPGRADE),
    );
    resp.headers_mut().insert(
        hyper::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    resp
}

async fn route(
    cp: &ControlPlane,
    config: &ServerConfig,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let result = dispatch(cp, config, req).await;
    match result {
        Ok(resp) => resp,
        Err(e) => {
            tracing::debug!(%peer, %path, code = e.code, message = %e.message, "request refused");
            error_response(e)
        }
    }
}

async fn dispatch(cp: &ControlPlane, config: &ServerConfig, req: Request<Incoming>) -> ApiResult {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method().clone();
    if segments.first() == Some(&"v1") {
        authorize(config, &req)?;
    }
    let query = parse_query(req.uri().query());
    match (&method, segments.as_slice()) {
        (&Method::GET, ["healthz"]) => Ok(text(StatusCode::OK, "ok\n", "text/plain")),
        (&Method::GET, ["readyz"]) => readyz(cp).await,
        (&Method::GET, ["metrics"]) => metrics(cp).await,
        (&Method::POST, ["v1", "jobs"]) => submit(cp, req).await,
        (&Method::GET, ["v1", "jobs"]) => list_jobs(cp, &query).await,
        (&Method::GET, ["v1", "jobs", id]) => get_job(cp, parse_job_id(id)?).await,
        (&Method::POST, ["v1", "jobs", id, "cancel"]) => {
            let job = parse_job_id(id)?;
            command(cp, Command::Cancel { job }).await
        }
        (&Method::GET, ["v1", "jobs", id, "logs"]) => logs(cp, parse_job_id(id)?, &query).await,
        (&Method::GET, ["v1", "nodes"]) => list_nodes(cp).await,
        (&Method::GET, ["v1", "nodes", name]) => get_node(cp, name.to_string()).await,
        (&Method::POST, ["v1", "nodes", name, "drain"]) => {
            let name = name.to_string();
            command(cp, Command::DrainNode { name }).await
        }
        (&Method::POST, ["v1", "nodes", name, "undrain"]) => {
            let name = name.to_string();
            command(cp, Command::UndrainNode { name }).await
        }
        (&Method::POST, ["v1", "nodes", name, "remove"])
        | (&Method::DELETE, ["v1", "nodes", name]) => {
            let name = name.to_string();
            let reason = remove_reason(req).await?;
            command(cp, Command::RemoveNode { name, reason }).await
        }
        (&Method::GET, ["v1", "cluster"]) => cluster(cp).await,
        (&Method::GET, ["v1", "events"]) => events(cp, &query).await,
        (&Method::POST, ["v1", "backup"]) => backup(cp, req).await,
        (_, ["v1", "backup"]) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed on {path}"),
        )),
        (_, ["healthz" | "readyz" | "metrics"])
        | (_, ["v1", "jobs", ..])
        | (_, ["v1", "nodes", ..])
        | (_, ["v1", "cluster" | "events"]) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed on {path}"),
        )),
        _ => Err(ApiError::not_found(format!("no route for {method} {path}"))),
    }
}

fn authorize(config: &ServerConfig, req: &Request<Incoming>) -> Result<(), ApiError> {
    let Some(token) = &config.api_token else {
        return Ok(());
    };
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if constant_time_eq(t.as_bytes(), token.as_bytes()) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong API token (send Authorization: Bearer <token>)",
        )),
    }
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn parse_query(q: Option<&str>) -> BTreeMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect()
}

fn query_u64(query: &BTreeMap<String, String>, key: &str) -> Result<Option<u64>, ApiError> {
    match query.get(key) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            ApiError::bad_request(
                "invalid_query",
                format!("query parameter {key}={v:?} is not a non-negative integer"),
            )
        }),
    }
}

fn parse_job_id(s: &str) -> Result<JobId, ApiError> {
    s.parse()
        .map(JobId)
        .map_err(|_| ApiError::not_found(format!("job {s:?} not found (job ids are integers)")))
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    if req.body().size_hint().lower() > BODY_BYTES_MAX as u64 {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), BODY_BYTES_MAX)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::bad_request(
            "bad_body",
            format!("could not read request body: {e}"),
        )),
    }
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("request body exceeds {BODY_BYTES_MAX} bytes"),
    )
}

/// `POST /v1/backup {"to": "/abs/dir", "cluster_id": "..."}`: a consistent
/// copy of the data dir, taken by the daemon itself (it holds the log's
/// file lock), off the runtime's threads.
async fn backup(cp: &ControlPlane, req: Request<Incoming>) -> ApiResult {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct BackupRequest {
        to: String,
        cluster_id: String,
    }
    let body = read_body(req).await?;
    let request: BackupRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request("invalid_json", format!("invalid backup request: {e}"))
    })?;
    let to = std::path::PathBuf::from(&request.to);
    if !to.is_absolute() {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("backup target {:?} is not an absolute path", request.to),
        ));
    }
    let log = cp.log.clone();
    let done = tokio::task::spawn_blocking(move || log.backup(&to, &request.cluster_id))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "backup_failed",
                "the backup stopped unexpectedly",
            )
        })?;
    match done {
        Ok(done) => Ok(json(StatusCode::OK, &done)),
        Err(BackupError::Invalid(m)) => Err(ApiError::bad_request("invalid_request", m)),
        Err(BackupError::WrongCluster(m)) => {
            Err(ApiError::new(StatusCode::CONFLICT, "wrong_cluster", m))
        }
        Err(BackupError::Failed(m)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "backup_failed",
            m,
        )),
    }
}

/// The optional body of a removal: `{"reason": "..."}`.
async fn remove_reason(req: Request<Incoming>) -> Result<String, ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Removal {
        #[serde(default)]
        reason: String,
    }
    let body = read_body(req).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(String::new());
    }
    let removal: Removal = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid removal: {e}")))?;
    Ok(removal.reason)
}

async fn submit(cp: &ControlPlane, req: Request<Incoming>) -> ApiResult {
    let key = match req.headers().get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    ApiError::bad_request("invalid_request", "Idempotency-Key must be ASCII")
                })?
                .to_string(),
        ),
    };
    let body = read_body(req).await?;
    let request: SubmitRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid job: {e}")))?;
    let spec = request.into_spec().map_err(CommandError::from)?;
    let command = Command::Submit {
        spec,
        idempotency_key: key,
    };
    match cp.command(command).await?? {
        Reply::Job(job) => Ok(json(StatusCode::CREATED, &JobView::from_owned(job))),
        Reply::Node(_) => unreachable!("a submit is answered with a job"),
    }
}

async fn command(cp: &ControlPlane, command: Command) -> ApiResult {
    Ok(match cp.command(command).await?? {
        Reply::Job(job) => json(StatusCode::OK, &JobView::from_owned(job)),
        Reply::Node(node) => json(StatusCode::OK, &NodeView::new(&node, 0, None)),
    })
}

fn job_view(r: &Replica, job: &rustci_core::model::Job) -> JobView {
    let reason =
        unplaced_reason(r.state(), job).or_else(|| rustci_core::state::State::failure_reason(job));
    JobView::new(job, reason)
}

async fn list_jobs(cp: &ControlPlane, query: &BTreeMap<String, String>) -> ApiResult {
    let filter = match query.get("state") {
        None => None,
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!("unknown job state {s:?}; use one of queued, assigned, running, succeeded, failed, cancelled"),
            )
        })?),
    };
    let jobs = cp
        .query(move |r| {
            r.state()
                .jobs
                .values()
                .filter(|j| filter.is_none_or(|f| j.state == f))
                .map(|j| job_view(r, j))
                .collect()
        })
        .await?;
    Ok(json(StatusCode::OK, &JobList { jobs }))
}

async fn get_job(cp: &ControlPlane, id: JobId) -> ApiResult {
    let view = cp
        .query(move |r| r.state().job(id).map(|j| job_view(r, j)))
        .await?;
    match view {
        Some(v) => Ok(json(StatusCode::OK, &v)),
        None => Err(ApiError::not_found(format!("job {id} not found"))),
    }
}

fn node_view(r: &Replica, n: &rustci_core::model::Node) -> NodeView {
    let running = r.state().active_by_node.get(&n.name).map_or(0, |s| s.len());
    let heard = r.heard_ago_ms(&n.name).map(|ms| ms as f64 / 1000.0);
    NodeView::new(n, running, heard)
}

/// One node with the attempts it holds: `rustci node status`.
async fn get_node(cp: &ControlPlane, name: String) -> ApiResult {
    let found = cp
        .query(move |r| {
            let st = r.state();
            let node = st.nodes.get(&name)?;
            let attempts = r
                .view(&name)
                .into_iter()
                .map(|a| crate::dto::NodeAttemptView {
                    job: a.job.0,
                    attempt: a.attempt,
                    state: st
                        .job(a.job)
                        .and_then(|j| j.active_attempt())
                        .map_or("assigned", |x| x.state.as_str())
                        .to_string(),
                    incarnation: a.incarnation,
                })
                .collect();
            Some(crate::dto::NodeStatusView {
                node: node_view(r, node),
                incarnation: node.incarnation,
                attempts,
            })
        })
        .await?;
    match found {
        Some(view) => Ok(json(StatusCode::OK, &view)),
        None => Err(ApiError::not_found("no such node")),
    }
}

async fn list_nodes(cp: &ControlPlane) -> ApiResult {
    let nodes = cp
        .query(move |r| r.state().nodes.values().map(|n| node_view(r, n)).collect())
        .await?;
    Ok(json(StatusCode::OK, &NodeList { nodes }))
}

async fn cluster(cp: &ControlPlane) -> ApiResult {
    let info = cp.info.clone();
    let uptime_secs = cp.started.elapsed().as_secs();
    let view = cp
        .query(move |r| {
            let st = r.state();
            ClusterView {
                id: r.id(),
                state: r.lifecycle().as_str().to_string(),
                leader: r.leader(),
                leader_addr: r.leader().map(|_| info.advertise_addr.clone()),
                term: r.term(),
                commit_index: r.commit_index(),
                applied_index: r.applied_index(),
                replicas: vec![ReplicaView {
                    id: r.id(),
                    addr: info.advertise_addr.clone(),
                    role: if r.leader() == Some(r.id()) {
                        "leader"
                    } else {
                        "follower"
                    }
                    .to_string(),
                }],
                uptime_secs,
                nodes: st.nodes.len(),
                jobs: JobState::ALL
                    .iter()
                    .map(|s| (s.as_str().to_string(), st.job_count(*s)))
                    .collect(),
                state_digest: format!("{:016x}", st.digest()),
            }
        })
        .await?;
    Ok(json(StatusCode::OK, &view))
}

async fn readyz(cp: &ControlPlane) -> ApiResult {
    let ready = cp.query(|r| r.is_ready()).await?;
    if ready {
        Ok(text(StatusCode::OK, "ready\n", "text/plain"))
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_leader",
            "not ready: no leader yet",
        ))
    }
}

async fn metrics(cp: &ControlPlane) -> ApiResult {
    let uptime = cp.started.elapsed().as_secs_f64();
    let appends = cp
        .log_stats
        .appends
        .load(std::sync::atomic::Ordering::Relaxed);
    let appended = cp
        .log_stats
        .entries
        .load(std::sync::atomic::Ordering::Relaxed);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let body = cp
        .query(move |r| {
            let st = r.state();
            let mut out = String::new();
            let _ = writeln!(out, "# HELP rustci_jobs Jobs by state.\n# TYPE rustci_jobs gauge");
            for s in JobState::ALL {
                let _ = writeln!(out, "rustci_jobs{{state=\"{}\"}} {}", s.as_str(), st.job_count(s));
            }
            let _ = writeln!(out, "# HELP rustci_queue_length Jobs waiting for placement.\n# TYPE rustci_queue_length gauge\nrustci_queue_length {}", st.queue.len());
            let _ = writeln!(out, "# HELP rustci_nodes Worker nodes by state.\n# TYPE rustci_nodes gauge");
            for s in [NodeState::Ready, NodeState::Draining, NodeState::Down, NodeState::Left] {
                let n = st.nodes.values().filter(|n| n.state == s).count();
                let _ = writeln!(out, "rustci_nodes{{state=\"{}\"}} {n}", s.as_str());
            }
            let _ = writeln!(out, "# HELP rustci_node_capacity_cpu_millis CPU a node offers.\n# TYPE rustci_node_capacity_cpu_millis gauge");
            for n in st.nodes.values() {
                let _ = writeln!(out, "rustci_node_capacity_cpu_millis{{node=\"{}\"}} {}", n.name, n.capacity.cpu_millis);
            }
            let _ = writeln!(out, "# HELP rustci_node_allocated_cpu_millis CPU held by a node's active attempts.\n# TYPE rustci_node_allocated_cpu_millis gauge");
            for n in st.nodes.values() {
                let _ = writeln!(out, "rustci_node_allocated_cpu_millis{{node=\"{}\"}} {}", n.name, n.allocated.cpu_millis);
            }
            let _ = writeln!(out, "# HELP rustci_node_capacity_memory_mb Memory a node offers.\n# TYPE rustci_node_capacity_memory_mb gauge");
            for n in st.nodes.values() {
                let _ = writeln!(out, "rustci_node_capacity_memory_mb{{node=\"{}\"}} {}", n.name, n.capacity.memory_mb);
            }
            let _ = writeln!(out, "# HELP rustci_node_allocated_memory_mb Memory held by a node's active attempts.\n# TYPE rustci_node_allocated_memory_mb gauge");
            for n in st.nodes.values() {
                let _ = writeln!(out, "rustci_node_allocated_memory_mb{{node=\"{}\"}} {}", n.name, n.allocated.memory_mb);
            }
            let oldest = st
                .queue
                .iter()
                .take(METRICS_QUEUE_SCAN_MAX)
                .filter_map(|k| st.job(k.job).map(|j| j.submitted_at))
                .min();
            let wait = oldest.map_or(0.0, |t| now_ms.saturating_sub(t) as f64 / 1000.0);
            let _ = writeln!(out, "# HELP rustci_oldest_queued_job_wait_seconds How long the oldest queued job has waited (among the first {METRICS_QUEUE_SCAN_MAX} in placement order).\n# TYPE rustci_oldest_queued_job_wait_seconds gauge\nrustci_oldest_queued_job_wait_seconds {wait:.3}");
            let mut unplaceable: BTreeMap<&str, u64> = BTreeMap::new();
            for key in st.queue.iter().take(METRICS_QUEUE_SCAN_MAX) {
                let Some(reason) = st.job(key.job).and_then(|j| unplaced_reason(st, j)) else {
                    continue;
                };
                let class = if reason.starts_with("no ready nodes") {
                    "no_ready_node"
                } else if reason.starts_with("no ready node matches") {
                    "constraints"
                } else if reason.starts_with("no matching node is large enough") {
                    "too_large"
                } else {
                    continue;
                };
                *unplaceable.entry(class).or_default() += 1;
            }
            let _ = writeln!(out, "# HELP rustci_unplaceable_jobs Queued jobs no ready node can take now, by reason.\n# TYPE rustci_unplaceable_jobs gauge");
            for class in ["constraints", "no_ready_node", "too_large"] {
                let _ = writeln!(out, "rustci_unplaceable_jobs{{reason=\"{class}\"}} {}", unplaceable.get(class).copied().unwrap_or(0));
            }
            let _ = writeln!(out, "# HELP rustci_heartbeats_received_total Agent heartbeats this replica received.\n# TYPE rustci_heartbeats_received_total counter\nrustci_heartbeats_received_total {}", r.heartbeats_received());
            let _ = writeln!(out, "# HELP rustci_attempts_lost_total Attempts lost because their node died, restarted or was removed.\n# TYPE rustci_attempts_lost_total counter\nrustci_attempts_lost_total {}", st.attempts_lost);
            let _ = writeln!(out, "# HELP rustci_log_commit_index Highest committed log index.\n# TYPE rustci_log_commit_index gauge\nrustci_log_commit_index {}", r.commit_index());
            let _ = writeln!(out, "# HELP rustci_log_applied_index Highest applied log index.\n# TYPE rustci_log_applied_index gauge\nrustci_log_applied_index {}", r.applied_index());
            let _ = writeln!(out, "# HELP rustci_term Current term.\n# TYPE rustci_term gauge\nrustci_term {}", r.term());
            let _ = writeln!(out, "# HELP rustci_log_ignored_entries_total Entries applied as no-ops.\n# TYPE rustci_log_ignored_entries_total counter\nrustci_log_ignored_entries_total {}", st.ignored_entries);
            let _ = writeln!(out, "# HELP rustci_ready 1 when this replica can serve writes.\n# TYPE rustci_ready gauge\nrustci_ready {}", u8::from(r.is_ready()));
            let _ = writeln!(out, "# HELP rustci_log_appends_total Log write transactions, one fsync each (group commit).\n# TYPE rustci_log_appends_total counter\nrustci_log_appends_total {appends}");
            let _ = writeln!(out, "# HELP rustci_log_appended_entries_total Entries made durable.\n# TYPE rustci_log_appended_entries_total counter\nrustci_log_appended_entries_total {appended}");
            let _ = writeln!(out, "# HELP rustci_uptime_seconds Seconds since this process started.\n# TYPE rustci_uptime_seconds gauge\nrustci_uptime_seconds {uptime:.3}");
            out
        })
        .await?;
    Ok(text(
        StatusCode::OK,
        body,
        "text/plain; version=0.0.4; charset=utf-8",
    ))
}

async fn events(cp: &ControlPlane, query: &BTreeMap<String, String>) -> ApiResult {
    let after = query_u64(query, "after")?.unwrap_or(0);
    let wait_secs = query_u64(query, "wait_secs")?
        .unwrap_or(0)
        .min(EVENTS_WAIT_SECS_MAX);
    let mut applied = cp.applied.clone();
    if *applied.borrow() <= after && wait_secs > 0 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(wait_secs);
        let _ = tokio::time::timeout_at(deadline, applied.wait_for(|i| *i > after)).await;
    }
    let upto = *applied.borrow();
    let log = cp.log.clone();
    let max = EVENTS_PAGE_MAX.min(upto.saturating_sub(after) as usize);
    let entries = if max == 0 {
        Vec::new()
    } else {
        tokio::task::spawn_blocking(move || log.read_after(after, max))
            .await
            .map_err(|_| ApiError::from(Unavailable))?
            .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "log_unreadable", e))?
    };
    let next = entries.last().map_or(after, |e| e.index);
    let events = entries.iter().map(event_json).collect();
    Ok(json(StatusCode::OK, &EventList { events, next }))
}

async fn logs(cp: &ControlPlane, id: JobId, query: &BTreeMap<String, String>) -> ApiResult {
    let attempt_q = query_u64(query, "attempt")?;
    let follow = matches!(
        query.get("follow").map(String::as_str),
        Some("true" | "1" | "")
    );
    let attempt = cp
        .query(move |r| {
            let job = r.state().job(id)?;
            Some(match attempt_q {
                Some(n) => job
                    .attempts
                    .iter()
                    .find(|a| u64::from(a.number) == n)
                    .map(|a| a.number),
                None => job.attempts.last().map(|a| a.number),
            })
        })
        .await?;
    let attempt = match attempt {
        None => return Err(ApiError::not_found(format!("job {id} not found"))),
        Some(None) if attempt_q.is_some() => {
            return Err(ApiError::not_found(format!(
                "job {id} has no attempt {}",
                attempt_q.unwrap_or(0)
            )))
        }
        Some(None) => None,
        Some(Some(n)) => Some(n),
    };
    let Some(attempt) = attempt else {
        if !follow {
            return Ok(text(
                StatusCode::OK,
                Bytes::new(),
                "text/plain; charset=utf-8",
            ));
        }
        // Queued with no attempt yet: follow waits for the first one.
        return Ok(stream_response(follow_logs(cp.clone(), id, None)));
    };
    if !follow {
        let path = cp.output_path(id, attempt);
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "output_unreadable",
                    format!("cannot read {}: {e}", path.display()),
                ))
            }
        };
        return Ok(text(StatusCode::OK, bytes, "text/plain; charset=utf-8"));
    }
    Ok(stream_response(follow_logs(cp.clone(), id, Some(attempt))))
}

fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let mut resp = Response::new(ChannelBody(rx).boxed());
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Streams an attempt's output file as it grows, until the attempt has ended
/// and everything written has been sent.
fn follow_logs(cp: ControlPlane, id: JobId, attempt: Option<u32>) -> mpsc::Receiver<Bytes> {
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        let mut attempt = attempt;
        let mut offset = 0u64;
        loop {
            let status = cp
                .query(move |r| {
                    let job = r.state().job(id)?;
                    let current = match attempt {
                        Some(n) => job.attempts.iter().find(|a| a.number == n),
                        None => job.attempts.last(),
                    };
                    Some((
                        current.map(|a| (a.number, a.state.is_active())),
                        job.state.is_terminal(),
                    ))
                })
                .await;
            let Ok(Some((current, job_terminal))) = status else {
                return;
            };
            let active = match current {
                Some((n, active)) => {
                    attempt = Some(n);
                    active
                }
                None => !job_terminal,
            };
            if let Some(n) = attempt {
                match send_new_output(&tx, &cp.output_path(id, n), &mut offset).await {
                    Ok(()) => {}
                    Err(()) => return,
                }
            }
            if !active {
                return;
            }
            tokio::time::sleep(Duration::from_millis(LOG_FOLLOW_POLL_MS)).await;
        }
    });
    rx
}

/// Sends the bytes of `path` past `offset`; Err when the client went away.
async fn send_new_output(
    tx: &mpsc::Sender<Bytes>,
    path: &std::path::Path,
    offset: &mut u64,
) -> Result<(), ()> {
    let Ok(mut file) = tokio::fs::File::open(path).await else {
        return Ok(());
    };
    if file.seek(std::io::SeekFrom::Start(*offset)).await.is_err() {
        return Ok(());
    }
    let mut buf = vec![0u8; LOG_CHUNK_BYTES];
    loop {
        let n = match file.read(&mut buf).await {
            Ok(0) | Err(_) => return Ok(()),
            Ok(n) => n,
        };
        *offset += n as u64;
        tx.send(Bytes::copy_from_slice(&buf[..n]))
            .await
            .map_err(|_| ())?;
    }
}

/// A response body fed by a channel: ends when the sender is dropped.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}
