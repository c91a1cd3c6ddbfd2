//! A follower's side of "any replica serves the API": requests about jobs
//! and nodes are relayed to the leader and its answer is relayed back,
//! streamed (a followed log stays followed).
//!
//! A relayed request carries [`FORWARDED_HEADER`]: a replica that gets one
//! but does not lead answers 503 instead of relaying it again, so two
//! replicas with stale views of the leader never bounce a request between
//! them.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONNECTION, HOST};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::control::ControlPlane;
use crate::peer::FORWARDED_HEADER;
use crate::server::{read_body_max, ApiError, ApiResult, BODY_BYTES_MAX};

/// How long reaching the leader may take before the request gets 503.
pub const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the leader may take to start answering a relayed request
/// (a long-polled or followed answer then streams as long as it lasts).
pub const FORWARD_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

fn no_leader(message: String) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_leader", message)
}

/// Relays `req` to the leader this replica knows of; 503 when it knows
/// none, cannot reach it, or `req` was relayed to it already.
pub async fn to_leader(cp: &ControlPlane, req: Request<Incoming>) -> ApiResult {
    let me = cp.info.id;
    if let Some(from) = req.headers().get(FORWARDED_HEADER) {
        let from = from.to_str().unwrap_or("?").to_string();
        return Err(no_leader(format!(
            "replica {me} does not lead (anymore): replica {from} relayed this request to it; retry shortly"
        )));
    }
    let leader = cp.leader.borrow().leader;
    let Some((leader, addr)) = leader
        .filter(|&l| l != me)
        .and_then(|l| Some((l, cp.info.addr_of(l)?.to_string())))
    else {
        return Err(no_leader(format!(
            "replica {me} knows no leader yet (an election is under way); retry shortly"
        )));
    };
    let (mut parts, body) = req.into_parts();
    let body = read_body_max(Request::from_parts(parts.clone(), body), BODY_BYTES_MAX).await?;
    let unreachable = |why: String| {
        no_leader(format!(
            "cannot reach the leader, replica {leader} at {addr}: {why}"
        ))
    };
    let stream = tokio::time::timeout(FORWARD_CONNECT_TIMEOUT, TcpStream::connect(&addr))
        .await
        .map_err(|_| unreachable("connect timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    parts.headers.remove(CONNECTION);
    if let Ok(host) = HeaderValue::from_str(&addr) {
        parts.headers.insert(HOST, host);
    }
    parts
        .headers
        .insert(FORWARDED_HEADER, HeaderValue::from(me));
    parts.extensions = Default::default();
    let relayed = Request::from_parts(parts, Full::new(body));
    // A leader cut off mid-request may never answer: once this replica
    // learns of another leader (it may be the new one itself), the
    // request is given up instead of waiting out the timeout.
    let mut view = cp.leader.clone();
    let leader_changed = async move {
        if view.wait_for(|v| v.leader != Some(leader)).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let answer = tokio::select! {
        answer = tokio::time::timeout(FORWARD_ANSWER_TIMEOUT, sender.send_request(relayed)) => answer
            .map_err(|_| unreachable(format!("no answer within {FORWARD_ANSWER_TIMEOUT:?}")))?
            .map_err(|e| unreachable(e.to_string()))?,
        _ = leader_changed => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "leadership_lost",
                format!(
                    "the leader changed while this request was relayed to replica {leader} at {addr}: it may or may not have been applied; retry it (a submission with the same Idempotency-Key)"
                ),
            ));
        }
    };
    let (parts, body) = answer.into_parts();
    Ok(Response::from_parts(parts, Relay(body).boxed()))
}

/// The leader's answer body, relayed as it arrives; a failure mid-way ends
/// it (the client sees a cut answer, as if the leader had died).
struct Relay(Incoming);

impl hyper::body::Body for Relay {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match Pin::new(&mut self.0).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(Some(Err(e))) => {
                tracing::debug!(error = %e, "the leader's relayed answer broke off");
                Poll::Ready(None)
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.0.size_hint()
    }
}
