//! The CLI's HTTP client for the running node's local API: hyper over one TCP connection per
//! call, JSON in and out. Chunked and streamed answers are read whole; an answer that is not
//! JSON is an error that shows what came back.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;

pub type ClientError = Box<dyn std::error::Error + Send + Sync>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Most of an answer the CLI reads: its answers are status documents, never data.
const MAX_ANSWER: usize = 64 << 20;

/// One call to the node as its admin: the status and the JSON answer (`null` when empty).
pub async fn request(
    node: SocketAddr,
    password: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Option<Duration>,
) -> Result<(u16, Value), ClientError> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(node))
        .await
        .map_err(|_| format!("cannot reach the node at {node}: timed out"))?
        .map_err(|e| format!("cannot reach the node at {node} (is it running?): {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let auth = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("admin:{password}"),
    );
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, node.to_string())
        .header(AUTHORIZATION, format!("Basic {auth}"))
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))?;
    let exchange = async {
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await?
            .to_bytes();
        Ok::<_, ClientError>((status, body))
    };
    let (status, body) = match timeout {
        Some(t) => tokio::time::timeout(t, exchange)
            .await
            .map_err(|_| format!("{method} {path}: the node did not answer within {t:?}"))??,
        None => exchange.await?,
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok((status, Value::Null));
    }
    let v = serde_json::from_slice(&body).map_err(|e| {
        format!(
            "{method} {path}: HTTP {status} with an answer that is not JSON ({e}): {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )
    })?;
    Ok((status, v))
}

/// [`request`] from synchronous code (the commands other than `replicate`).
pub fn request_blocking(
    node: SocketAddr,
    password: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Option<Duration>,
) -> Result<(u16, Value), ClientError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(request(node, password, method, path, body, timeout))
}
