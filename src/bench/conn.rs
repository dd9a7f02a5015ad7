//! One keep-alive HTTP/1.1 connection per load-tool worker.
//!
//! The load tools share the machine's cores with the server they measure,
//! so every microsecond the client spends is one the server does not get.
//! A general client (pool, URL parsing, redirects) costs several times
//! what this does; a worker here owns its connection and sends requests
//! on it back to back, the way `wrk` does.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

/// A connection to the server under test.
pub struct Conn {
    authority: String,
    send: http1::SendRequest<Full<Bytes>>,
}

impl Conn {
    /// Connects to the host and port of `base` (`http://host:port`).
    pub async fn open(base: &str) -> anyhow::Result<Conn> {
        let uri: hyper::Uri = base.parse()?;
        anyhow::ensure!(uri.scheme_str() == Some("http"), "the load tools speak plain http, not {base}");
        let authority = uri.authority().map(|a| a.to_string()).ok_or_else(|| anyhow::anyhow!("{base} names no host"))?;
        let stream = tokio::net::TcpStream::connect(&authority).await?;
        stream.set_nodelay(true)?;
        let (send, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Conn { authority, send })
    }

    /// `GET path_and_query`: the status and the whole body.
    pub async fn get(&mut self, path_and_query: &str) -> anyhow::Result<(StatusCode, Bytes)> {
        self.send(Method::GET, path_and_query, None).await
    }

    /// `POST path` with a JSON body: the status and the whole body.
    pub async fn post_json(&mut self, path: &str, body: Vec<u8>) -> anyhow::Result<(StatusCode, Bytes)> {
        self.send(Method::POST, path, Some(body)).await
    }

    async fn send(&mut self, method: Method, path: &str, body: Option<Vec<u8>>) -> anyhow::Result<(StatusCode, Bytes)> {
        self.send.ready().await?;
        let mut req = Request::builder().method(method).uri(path).header(HOST, &self.authority);
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(body.map(Bytes::from).unwrap_or_default()))?;
        let resp = self.send.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}
