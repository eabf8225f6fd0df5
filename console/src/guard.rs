//! The console's defences, applied to every request before any page sees it: the `Host` must be
//! the console's own (DNS rebinding), a change must come from the console's own pages
//! (`Sec-Fetch-Site`, else `Origin`), a page needs the session cookie, and every response gets
//! the security headers. The decisions are pure functions of the request's headers; the
//! middleware only applies them.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::pages::layout;
use crate::Console;

/// The Content-Security-Policy of every response: scripts, styles and connections from the
/// console itself only, no inline script or style, no eval, no framing, forms only to itself.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; \
     base-uri 'none'; frame-ancestors 'none'";

/// The `Host` values the console answers to.
#[derive(Debug, Clone)]
pub struct Origins {
    /// Exact `host:port` values, lower case.
    hosts: Vec<String>,
    /// Bound to every address (`--insecure-listen-anywhere` on `0.0.0.0` or `::`): any IP
    /// literal with the console's port is its own, a DNS name is not.
    any_ip_literal: bool,
    port: u16,
}

impl Origins {
    /// The origins of a console listening on `addr`: its loopback names when it is on
    /// loopback, else the address itself.
    pub fn of(addr: SocketAddr) -> Origins {
        let port = addr.port();
        let ip = addr.ip();
        let mut hosts = vec![host_of(ip, port)];
        if ip.is_loopback() {
            hosts = vec![
                format!("127.0.0.1:{port}"),
                format!("localhost:{port}"),
                format!("[::1]:{port}"),
            ];
        }
        Origins {
            hosts,
            any_ip_literal: ip.is_unspecified(),
            port,
        }
    }

    /// Whether `host` (a `Host` header) names this console.
    pub fn allows(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        if self.hosts.contains(&host) {
            return true;
        }
        if !self.any_ip_literal {
            return false;
        }
        let Ok(addr) = host.parse::<SocketAddr>() else {
            return false;
        };
        addr.port() == self.port
    }
}

fn host_of(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

/// Why a request was refused before any page saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No `Host`, or one that is not the console's own.
    ForeignHost,
    /// A change (not GET or HEAD) that did not come from the console's own pages.
    CrossSite,
    /// No live session cookie.
    NoSession,
}

fn header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The decision on a request's headers: `Ok` to go on to the pages.
pub fn check(origins: &Origins, method: &Method, headers: &HeaderMap) -> Result<(), Refusal> {
    let host = header(headers, &header::HOST).ok_or(Refusal::ForeignHost)?;
    if !origins.allows(host) {
        return Err(Refusal::ForeignHost);
    }
    if method == Method::GET || method == Method::HEAD {
        return Ok(());
    }
    // A browser says where a request comes from; a change must come from the console itself.
    let fetch_site = HeaderName::from_static("sec-fetch-site");
    if let Some(site) = header(headers, &fetch_site) {
        return match site {
            "same-origin" => Ok(()),
            _ => Err(Refusal::CrossSite),
        };
    }
    match header(headers, &header::ORIGIN) {
        Some(origin) if origin.eq_ignore_ascii_case(&format!("http://{host}")) => Ok(()),
        _ => Err(Refusal::CrossSite),
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// Paths served without a session: the login exchange and the static assets (which hold
/// nothing of the fleet).
fn is_public(path: &str) -> bool {
    path == "/login" || path.starts_with("/assets/")
}

/// The middleware: refuses what [`check`] refuses, and what has no session; adds the security
/// headers to every response, refusals included.
pub async fn guard(State(console): State<Arc<Console>>, request: Request, next: Next) -> Response {
    let decision = check(&console.origins, request.method(), request.headers()).and_then(|()| {
        let path = request.uri().path();
        let session = cookie(request.headers(), &console.cookie_name);
        if is_public(path) || session.is_some_and(|s| console.sessions.is_valid(s, Instant::now()))
        {
            Ok(())
        } else {
            Err(Refusal::NoSession)
        }
    });
    let mut response = match decision {
        Ok(()) => next.run(request).await,
        Err(refusal) => refused(refusal),
    };
    secure(response.headers_mut());
    response
}

fn refused(refusal: Refusal) -> Response {
    match refusal {
        Refusal::ForeignHost => (
            StatusCode::FORBIDDEN,
            layout::bare(
                "Unknown host",
                "This console answers only to its own address (127.0.0.1 or localhost with its \
                 port). A page that reached it under another name may be a DNS rebinding attack.",
            ),
        )
            .into_response(),
        Refusal::CrossSite => (
            StatusCode::FORBIDDEN,
            layout::bare(
                "Refused: not from this console",
                "A change must be made from the console's own pages. This request came from \
                 another site (or did not say where it came from), so nothing was changed.",
            ),
        )
            .into_response(),
        Refusal::NoSession => (
            StatusCode::UNAUTHORIZED,
            layout::bare(
                "Log in first",
                "Open the login link that `fleetctl console` printed when it started \
                 (console: http://127.0.0.1:PORT/login?token=…). A link works once and for 15 \
                 minutes: press Enter in the terminal where fleetctl console runs to get a new \
                 one, or start it again.",
            ),
        )
            .into_response(),
    }
}

/// Adds the security headers.
pub fn secure(headers: &mut HeaderMap) {
    let set = [
        ("content-security-policy", CONTENT_SECURITY_POLICY),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
        ("x-frame-options", "DENY"),
        ("cross-origin-opener-policy", "same-origin"),
        ("cross-origin-resource-policy", "same-origin"),
    ];
    for (name, value) in set {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        map
    }

    #[test]
    fn loopback_consoles_answer_to_their_loopback_names_only() {
        let origins = Origins::of("127.0.0.1:8080".parse().unwrap());
        for host in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST:8080",
            "[::1]:8080",
        ] {
            assert!(origins.allows(host), "{host}");
        }
        for host in [
            "evil.example:8080",
            "127.0.0.1:8081",
            "localhost",
            "127.0.0.2:8080",
            "",
        ] {
            assert!(!origins.allows(host), "{host}");
        }
        let anywhere = Origins::of("0.0.0.0:8080".parse().unwrap());
        assert!(anywhere.allows("192.0.2.7:8080"));
        assert!(!anywhere.allows("rebound.example:8080"));
        assert!(!anywhere.allows("192.0.2.7:9"));
    }

    #[test]
    fn changes_must_come_from_the_console_itself() {
        let origins = Origins::of("127.0.0.1:8080".parse().unwrap());
        let host = ("host", "127.0.0.1:8080");
        let post = Method::POST;
        assert_eq!(check(&origins, &Method::GET, &headers(&[host])), Ok(()));
        assert_eq!(
            check(
                &origins,
                &post,
                &headers(&[host, ("sec-fetch-site", "same-origin")])
            ),
            Ok(())
        );
        for site in ["cross-site", "same-site", "none"] {
            let h = headers(&[
                host,
                ("sec-fetch-site", site),
                ("origin", "http://127.0.0.1:8080"),
            ]);
            assert_eq!(
                check(&origins, &post, &h),
                Err(Refusal::CrossSite),
                "{site}"
            );
        }
        let h = headers(&[host, ("origin", "http://127.0.0.1:8080")]);
        assert_eq!(check(&origins, &post, &h), Ok(()));
        let h = headers(&[host, ("origin", "http://evil.example")]);
        assert_eq!(check(&origins, &post, &h), Err(Refusal::CrossSite));
        let h = headers(&[host, ("origin", "null")]);
        assert_eq!(check(&origins, &post, &h), Err(Refusal::CrossSite));
        assert_eq!(
            check(&origins, &post, &headers(&[host])),
            Err(Refusal::CrossSite)
        );
        assert_eq!(
            check(
                &origins,
                &Method::GET,
                &headers(&[("host", "evil.example")])
            ),
            Err(Refusal::ForeignHost)
        );
        assert_eq!(
            check(&origins, &Method::GET, &HeaderMap::new()),
            Err(Refusal::ForeignHost)
        );
    }

    #[test]
    fn cookies_are_found_by_name() {
        let h = headers(&[("cookie", "a=1; fleet_console_80=abc"), ("cookie", "b=2")]);
        assert_eq!(cookie(&h, "fleet_console_80"), Some("abc"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "fleet_console"), None);
    }
}
