//! What a web browser may make this server do on a page's behalf: nothing.
//!
//! A page on any site can make a browser send a "simple" request (a `POST` with a `text/plain`
//! body, no custom header) to any address, the server's loopback one included, and the
//! browser asks nobody first. With tokens on, such a request has no token and is refused; with
//! `auth = "none"` (loopback only) it would be an admin. Two things keep browsers out:
//!
//! - **Cross-site requests.** A request that changes something (not `GET`, `HEAD` or
//!   `OPTIONS`) is refused when the browser says another site's page made it
//!   (`Sec-Fetch-Site: cross-site` or `same-site`), or when its `Origin` is not the address it
//!   was sent to. Clients that are not browsers send neither header.
//! - **DNS rebinding.** A page whose own name the attacker points at 127.0.0.1 is, to the
//!   browser, the same origin as this server, so the checks above pass. With `auth = "none"`,
//!   a request addressed (`Host`, or the HTTP/2 authority) to a name that is not `localhost`
//!   or a loopback address is refused, probes excepted: a rebound name is not one. (A browser
//!   always says where it sends a request; only other clients may leave it out.)

use std::net::IpAddr;

use axum::extract::Request;
use axum::http::{Method, header};

use domain::limits::clip;

use crate::ApiError;

static SEC_FETCH_SITE: axum::http::HeaderName =
    axum::http::HeaderName::from_static("sec-fetch-site");

/// Why `req` is refused, if it is: see the module's documentation. `api` says whether it goes
/// to an API route (the console checks its forms itself, and is navigated to from other sites);
/// `loopback_only` whether authentication is off.
pub(crate) fn refusal(req: &Request, api: bool, loopback_only: bool) -> Option<ApiError> {
    let host = addressed_to(req);
    if let Some(host) = host.filter(|h| loopback_only && !is_loopback(h)) {
        return Some(refused(format!(
            "the request is addressed to host {}: with auth = \"none\" this server answers only \
             requests addressed to localhost or a loopback address (a page of another site \
             could otherwise reach it through a name it points here)",
            clip(host)
        )));
    }
    if !api || matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    let headers = req.headers();
    if let Some(site) = headers.get(&SEC_FETCH_SITE).and_then(|v| v.to_str().ok())
        && matches!(site, "cross-site" | "same-site")
    {
        return Some(refused(format!(
            "a web page of another site made this request (Sec-Fetch-Site: {site}); call the \
             API from a client or the console, not from another site's page"
        )));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let same = origin
            .to_str()
            .ok()
            .and_then(|o| o.split_once("://"))
            .is_some_and(|(_, o)| host.is_some_and(|h| o.eq_ignore_ascii_case(h)));
        if !same {
            let shown = origin.to_str().map_or("(not text)".into(), clip);
            return Some(refused(format!(
                "the request comes from a page of {shown}, not of this server; call the API \
                 from a client or the console, not from another site's page"
            )));
        }
    }
    None
}

fn refused(why: String) -> ApiError {
    ApiError::new(tonic::Code::PermissionDenied, why)
}

/// The `host[:port]` the request was sent to: the `Host` header, or HTTP/2's authority.
fn addressed_to(req: &Request) -> Option<&str> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
}

/// Whether `host[:port]` names this machine's loopback: `localhost` or an address in
/// 127.0.0.0/8 or `::1` (bracketed when a port follows).
fn is_loopback(host: &str) -> bool {
    // What local clients send, without parsing.
    if let Some(port) = ["127.0.0.1:", "localhost:", "[::1]:"]
        .iter()
        .find_map(|p| host.strip_prefix(p))
    {
        return is_port(port);
    }
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((v6, "")) => v6,
            Some((v6, port)) if port.strip_prefix(':').is_some_and(is_port) => v6,
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => host,
            None => host,
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names() {
        for ok in [
            "localhost",
            "LOCALHOST:7420",
            "localhost.:7420",
            "127.0.0.1",
            "127.0.0.1:7420",
            "127.9.8.7:1",
            "[::1]",
            "[::1]:7420",
        ] {
            assert!(is_loopback(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:7420",
            "localhost.evil.example",
            "127.0.0.1.nip.io:7420",
            "10.0.0.1:7420",
            "[::2]:7420",
            "[::1]x",
            "::1",
            "localhost:",
            "localhost:x",
            "0.0.0.0:7420",
        ] {
            assert!(!is_loopback(bad), "{bad}");
        }
    }
}
