//! Pure: routing and admission of one upgrade request. Given the request head and the server's
//! state (draining, full), [`admit`] says where the connection goes ([`Route`]) and what its
//! token allows ([`Grant`]), or why it is refused ([`Refusal`], with the plain HTTP answer the
//! client gets). No I/O and no shared state (the token check reads the clock): the handshake
//! reads the request and sends what this decides.

use crate::auth::{Access, Auth, Grant};
use crate::protocol;
use crate::transport::upgrade::{self, Head};

/// `Retry-After` seconds on a 503.
const RETRY_AFTER_SECS: &str = "5";

/// Where an accepted upgrade goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Protocol,
    Raw(String),
}

/// Why an upgrade was refused, decided purely from the request and the server's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Draining,
    Full,
    ForbiddenOrigin,
    NotFound,
    Unauthorized,
    /// Raw mode on a channel the token does not let its holder subscribe to.
    ForbiddenChannel,
}

impl Refusal {
    pub fn metric_label(self) -> &'static str {
        match self {
            Refusal::Draining => "draining",
            Refusal::Full => "full",
            Refusal::ForbiddenOrigin => "forbidden_origin",
            Refusal::NotFound => "not_found",
            Refusal::Unauthorized => "unauthorized",
            Refusal::ForbiddenChannel => "forbidden_channel",
        }
    }

    /// The HTTP answer; `detail` says what was wrong (the origin, the path, the token, the
    /// channel).
    pub fn response(self, detail: &str) -> Vec<u8> {
        let retry = [("Retry-After", RETRY_AFTER_SECS)];
        match self {
            Refusal::Draining => {
                upgrade::response(503, "Service Unavailable", &retry, "server is draining; connect to another server\n")
            }
            Refusal::Full => {
                upgrade::response(503, "Service Unavailable", &retry, "server is at --max-connections; retry later\n")
            }
            Refusal::ForbiddenOrigin => {
                upgrade::response(403, "Forbidden", &[], &format!("origin {detail:?} is not allowed\n"))
            }
            Refusal::NotFound => upgrade::response(404, "Not Found", &[], &format!("{detail}\n")),
            Refusal::Unauthorized => {
                upgrade::response(401, "Unauthorized", &[("WWW-Authenticate", "Bearer")], &format!("{detail}\n"))
            }
            Refusal::ForbiddenChannel => upgrade::response(403, "Forbidden", &[], &format!("{detail}\n")),
        }
    }
}

/// Routing and admission: what to do with one upgrade request, and, with `auth`, what its token
/// allows. Checked in this order: draining, full, origin, path, token, and for raw mode the
/// token's right to subscribe to the path's channel (a raw connection is its subscription).
pub fn admit(
    req: &Head,
    allowed_origins: &[String],
    auth: Option<&Auth>,
    draining: bool,
    full: bool,
) -> Result<(Route, Option<Grant>), (Refusal, String)> {
    if draining {
        return Err((Refusal::Draining, String::new()));
    }
    if full {
        return Err((Refusal::Full, String::new()));
    }
    if let Some(origin) = req.origin.as_deref()
        && !allowed_origins.is_empty()
        && !allowed_origins.iter().any(|o| o == origin)
    {
        return Err((Refusal::ForbiddenOrigin, origin.to_owned()));
    }
    let route = match req.path.as_str() {
        "/ws" => Route::Protocol,
        path => match path.strip_prefix("/ws/") {
            Some(channel) => match protocol::validate_channel(channel) {
                Ok(()) => Route::Raw(channel.to_owned()),
                Err(why) => return Err((Refusal::NotFound, format!("invalid channel in path: {why}"))),
            },
            None => {
                return Err((Refusal::NotFound, format!("no WebSocket endpoint at {path}; use /ws or /ws/<channel>")));
            }
        },
    };
    let Some(auth) = auth else { return Ok((route, None)) };
    let grant = auth
        .check(crate::auth::token(req.authorization.as_deref(), req.query.as_deref()))
        .map_err(|why| (Refusal::Unauthorized, why))?;
    if let Route::Raw(channel) = &route
        && let Err(denied) = grant.check(Access::Subscribe, channel, std::time::SystemTime::now())
    {
        return Err((Refusal::ForbiddenChannel, denied.to_string()));
    }
    Ok((route, Some(grant)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(path: &str) -> Head {
        Head { path: path.into(), ..Default::default() }
    }

    #[test]
    fn routes_both_modes() {
        assert_eq!(admit(&req("/ws"), &[], None, false, false), Ok((Route::Protocol, None)));
        assert_eq!(admit(&req("/ws/news"), &[], None, false, false), Ok((Route::Raw("news".into()), None)));
    }

    #[test]
    fn raw_mode_needs_the_right_to_subscribe_to_its_channel() {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let secret = b"0123456789abcdef0123456789abcdef";
        let auth = Auth::new(secret, None, None).unwrap();
        let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 60;
        let claims = serde_json::json!({"exp": exp, "channels": {"subscribe": ["news"], "publish": ["chat"]}});
        let token = encode(&Header::default(), &claims, &EncodingKey::from_secret(secret).unwrap()).unwrap();
        let with_token = |path: &str| Head {
            path: path.into(),
            authorization: Some(format!("Bearer {token}")),
            ..Default::default()
        };
        let (route, grant) = admit(&with_token("/ws/news"), &[], Some(&auth), false, false).unwrap();
        assert_eq!(route, Route::Raw("news".into()));
        assert!(grant.unwrap().allows(Access::Publish, "chat"));
        let (refusal, why) = admit(&with_token("/ws/chat"), &[], Some(&auth), false, false).unwrap_err();
        assert_eq!(refusal, Refusal::ForbiddenChannel);
        assert!(why.contains("subscribing to \"chat\""), "{why}");
        let answer = String::from_utf8(refusal.response(&why)).unwrap();
        assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
        assert!(admit(&with_token("/ws"), &[], Some(&auth), false, false).is_ok(), "protocol mode: checked per op");
    }

    #[test]
    fn refusals_in_order_of_precedence() {
        let allowed = vec!["https://ok.example".to_owned()];
        let auth = Auth::new(b"0123456789abcdef0123456789abcdef", None, None).unwrap();
        let refusal =
            |r: &Head, auth: Option<&Auth>, draining, full| admit(r, &allowed, auth, draining, full).unwrap_err().0;
        let evil = Head { origin: Some("https://evil.example".into()), ..req("/nowhere") };
        assert_eq!(refusal(&evil, Some(&auth), true, true), Refusal::Draining);
        assert_eq!(refusal(&evil, Some(&auth), false, true), Refusal::Full);
        assert_eq!(refusal(&evil, Some(&auth), false, false), Refusal::ForbiddenOrigin);
        assert_eq!(refusal(&req("/nowhere"), Some(&auth), false, false), Refusal::NotFound);
        assert_eq!(refusal(&req("/ws"), Some(&auth), false, false), Refusal::Unauthorized);
        let ok = Head { origin: Some("https://ok.example".into()), ..req("/ws") };
        assert_eq!(admit(&ok, &allowed, None, false, false), Ok((Route::Protocol, None)));
        assert_eq!(
            admit(&req("/ws"), &allowed, None, false, false),
            Ok((Route::Protocol, None)),
            "no Origin header: not a browser"
        );
        let (r, why) = admit(&req("/ws/a%20b"), &[], None, false, false).unwrap_err();
        assert_eq!(r, Refusal::NotFound);
        assert!(why.contains("channel"), "{why}");
        assert_eq!(refusal(&req("/ws/"), None, false, false), Refusal::NotFound);
    }

    #[test]
    fn refusal_responses_carry_retry_after_on_503() {
        let r = String::from_utf8(Refusal::Full.response("")).unwrap();
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
        assert!(r.contains("\r\nRetry-After: 5\r\n"), "{r}");
        let r = String::from_utf8(Refusal::ForbiddenOrigin.response("https://evil.example")).unwrap();
        assert!(r.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{r}");
        assert!(r.ends_with("origin \"https://evil.example\" is not allowed\n"), "{r}");
    }
}
