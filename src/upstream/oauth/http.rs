//! The one kind of HTTP request OAuth needs: an `application/x-www-form-urlencoded` POST to a
//! token or device endpoint, over HTTPS (verified like every TLS connection popbridge makes)
//! or plain HTTP to loopback, with a deadline and a bounded answer. hyper does the HTTP.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::settings::Url;
use crate::upstream::tls;

/// Largest answer read from an endpoint.
const MAX_BODY: usize = 64 * 1024;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("bad endpoint: {0}")]
    Url(String),
    #[error("{0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("cannot reach {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("TLS with {0} failed: {1}")]
    Tls(String, String),
    #[error("HTTP with {0} failed: {1}")]
    Http(String, String),
}

/// An endpoint's answer: status and body (at most 64 KiB).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// POSTs `form` to `url` (HTTP basic authentication with `basic`, when given).
pub async fn post_form(
    url: &str,
    form: &[(&str, &str)],
    basic: Option<(&str, &str)>,
    timeout: Duration,
) -> Result<Answer, HttpError> {
    let parsed = Url::parse(url).map_err(HttpError::Url)?;
    super::settings::check_url(url).map_err(HttpError::Url)?;
    let host = parsed.host.to_owned();
    let work = async {
        let tcp = TcpStream::connect((parsed.host, parsed.port))
            .await
            .map_err(|e| HttpError::Connect(host.clone(), e))?;
        let _ = tcp.set_nodelay(true);
        if parsed.scheme == "https" {
            let config = tls::client_config(None)
                .map_err(|e| HttpError::Tls(host.clone(), e.to_string()))?;
            let name = ServerName::try_from(host.clone())
                .map_err(|e| HttpError::Tls(host.clone(), e.to_string()))?;
            let stream = TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| HttpError::Tls(host.clone(), e.to_string()))?;
            send(TokioIo::new(stream), &parsed, form, basic).await
        } else {
            send(TokioIo::new(tcp), &parsed, form, basic).await
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| HttpError::Timeout(host.clone(), timeout))?
}

async fn send<IO>(
    io: IO,
    url: &Url<'_>,
    form: &[(&str, &str)],
    basic: Option<(&str, &str)>,
) -> Result<Answer, HttpError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let fail = |e: &dyn std::fmt::Display| HttpError::Http(url.host.to_owned(), e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| fail(&e))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let authority = if matches!((url.scheme, url.port), ("https", 443) | ("http", 80)) {
        url.host.to_owned()
    } else {
        format!("{}:{}", url.host, url.port)
    };
    let mut request = Request::post(url.path)
        .header(hyper::header::HOST, authority)
        .header(
            hyper::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .header(hyper::header::ACCEPT, "application/json");
    if let Some((user, password)) = basic {
        use base64::Engine as _;
        let pair = format!("{}:{}", form_encode(user), form_encode(password));
        let value = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        );
        request = request.header(hyper::header::AUTHORIZATION, value);
    }
    let body = encode_form(form);
    let request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| fail(&e))?;
    let response = sender.send_request(request).await.map_err(|e| fail(&e))?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| fail(&e))?
        .to_bytes();
    driver.abort();
    Ok(Answer { status, body })
}

/// `application/x-www-form-urlencoded` (the WHATWG encoding: unreserved kept, space `+`).
pub fn encode_form(form: &[(&str, &str)]) -> String {
    form.iter()
        .map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn forms_are_encoded() {
        assert_eq!(
            encode_form(&[("grant_type", "client_credentials"), ("scope", "a b/c&d=é")]),
            "grant_type=client_credentials&scope=a+b%2Fc%26d%3D%C3%A9"
        );
    }

    #[tokio::test]
    async fn a_form_post_and_its_bounded_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.ends_with(b"b=2") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 27\r\n\r\n{\"error\":\"invalid_grant\"}\r\n")
                .await
                .unwrap();
            String::from_utf8(got).unwrap()
        });
        let url = format!("http://127.0.0.1:{port}/token");
        let a = post_form(
            &url,
            &[("a", "1"), ("b", "2")],
            Some(("id", "sec ret")),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(a.status, 400);
        assert!(a.body.starts_with(b"{\"error\":\"invalid_grant\"}"));
        let request = server.await.unwrap();
        assert!(request.starts_with("POST /token HTTP/1.1\r\n"), "{request}");
        assert!(
            request.contains("authorization: Basic aWQ6c2VjK3JldA==\r\n"),
            "{request}"
        );
        assert!(request.ends_with("\r\n\r\na=1&b=2"), "{request}");
        // Silence hits the deadline; plain http elsewhere than loopback is refused.
        let quiet = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://127.0.0.1:{}/t", quiet.local_addr().unwrap().port());
        assert!(matches!(
            post_form(&url, &[], None, Duration::from_millis(200)).await,
            Err(HttpError::Timeout(..))
        ));
        assert!(matches!(
            post_form("http://id.example/t", &[], None, Duration::from_secs(1)).await,
            Err(HttpError::Url(_))
        ));
    }
}
