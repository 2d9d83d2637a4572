//! HTTP/1.1 by hand over a raw socket, for tests that need the byte stream itself
//! (pipelining, half-sent heads, a socket kept across requests). A response is read to its
//! exact end and no further, so a next response already on the socket stays there.

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::PATIENCE;

/// Reads one response (Content-Length, chunked, or neither: no body); returns its status
/// line and body. Panics on a close mid-response or past `PATIENCE`.
pub async fn read_response(s: &mut TcpStream) -> (String, String) {
    tokio::time::timeout(PATIENCE, read_one(s)).await.unwrap_or_else(|_| panic!("no full response within {PATIENCE:?}"))
}

/// Sends `GET path` with `Host: a` and reads its response.
pub async fn get_on(s: &mut TcpStream, path: &str) -> (String, String) {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes()).await.unwrap();
    read_response(s).await
}

async fn read_one(s: &mut TcpStream) -> (String, String) {
    let head = read_line_block(s).await;
    let lower = head.to_ascii_lowercase();
    let body = if lower.contains("\r\ntransfer-encoding: chunked") {
        let mut body = Vec::new();
        loop {
            let line = read_line(s).await;
            let n = usize::from_str_radix(line.trim(), 16).unwrap();
            if n == 0 {
                // The empty line after the last chunk (no trailers are sent here).
                read_line(s).await;
                break;
            }
            let start = body.len();
            body.resize(start + n, 0);
            read_exact(s, &mut body[start..]).await;
            read_line(s).await;
        }
        body
    } else {
        let len: usize = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
            .unwrap_or(0);
        let mut body = vec![0; len];
        read_exact(s, &mut body).await;
        body
    };
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The head up to and without its closing empty line, read a byte at a time.
async fn read_line_block(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(read_byte(s, &head).await);
    }
    head.truncate(head.len() - 4);
    String::from_utf8_lossy(&head).into_owned()
}

async fn read_line(s: &mut TcpStream) -> String {
    let mut line = Vec::new();
    while !line.ends_with(b"\r\n") {
        line.push(read_byte(s, &line).await);
    }
    String::from_utf8_lossy(&line[..line.len() - 2]).into_owned()
}

async fn read_byte(s: &mut (impl AsyncRead + Unpin), so_far: &[u8]) -> u8 {
    match s.read_u8().await {
        Ok(b) => b,
        Err(e) => panic!("connection closed mid-response ({e}): {:?}", String::from_utf8_lossy(so_far)),
    }
}

async fn read_exact(s: &mut TcpStream, buf: &mut [u8]) {
    if let Err(e) = s.read_exact(buf).await {
        panic!("connection closed mid-body: {e}");
    }
}
