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
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body as _, Frame, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustci_core::model::{JobId, JobState, NodeState};
use rustci_core::replica::{Command, CommandError, Replica, Reply};
use rustci_core::scheduler::unplaced_reason;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::conns::{Admission, Conn, ConnTable, Phase, Tracked};
use crate::control::{BackupError, ControlPlane, Unavailable};
use crate::dto::{
    event_json, ClusterView, ErrorBody, ErrorDetail, EventList, JobList, JobView, NodeList,
    NodeView, ReplicaView, SubmitRequest,
};
use crate::events::EventFilter;
use crate::metrics::{self, family};

/// First wait after a failed `accept`; it doubles up to the max.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Largest request body accepted; larger ones get 413.
pub const BODY_BYTES_MAX: usize = 1 << 20;
/// Connections served at once by default. At the limit a newcomer is still
/// served: the connection that waited longest for its client (idle, or
/// sending its request or reading its answer slowest) is closed to make
/// room (see `conns.rs`).
pub const CONNECTIONS_MAX: usize = 1024;
/// Events returned by one `GET /v1/events`.
pub const EVENTS_PAGE_MAX: usize = 1000;
/// Entries one filtered `GET /v1/events` (`job`, `node`) examines at most,
/// matching or not: a page cut short by it may hold no event and still
/// move `next` on.
pub const EVENTS_SCAN_MAX: usize = 10_000;
/// Longest long-poll of `GET /v1/events`.
pub const EVENTS_WAIT_SECS_MAX: u64 = 60;
/// How often `logs?follow=true` looks for new output.
pub const LOG_FOLLOW_POLL_MS: u64 = 100;
/// Queued jobs looked at for the queue metrics, in placement order.
pub const METRICS_QUEUE_SCAN_MAX: usize = 10_000;
/// Bytes of output read from disk and sent per chunk of a log. A reader
/// that does not read holds at most one chunk in the channel plus hyper's
/// write buffer of `WRITE_BUF_BYTES_MAX` (and a chunk).
pub const LOG_CHUNK_BYTES: usize = 16 * 1024;
/// hyper's per-connection buffer bound: the response bytes queued for a
/// client that does not read, and the largest request head accepted.
pub const WRITE_BUF_BYTES_MAX: usize = 32 * 1024;
/// Jobs in a page of `GET /v1/jobs` when `limit` is not given.
pub const JOBS_PAGE_DEFAULT: usize = 100;
/// Largest `limit` of `GET /v1/jobs`.
pub const JOBS_PAGE_MAX: usize = 1000;
/// Jobs copied by one read on the driver (a page takes several): bounds how
/// long a submission can wait behind a listing.
pub const JOBS_SLICE: usize = 100;
/// Jobs one page of `GET /v1/jobs` examines at most, matching or not: the
/// bound on the driver's work per request. A page cut short by it has fewer
/// jobs than `limit` and a `next_cursor`.
pub const JOBS_SCAN_MAX: usize = 10_000;

/// Longest a client may take to send a request's headers (also the
/// longest a keep-alive connection may stay idle).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to send a request's body, once its headers
/// are in.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Slowest a body may arrive, on average, once `BODY_RATE_GRACE` has
/// passed: a client dripping bytes is answered 408 and disconnected.
pub const BODY_BYTES_PER_SEC_MIN: u64 = 4096;
/// Time a body may take before the minimum rate applies.
pub const BODY_RATE_GRACE: Duration = Duration::from_secs(2);

pub type Body = BoxBody<Bytes, Infallible>;

#[derive(Clone)]
pub struct ServerConfig {
    /// When set, every `/v1` request must carry `Authorization: Bearer <token>`.
    pub api_token: Option<String>,
    /// The agent endpoint (`GET /v1/agent` with `Upgrade: rustci-agent`);
    /// `None`: agents are refused.
    pub agents: Option<Arc<crate::agent_link::LinkContext>>,
    /// Connections held at once (default [`CONNECTIONS_MAX`]).
    pub connections_max: usize,
    /// The peer endpoint (`POST /v1/raft`) of a replica in a cluster;
    /// `None`: a single replica, which refuses peer traffic.
    pub peers: Option<Arc<crate::peer::PeerContext>>,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            api_token: None,
            agents: None,
            connections_max: CONNECTIONS_MAX,
            peers: None,
        }
    }
}

/// Serves the API on `listener` until `shutdown` resolves, then lets open
/// requests finish.
pub async fn serve(
    listener: TcpListener,
    cp: ControlPlane,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) {
    let table = Arc::new(ConnTable::new(config.connections_max));
    // Graceful shutdown by hand: hyper-util's helper does not take
    // connections that may switch to the agent protocol.
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    let state = Arc::new((cp, config));
    tokio::pin!(shutdown);
    // Accept errors (out of descriptors, above all) back off instead of
    // spinning, and are logged once per episode, not once per try.
    let mut accept_backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    if accept_backoff > ACCEPT_BACKOFF_MIN {
                        tracing::info!("accepting connections again");
                    }
                    accept_backoff = ACCEPT_BACKOFF_MIN;
                    a
                }
                Err(e) => {
                    if accept_backoff == ACCEPT_BACKOFF_MIN {
                        tracing::warn!(error = %e, "accept failed; backing off until it succeeds");
                    }
                    tokio::time::sleep(accept_backoff).await;
                    accept_backoff = (accept_backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
        };
        let (id, conn_rec) = match table.admit() {
            Admission::Serve(id, c) => (id, c),
            Admission::Full => {
                tracing::warn!(%peer, "every connection is busy with a request; refusing a new one");
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let rec = conn_rec.clone();
        let service = service_fn(move |mut req: Request<Incoming>| {
            let state = state.clone();
            let rec = rec.clone();
            async move {
                rec.set_phase(Phase::Working);
                if req.uri().path() == crate::agent_link::AGENT_PATH {
                    return Ok::<_, Infallible>(agent_upgrade(&state.1, peer, req));
                }
                req.extensions_mut().insert(rec.clone());
                let resp = route(&state.0, &state.1, peer, req).await;
                rec.set_phase(Phase::Responding);
                Ok::<_, Infallible>(resp.map(|b| PhaseBody { inner: b, rec }.boxed()))
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
            .max_buf_size(WRITE_BUF_BYTES_MAX)
            .serve_connection(
                TokioIo::new(Tracked::new(stream, conn_rec.clone())),
                service,
            )
            .with_upgrades();
        let mut closing = closing_rx.clone();
        let table = table.clone();
        // In the server's span (its replica's id and term), as the
        // accepting task is.
        tokio::spawn(
            async move {
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = closing.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
                _ = conn_rec.shed() => {
                    tracing::debug!(%peer, phase = ?conn_rec.phase(), "connection shed to make room");
                    Ok(())
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, %peer, "connection ended");
            }
            table.remove(id);
        }
            .in_current_span(),
        );
    }
    let _ = closing_tx.send(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !table.is_empty() {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!("connections still open after 5 s; closing");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A response body that marks its connection idle again once it has been
/// sent (or dropped).
struct PhaseBody {
    inner: Body,
    rec: Arc<Conn>,
}

impl hyper::body::Body for PhaseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PhaseBody {
    fn drop(&mut self) {
        self.rec.set_phase(Phase::Idle);
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
            CommandError::LeadershipLost { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "leadership_lost")
            }
            CommandError::Overloaded => (StatusCode::TOO_MANY_REQUESTS, "overloaded"),
            CommandError::Stopping => (StatusCode::SERVICE_UNAVAILABLE, "stopping"),
            CommandError::StorageFull => (StatusCode::INSUFFICIENT_STORAGE, "storage_full"),
            CommandError::Membership { retry: true, .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "membership_change_pending")
            }
            CommandError::Membership { retry: false, .. } => {
                (StatusCode::BAD_REQUEST, "invalid_membership_change")
            }
            _ => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

pub(crate) type ApiResult = Result<Response<Body>, ApiError>;

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
    tokio::spawn(
        async move {
            match upgrade.await {
                Ok(upgraded) => {
                    crate::agent_link::serve_agent(TokioIo::new(upgraded), ctx, peer.to_string())
                        .await
                }
                Err(e) => tracing::debug!(%peer, error = %e, "agent upgrade failed"),
            }
        }
        .in_current_span(),
    );
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
            let close = e.status == StatusCode::REQUEST_TIMEOUT;
            let mut resp = error_response(e);
            if close {
                resp.headers_mut()
                    .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
            }
            resp
        }
    }
}

async fn dispatch(cp: &ControlPlane, config: &ServerConfig, req: Request<Incoming>) -> ApiResult {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method().clone();
    // HEAD is GET without the body (hyper leaves the body out).
    let method = if method == Method::HEAD {
        Method::GET
    } else {
        method
    };
    if segments.first() == Some(&"v1") {
        authorize(config, &req)?;
    }
    let query = parse_query(req.uri().query());
    let leaders = matches!(segments.as_slice(), ["v1", "jobs" | "nodes", ..])
        || matches!(segments.as_slice(), ["v1", "cluster", "replicas", ..]);
    if leaders && !cp.leader.borrow().leading {
        // Writes and reads of jobs and nodes are the leader's: its state
        // is the newest committed one, and job output is shipped to it.
        return crate::forward::to_leader(cp, req).await;
    }
    match (&method, segments.as_slice()) {
        (&Method::POST, ["v1", "raft"]) => peer_batch(cp, config, req).await,
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
        (&Method::GET, ["v1", "jobs", id, "placement"]) => placement(cp, parse_job_id(id)?).await,
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
        (&Method::POST, ["v1", "cluster", "replicas"]) => add_replica(cp, req).await,
        (&Method::DELETE, ["v1", "cluster", "replicas", id]) => {
            let id = id.parse::<u64>().map_err(|_| {
                ApiError::bad_request(
                    "invalid_request",
                    format!("replica id {id:?} is not a whole number"),
                )
            })?;
            let change = rustci_core::replica::MemberChange::Remove { id };
            command(cp, Command::ChangeMembers(change)).await
        }
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
        | (_, ["v1", "cluster" | "events" | "raft"])
        | (_, ["v1", "cluster", "replicas", ..]) => Err(ApiError::new(
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

/// The query string, percent-decoded; a repeated key keeps its last value.
fn parse_query(q: Option<&str>) -> BTreeMap<String, String> {
    form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .into_owned()
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

/// Reads a request body whole, within the limits: at most
/// `BODY_BYTES_MAX` bytes (413), all of it within `BODY_READ_TIMEOUT`, and
/// past `BODY_RATE_GRACE` at no less than `BODY_BYTES_PER_SEC_MIN` on
/// average (408, and the connection is closed).
async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    read_body_max(req, BODY_BYTES_MAX).await
}

/// [`read_body`] with another size limit.
pub(crate) async fn read_body_max(req: Request<Incoming>, max: usize) -> Result<Bytes, ApiError> {
    read_body_within(req, max, BODY_READ_TIMEOUT).await
}

/// As [`read_body_max`], with `deadline` in place of `BODY_READ_TIMEOUT`.
async fn read_body_within(
    req: Request<Incoming>,
    max: usize,
    deadline: Duration,
) -> Result<Bytes, ApiError> {
    if req.body().size_hint().lower() > max as u64 {
        return Err(too_large(max));
    }
    let rec = req.extensions().get::<Arc<Conn>>().cloned();
    if let Some(r) = &rec {
        r.set_phase(Phase::ReadingBody);
    }
    let started = tokio::time::Instant::now();
    let limit = deadline;
    let deadline = started + limit;
    let mut body = req.into_body();
    let mut buf = bytes::BytesMut::new();
    loop {
        // The rate floor as a schedule: byte n must have arrived by
        // grace + n / rate.
        let owed = Duration::from_secs_f64((buf.len() + 1) as f64 / BODY_BYTES_PER_SEC_MIN as f64);
        let due = (started + BODY_RATE_GRACE + owed).min(deadline);
        let frame = match tokio::time::timeout_at(due, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::bad_request(
                    "bad_body",
                    format!("could not read request body: {e}"),
                ))
            }
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    format!(
                        "request body too slow: {} bytes in {:.1} s (a body must arrive within {} s, at {} bytes/s or faster after the first {} s)",
                        buf.len(),
                        started.elapsed().as_secs_f64(),
                        limit.as_secs(),
                        BODY_BYTES_PER_SEC_MIN,
                        BODY_RATE_GRACE.as_secs(),
                    ),
                ))
            }
        };
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > max {
                return Err(too_large(max));
            }
            buf.extend_from_slice(&data);
        }
    }
    if let Some(r) = &rec {
        r.set_phase(Phase::Working);
    }
    Ok(buf.freeze())
}

fn too_large(max: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("request body exceeds {max} bytes"),
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
        /// Copy job output too (default); `false` for the log alone.
        #[serde(default = "yes")]
        output: bool,
    }
    fn yes() -> bool {
        true
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
    let done =
        tokio::task::spawn_blocking(move || log.backup(&to, &request.cluster_id, request.output))
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
/// `POST /v1/raft`: a batch of Raft messages from another replica (see
/// `crate::peer`). Checked whole before any of it reaches the driver.
async fn peer_batch(cp: &ControlPlane, config: &ServerConfig, req: Request<Incoming>) -> ApiResult {
    let Some(ctx) = config.peers.clone() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_clustered",
            "this is a single-replica control plane: it takes no peer traffic",
        ));
    };
    // A snapshot's batch may be as large as the state, and takes longer.
    let snapshot_bytes = req
        .headers()
        .get(crate::peer::PEER_SNAPSHOT_BYTES_HEADER)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .filter(|&n| n <= crate::peer::PEER_SNAPSHOT_BYTES_MAX)
        .unwrap_or(0);
    let _receiving = if snapshot_bytes > 0 {
        let permit = ctx.snapshot_gate.clone().try_acquire_owned().map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "snapshot_busy",
                "this replica is receiving another snapshot; the leader sends it again",
            )
        })?;
        Some(permit)
    } else {
        None
    };
    let body = read_body_within(
        req,
        crate::peer::PEER_BODY_BYTES_MAX + snapshot_bytes as usize,
        BODY_READ_TIMEOUT + crate::peer::snapshot_transfer_time(snapshot_bytes),
    )
    .await?;
    let batch = crate::peer::check_batch(&ctx, &body).map_err(|refusal| {
        tracing::warn!(reason = %refusal, "peer batch refused");
        ApiError::new(refusal.status(), refusal.code(), refusal.to_string())
    })?;
    // The larger body was granted for a snapshot of the size declared.
    let carried = batch.snapshot.as_ref().map_or(0, |s| s.bytes.len() as u64);
    if snapshot_bytes > 0 && carried != snapshot_bytes {
        let reason = format!(
            "the batch declares a snapshot of {snapshot_bytes} bytes but carries {carried}"
        );
        tracing::warn!(%reason, "peer batch refused");
        return Err(ApiError::bad_request("bad_peer_message", reason));
    }
    cp.peer(batch.messages, batch.snapshot).await?;
    Ok(Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(Full::new(Bytes::new()).boxed())
        .expect("a valid response"))
}

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
    let arrived = std::time::Instant::now();
    let answer = submit_job(cp, req).await;
    if answer.is_ok() {
        cp.metrics.submit.observe(arrived.elapsed());
    }
    answer
}

async fn submit_job(cp: &ControlPlane, req: Request<Incoming>) -> ApiResult {
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
        Reply::Node(_) | Reply::Members(_) => unreachable!("a submit is answered with a job"),
    }
}

/// `POST /v1/cluster/replicas` `{"id": N, "addr": "host:port"}`: adds a
/// replica to the control plane (after the dead one it replaces was
/// removed with `DELETE /v1/cluster/replicas/{id}`).
async fn add_replica(cp: &ControlPlane, req: Request<Incoming>) -> ApiResult {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Add {
        id: u64,
        addr: String,
    }
    let body = read_body(req).await?;
    let add: Add = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("expected {{\"id\": N, \"addr\": \"host:port\"}}: {e}"),
        )
    })?;
    let change = rustci_core::replica::MemberChange::Add {
        id: add.id,
        addr: add.addr,
    };
    command(cp, Command::ChangeMembers(change)).await
}

async fn command(cp: &ControlPlane, command: Command) -> ApiResult {
    Ok(match cp.command(command).await?? {
        Reply::Job(job) => json(StatusCode::OK, &JobView::from_owned(job)),
        Reply::Members(members) => {
            let replicas: Vec<serde_json::Value> = members
                .into_iter()
                .map(|(id, addr)| serde_json::json!({"id": id, "addr": addr}))
                .collect();
            json(StatusCode::OK, &serde_json::json!({ "replicas": replicas }))
        }
        Reply::Node(node) => {
            // The reply carries the committed node; what it runs and when
            // it was last heard from are the replica's live view, as in
            // `GET /v1/nodes/{name}`.
            let name = node.name.clone();
            let live = cp
                .query(move |r| {
                    let running = r.state().active_by_node.get(&name).map_or(0, |s| s.len());
                    let heard = r.heard_ago_ms(&name).map(|ms| ms as f64 / 1000.0);
                    (running, heard)
                })
                .await?;
            json(StatusCode::OK, &NodeView::new(&node, live.0, live.1))
        }
    })
}

fn job_view(r: &Replica, job: &rustci_core::model::Job) -> JobView {
    let reason =
        unplaced_reason(r.state(), job).or_else(|| rustci_core::state::State::failure_reason(job));
    JobView::new(job, reason)
}

/// `GET /v1/jobs?state=S&node=N&name=X&limit=L&cursor=C`: one page of jobs,
/// oldest first. The cursor is the id of the last job the previous page
/// examined. A page examines at most `JOBS_SCAN_MAX` jobs and copies at
/// most `limit`, in reads of at most `JOBS_SLICE` copies each; it is
/// serialized off the driver.
async fn list_jobs(cp: &ControlPlane, query: &BTreeMap<String, String>) -> ApiResult {
    let state = match query.get("state") {
        None => None,
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!("unknown job state {s:?}; use one of queued, assigned, running, succeeded, failed, cancelled"),
            )
        })?),
    };
    let node = query.get("node").cloned();
    let name = query.get("name").cloned();
    let limit = match query_u64(query, "limit")? {
        None => JOBS_PAGE_DEFAULT,
        Some(l) if l == 0 || l > JOBS_PAGE_MAX as u64 => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("limit={l} is out of range: use 1 to {JOBS_PAGE_MAX}"),
            ))
        }
        Some(l) => l as usize,
    };
    let after = match query.get("cursor").map(String::as_str) {
        None | Some("") => 0,
        Some(c) => decode_cursor(c).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!("cursor={c:?} is not a cursor this server gave out (pass next_cursor from the previous page)"),
            )
        })?,
    };
    // The page is gathered in slices, each a separate read on the driver,
    // so that a submission waits behind at most one slice, never a page.
    // A linearizable read first: every slice then sees at least every
    // write acknowledged before the request.
    read(cp, |_| ()).await?;
    let mut jobs = Vec::with_capacity(limit);
    let mut last_examined = after;
    let mut examined_total = 0;
    let more = loop {
        let (state, node, name) = (state, node.clone(), name.clone());
        let want = (limit - jobs.len()).min(JOBS_SLICE);
        let scan = (JOBS_SCAN_MAX - examined_total).min(JOBS_SLICE * 10);
        let from = last_examined;
        let (slice, last, examined, more) = cp
            .query(move |r| {
                let st = r.state();
                let mut slice = Vec::new();
                let mut id = from;
                let end = st.jobs.len() as u64;
                let mut examined = 0;
                while id < end && slice.len() < want && examined < scan {
                    id += 1;
                    examined += 1;
                    let Some(j) = st.job(JobId(id)) else { continue };
                    if state.is_some_and(|s| j.state != s)
                        || node.as_deref().is_some_and(|n| j.node() != Some(n))
                        || name.as_deref().is_some_and(|n| j.spec.name != n)
                    {
                        continue;
                    }
                    slice.push(job_view(r, j));
                }
                (slice, id, examined, id < end)
            })
            .await?;
        jobs.extend(slice);
        last_examined = last;
        examined_total += examined;
        if !more || jobs.len() >= limit || examined_total >= JOBS_SCAN_MAX {
            break more;
        }
    };
    let next_cursor = more.then(|| encode_cursor(last_examined));
    json_off_driver(StatusCode::OK, JobList { jobs, next_cursor }).await
}

/// Cursors are opaque to clients: `j` and the id of the last job examined.
fn encode_cursor(last: u64) -> String {
    format!("j{last}")
}

fn decode_cursor(c: &str) -> Option<u64> {
    let digits = c.strip_prefix('j')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Large answers built so far (pages of jobs, logs streamed): the daemon
/// gives memory back to the system after a burst of them.
static LARGE_ANSWERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn large_answers() -> u64 {
    LARGE_ANSWERS.load(std::sync::atomic::Ordering::Relaxed)
}

fn count_large_answer() {
    LARGE_ANSWERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Serializes a large answer on a blocking thread, so that neither the
/// driver nor the other connections wait for it.
async fn json_off_driver<T: serde::Serialize + Send + 'static>(
    status: StatusCode,
    value: T,
) -> ApiResult {
    count_large_answer();
    // A few at a time: eight clients listing in a loop must not keep eight
    // threads busy against the driver's one on a small machine.
    let _encoding = LARGE_ENCODES
        .acquire()
        .await
        .map_err(|_| ApiError::from(Unavailable))?;
    tokio::task::spawn_blocking(move || json(status, &value))
        .await
        .map_err(|_| ApiError::from(Unavailable))
}

/// Large answers serialized at once, over all connections.
pub const LARGE_ENCODES_CONCURRENT: usize = 2;
static LARGE_ENCODES: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(LARGE_ENCODES_CONCURRENT);

async fn placement(cp: &ControlPlane, id: JobId) -> ApiResult {
    let explained = read(cp, move |r| {
        let state = r.state();
        state
            .job(id)
            .map(|j| rustci_core::scheduler::explain(state, j))
    })
    .await?;
    match explained {
        Some(e) => Ok(json(StatusCode::OK, &e)),
        None => Err(ApiError::not_found(format!("job {id} not found"))),
    }
}

/// A linearizable read (see `ControlPlane::read`), its refusal as an API
/// error.
async fn read<R, F>(cp: &ControlPlane, f: F) -> Result<R, ApiError>
where
    R: Send + 'static,
    F: FnOnce(&Replica) -> R + Send + 'static,
{
    Ok(cp.read(f).await??)
}

async fn get_job(cp: &ControlPlane, id: JobId) -> ApiResult {
    let view = read(cp, move |r| r.state().job(id).map(|j| job_view(r, j))).await?;
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
    let found = read(cp, move |r| {
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
    let nodes = read(cp, move |r| {
        r.state().nodes.values().map(|n| node_view(r, n)).collect()
    })
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
                leader_addr: r.leader().and_then(|l| info.addr_of(l)),
                term: r.term(),
                commit_index: r.commit_index(),
                applied_index: r.applied_index(),
                replicas: r
                    .voters()
                    .iter()
                    .map(|&v| ReplicaView {
                        id: v,
                        addr: info.addr_of(v).unwrap_or_default().to_string(),
                        role: if r.leader() == Some(v) {
                            "leader"
                        } else {
                            "follower"
                        }
                        .to_string(),
                    })
                    .collect(),
                uptime_secs,
                nodes: st.nodes.len(),
                jobs: JobState::ALL
                    .iter()
                    .map(|s| (s.as_str().to_string(), st.job_count(*s)))
                    .collect(),
                state_digest: format!("{:016x}", r.state_digest()),
            }
        })
        .await?;
    Ok(json(StatusCode::OK, &view))
}

async fn readyz(cp: &ControlPlane) -> ApiResult {
    let (ready, full) = cp.query(|r| (r.is_ready(), r.storage_full())).await?;
    if ready {
        Ok(text(StatusCode::OK, "ready\n", "text/plain"))
    } else if full {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_full",
            "not ready: the event log's disk is full; writes get 507 until space is freed",
        ))
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_leader",
            "not ready: no leader yet",
        ))
    }
}

async fn metrics(cp: &ControlPlane) -> ApiResult {
    let uptime_us = u64::try_from(cp.started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let appends = cp.log_stats.appends.load(Ordering::Relaxed);
    let appended = cp.log_stats.entries.load(Ordering::Relaxed);
    let leader_changes = cp.metrics.leader_changes.load(Ordering::Relaxed);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut body = cp
        .query(move |r| {
            let mut out = String::new();
            replica_metrics(&mut out, r, now_ms, leader_changes);
            out
        })
        .await?;
    let out = &mut body;
    family(
        out,
        "rustci_log_appends_total",
        "counter",
        "Log write transactions, one fsync each (group commit).",
    );
    let _ = writeln!(out, "rustci_log_appends_total {appends}");
    family(
        out,
        "rustci_log_appended_entries_total",
        "counter",
        "Entries made durable in the log.",
    );
    let _ = writeln!(out, "rustci_log_appended_entries_total {appended}");
    cp.metrics.render_histograms(out);
    family(
        out,
        "rustci_uptime_seconds",
        "gauge",
        "Seconds since this process started.",
    );
    let _ = writeln!(out, "rustci_uptime_seconds {}", metrics::seconds(uptime_us));
    family(
        out,
        "rustci_build_info",
        "gauge",
        "Always 1; the version of this binary as a label.",
    );
    let _ = writeln!(
        out,
        "rustci_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    Ok(text(
        StatusCode::OK,
        body,
        "text/plain; version=0.0.4; charset=utf-8",
    ))
}

/// The families `/metrics` reads off the live replica (run on the driver:
/// bounded by `METRICS_QUEUE_SCAN_MAX` queued jobs and one line per node).
fn replica_metrics(out: &mut String, r: &Replica, now_ms: u64, leader_changes: u64) {
    let st = r.state();
    family(
        out,
        "rustci_raft_term",
        "gauge",
        "This replica's current term.",
    );
    let _ = writeln!(out, "rustci_raft_term {}", r.term());
    family(
        out,
        "rustci_raft_commit_index",
        "gauge",
        "Highest log index this replica knows committed.",
    );
    let _ = writeln!(out, "rustci_raft_commit_index {}", r.commit_index());
    family(
        out,
        "rustci_raft_applied_index",
        "gauge",
        "Highest log index this replica applied to its state.",
    );
    let _ = writeln!(out, "rustci_raft_applied_index {}", r.applied_index());
    family(
        out,
        "rustci_raft_leader_changes_total",
        "counter",
        "Leader elections (LeaderElected entries) this replica committed since it started.",
    );
    let _ = writeln!(out, "rustci_raft_leader_changes_total {leader_changes}");
    family(
        out,
        "rustci_raft_is_leader",
        "gauge",
        "1 when this replica is the leader.",
    );
    let _ = writeln!(
        out,
        "rustci_raft_is_leader {}",
        u8::from(r.leader() == Some(r.id()))
    );
    family(
        out,
        "rustci_replica_state",
        "gauge",
        "1 for the lifecycle state this replica is in, 0 for the others.",
    );
    let now_state = r.lifecycle();
    for s in rustci_core::replica::Lifecycle::ALL {
        let _ = writeln!(
            out,
            "rustci_replica_state{{state=\"{}\"}} {}",
            s.as_str(),
            u8::from(s == now_state)
        );
    }
    family(
        out,
        "rustci_ready",
        "gauge",
        "1 when this replica can serve writes.",
    );
    let _ = writeln!(out, "rustci_ready {}", u8::from(r.is_ready()));
    family(out, "rustci_jobs", "gauge", "Jobs by state.");
    for s in JobState::ALL {
        let _ = writeln!(
            out,
            "rustci_jobs{{state=\"{}\"}} {}",
            s.as_str(),
            st.job_count(s)
        );
    }
    family(
        out,
        "rustci_queue_length",
        "gauge",
        "Jobs waiting for placement.",
    );
    let _ = writeln!(out, "rustci_queue_length {}", st.queue.len());
    family(out, "rustci_nodes", "gauge", "Worker nodes by state.");
    for s in [
        NodeState::Ready,
        NodeState::Draining,
        NodeState::Down,
        NodeState::Left,
    ] {
        let n = st.nodes.values().filter(|n| n.state == s).count();
        let _ = writeln!(out, "rustci_nodes{{state=\"{}\"}} {n}", s.as_str());
    }
    let per_node = [
        (
            "rustci_node_capacity_cpus",
            "CPUs a node offers.",
            false,
            false,
        ),
        (
            "rustci_node_allocated_cpus",
            "CPUs held by a node's active attempts.",
            true,
            false,
        ),
        (
            "rustci_node_capacity_memory_bytes",
            "Memory a node offers, in bytes.",
            false,
            true,
        ),
        (
            "rustci_node_allocated_memory_bytes",
            "Memory held by a node's active attempts, in bytes.",
            true,
            true,
        ),
    ];
    for (name, help, allocated, memory) in per_node {
        family(out, name, "gauge", help);
        for n in st.nodes.values() {
            let res = if allocated { n.allocated } else { n.capacity };
            let value = if memory {
                (res.memory_mb * 1024 * 1024).to_string()
            } else {
                // Millicpus as cpus, exactly: 1500 -> 1.5.
                metrics::fixed(res.cpu_millis, 3)
            };
            let _ = writeln!(
                out,
                "{name}{{node=\"{}\"}} {value}",
                metrics::label_value(&n.name)
            );
        }
    }
    let oldest = st
        .queue
        .iter()
        .take(METRICS_QUEUE_SCAN_MAX)
        .filter_map(|k| st.job(k.job).map(|j| j.submitted_at))
        .min();
    let wait_us = oldest.map_or(0, |t| now_ms.saturating_sub(t) * 1000);
    family(out, "rustci_oldest_queued_job_wait_seconds", "gauge", &format!("How long the oldest queued job has waited since its submission (among the first {METRICS_QUEUE_SCAN_MAX} in placement order)."));
    let _ = writeln!(
        out,
        "rustci_oldest_queued_job_wait_seconds {}",
        metrics::seconds(wait_us)
    );
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
    family(
        out,
        "rustci_unplaceable_jobs",
        "gauge",
        "Queued jobs no ready node can take now, by reason.",
    );
    for class in ["constraints", "no_ready_node", "too_large"] {
        let _ = writeln!(
            out,
            "rustci_unplaceable_jobs{{reason=\"{class}\"}} {}",
            unplaceable.get(class).copied().unwrap_or(0)
        );
    }
    family(
        out,
        "rustci_heartbeats_received_total",
        "counter",
        "Agent heartbeats this replica received since it started.",
    );
    let _ = writeln!(
        out,
        "rustci_heartbeats_received_total {}",
        r.heartbeats_received()
    );
    family(
        out,
        "rustci_attempts_lost_total",
        "counter",
        "Attempts lost because their node died, restarted or was removed (over the whole log).",
    );
    let _ = writeln!(out, "rustci_attempts_lost_total {}", st.attempts_lost);
    family(
        out,
        "rustci_log_ignored_entries_total",
        "counter",
        "Entries applied as no-ops (over the whole log).",
    );
    let _ = writeln!(
        out,
        "rustci_log_ignored_entries_total {}",
        st.ignored_entries
    );
}

async fn events(cp: &ControlPlane, query: &BTreeMap<String, String>) -> ApiResult {
    let mut after = query_u64(query, "after")?.unwrap_or(0);
    let wait_secs = query_u64(query, "wait_secs")?
        .unwrap_or(0)
        .min(EVENTS_WAIT_SECS_MAX);
    let filter = events_filter(cp, query).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait_secs);
    loop {
        let mut applied = cp.applied.clone();
        if *applied.borrow() <= after && wait_secs > 0 {
            let _ = tokio::time::timeout_at(deadline, applied.wait_for(|i| *i > after)).await;
        }
        let upto = *applied.borrow();
        // A filtered page reads further to find its matches, within a bound.
        let read_max = if filter.is_empty() {
            EVENTS_PAGE_MAX
        } else {
            EVENTS_SCAN_MAX
        };
        let max = read_max.min(upto.saturating_sub(after) as usize);
        if max == 0 {
            return Ok(events_page(Vec::new(), after));
        }
        let log = cp.log.clone();
        let entries = tokio::task::spawn_blocking(move || log.read_after(after, max))
            .await
            .map_err(|_| ApiError::from(Unavailable))?
            .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "log_unreadable", e))?;
        let scanned_to = entries.last().map_or(after, |e| e.index);
        if filter.is_empty() {
            return Ok(events_page(entries, scanned_to));
        }
        let filter = filter.clone();
        let mut kept = cp
            .query(move |r| {
                let mut entries = entries;
                entries.retain(|e| filter.matches(r.state(), e));
                entries
            })
            .await?;
        if kept.len() > EVENTS_PAGE_MAX {
            kept.truncate(EVENTS_PAGE_MAX);
            let next = kept.last().map_or(after, |e| e.index);
            return Ok(events_page(kept, next));
        }
        // Nothing matched: answer at once while there is more to read (the
        // client follows `next`); wait on only once caught up.
        let caught_up = scanned_to >= upto;
        if !kept.is_empty() || !caught_up || tokio::time::Instant::now() >= deadline {
            return Ok(events_page(kept, scanned_to));
        }
        after = scanned_to;
    }
}

/// The `job` and `node` filters of `GET /v1/events`: 400 for a malformed
/// one, 404 for a job that does not exist.
async fn events_filter(
    cp: &ControlPlane,
    query: &BTreeMap<String, String>,
) -> Result<EventFilter, ApiError> {
    let job = query_u64(query, "job")?.map(JobId);
    let node = query.get("node").cloned();
    if let Some(name) = &node {
        rustci_core::validate::validate_node_name(name).map_err(|e| {
            ApiError::bad_request(
                "invalid_query",
                format!("query parameter node={name:?}: {e}"),
            )
        })?;
    }
    if let Some(id) = job {
        if !cp.query(move |r| r.state().job(id).is_some()).await? {
            return Err(ApiError::not_found(format!("job {id} not found")));
        }
    }
    Ok(EventFilter { job, node })
}

fn events_page(entries: Vec<rustci_core::event::Entry>, next: u64) -> Response<Body> {
    let events = entries.iter().map(event_json).collect();
    json(StatusCode::OK, &EventList { events, next })
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
            return Ok(text(StatusCode::OK, Bytes::new(), LOG_CONTENT_TYPE));
        }
        // Queued with no attempt yet: follow waits for the first one.
        return Ok(stream_response(follow_logs(cp.clone(), id, None)));
    };
    if !follow {
        let path = cp.output_path(id, attempt);
        // Opened here so that an unreadable file is an error, not an
        // empty answer; then streamed from disk a chunk at a time, as
        // fast as the client reads (never the whole file in memory).
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "output_unreadable",
                    format!("cannot read {}: {e}", path.display()),
                ))
            }
        };
        let Some(file) = file else {
            // Never served as a complete empty log if it was cut short.
            let note = if crate::disk::incomplete_path(&path).exists() {
                Bytes::from_static(crate::disk::OUTPUT_INCOMPLETE_MARKER.as_bytes())
            } else {
                Bytes::new()
            };
            return Ok(text(StatusCode::OK, note, LOG_CONTENT_TYPE));
        };
        let file = file.into_std().await;
        let (tx, rx) = mpsc::channel(1);
        count_large_answer();
        tokio::spawn(async move {
            if send_file(&tx, file, &mut 0).await.is_ok() {
                send_incomplete_note(&tx, &path).await;
            }
        });
        return Ok(stream_response(rx));
    }
    Ok(stream_response(follow_logs(cp.clone(), id, Some(attempt))))
}

/// Log chunk reads from disk in progress at once, over all readers.
pub const LOG_READS_CONCURRENT: usize = 8;
static LOG_READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(LOG_READS_CONCURRENT);

/// Job output is whatever bytes the job wrote: no charset is claimed.
const LOG_CONTENT_TYPE: &str = "text/plain";

fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let mut resp = Response::new(ChannelBody(rx).boxed());
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(LOG_CONTENT_TYPE));
    resp
}

/// Streams an attempt's output file as it grows, until the attempt has ended
/// and everything written has been sent.
fn follow_logs(cp: ControlPlane, id: JobId, attempt: Option<u32>) -> mpsc::Receiver<Bytes> {
    // One chunk in flight: a reader that stops reading stops the reads.
    let (tx, rx) = mpsc::channel(1);
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
                if let Some(n) = attempt {
                    send_incomplete_note(&tx, &cp.output_path(id, n)).await;
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(LOG_FOLLOW_POLL_MS)).await;
        }
    });
    rx
}

/// When the output at `path` was cut short and not even its last line
/// could say so (a full disk), says so at the end of what is served.
async fn send_incomplete_note(tx: &mpsc::Sender<Bytes>, path: &std::path::Path) {
    if tokio::fs::try_exists(crate::disk::incomplete_path(path))
        .await
        .unwrap_or(false)
    {
        let _ = tx
            .send(Bytes::from_static(
                crate::disk::OUTPUT_INCOMPLETE_MARKER.as_bytes(),
            ))
            .await;
    }
}

/// Sends the bytes of `path` past `offset`; Err when the client went away.
async fn send_new_output(
    tx: &mpsc::Sender<Bytes>,
    path: &std::path::Path,
    offset: &mut u64,
) -> Result<(), ()> {
    let Ok(file) = tokio::fs::File::open(path).await else {
        return Ok(());
    };
    send_file(tx, file.into_std().await, offset).await
}

/// Sends `file` from `offset` to its end a chunk at a time, each read only
/// once the previous one was taken; Err when the client went away.
async fn send_file(
    tx: &mpsc::Sender<Bytes>,
    file: std::fs::File,
    offset: &mut u64,
) -> Result<(), ()> {
    let file = Arc::new(file);
    loop {
        // Wait for room before reading, so an unread response holds no
        // more than the chunk in the channel.
        let permit = tx.reserve().await.map_err(|_| ())?;
        let chunk = {
            // Each read takes a blocking thread: a thousand readers must
            // not start hundreds of them.
            let _reading = LOG_READS.acquire().await.map_err(|_| ())?;
            let (file, at) = (file.clone(), *offset);
            tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let mut buf = bytes::BytesMut::zeroed(LOG_CHUNK_BYTES);
                let n = file.read_at(&mut buf, at).unwrap_or(0);
                buf.truncate(n);
                buf.freeze()
            })
            .await
            .map_err(|_| ())?
        };
        if chunk.is_empty() {
            return Ok(());
        }
        *offset += chunk.len() as u64;
        permit.send(chunk);
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
