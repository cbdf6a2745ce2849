//! Tokens: who may connect, which channels they may use, and until when.
//!
//! With `--jwt-secret`, an upgrade must carry an HS256 JWT signed with that secret, either as
//! `Authorization: Bearer <token>` (the scheme in any case) or, for browsers (which cannot set
//! headers on a WebSocket), as the `access_token` query parameter. Anything else is answered 401
//! before the upgrade. [`Auth::verify`] applies the same rules to a token sent later with the
//! `refresh` op.
//!
//! The rules, checked on the server's clock:
//!
//! * `exp` is required; a token is expired from the millisecond of `exp` on, with no leeway, and
//!   a connection is closed then (4001) unless it was refreshed.
//! * `nbf`, when present, must not be more than [`NBF_LEEWAY`] in the future.
//! * `aud` must name `--jwt-audience` and `iss` must be `--jwt-issuer` when those are set (the
//!   claim is then required); without the flag, the claim is ignored.
//! * `channels` says what the holder may do: `{"subscribe": [...], "publish": [...]}`, each a
//!   list of [`Pattern`]s. Subscribing covers the channel's history (resume with `since`). A
//!   token without the claim, or with an empty list, may do nothing on channels: deny is the
//!   default. Unknown keys in `channels` or a malformed pattern refuse the token, so a typo
//!   cannot quietly grant or deny.
//!
//! Pure apart from reading the clock in [`Auth::check`]; the token itself is never logged, and
//! no `Debug` here shows it or the secret.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::protocol::validate_channel;

/// Shortest secret accepted: HS256 keys must be at least as long as the hash (RFC 7518 §3.2).
pub const MIN_SECRET_LEN: usize = 32;
/// How far in the future `nbf` may be and still pass, for a minter whose clock runs a little
/// ahead of the server's. `exp` has no leeway: the connection ends when the token says.
pub const NBF_LEEWAY: Duration = Duration::from_secs(5);
/// Patterns per list, at most.
pub const MAX_PATTERNS: usize = 1024;

/// The verifier built from `--jwt-secret`, `--jwt-audience` and `--jwt-issuer`.
pub struct Auth {
    key: DecodingKey,
    validation: Validation,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth").field("aud", &self.validation.aud).field("iss", &self.validation.iss).finish()
    }
}

impl Auth {
    /// Fails on a secret shorter than [`MIN_SECRET_LEN`].
    pub fn new(secret: &[u8], audience: Option<&str>, issuer: Option<&str>) -> Result<Self, String> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(format!("--jwt-secret must be at least {MIN_SECRET_LEN} bytes (it has {})", secret.len()));
        }
        let key = DecodingKey::from_secret(secret).map_err(|e| e.to_string())?;
        let mut validation = Validation::new(Algorithm::HS256);
        // `exp` and `nbf` are checked here, in milliseconds and with the leeways above.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        let mut required = vec!["exp"];
        validation.validate_aud = audience.is_some();
        if let Some(aud) = audience {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        if let Some(iss) = issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Auth { key, validation })
    }

    /// The grant of an upgrade's token, or why there is none (the 401's text).
    pub fn check(&self, token: Option<&str>) -> Result<Grant, String> {
        let token = token.ok_or("missing token: send `Authorization: Bearer <jwt>` or `?access_token=<jwt>`")?;
        self.verify(token, SystemTime::now())
    }

    /// The grant of `token` at `now`, or why it is refused.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Grant, String> {
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| format!("invalid token: {}", describe(e.kind())))?
            .claims;
        if time_left(claims.exp, now).is_zero() {
            return Err("invalid token: expired (`exp` has passed)".into());
        }
        if let Some(nbf) = claims.nbf
            && nbf.saturating_mul(1000) > unix_millis(now) + NBF_LEEWAY.as_millis() as u64
        {
            return Err(format!("invalid token: not valid before {nbf} (`nbf`)"));
        }
        let (subscribe, publish, claimed) = match claims.channels {
            Some(c) => (Channels::parse(c.subscribe, "subscribe")?, Channels::parse(c.publish, "publish")?, true),
            None => (Channels::default(), Channels::default(), false),
        };
        Ok(Grant { subject: claims.sub, expires: claims.exp, subscribe, publish, claimed })
    }
}

/// The claims the server reads; others are ignored.
#[derive(Deserialize)]
struct Claims {
    exp: u64,
    #[serde(default)]
    nbf: Option<u64>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    channels: Option<ChannelsClaim>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelsClaim {
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

/// Why jsonwebtoken refused a token, in words a client can act on.
fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::InvalidSignature => "bad signature (not signed with this server's secret)".into(),
        ErrorKind::InvalidAlgorithm => "wrong algorithm (this server takes HS256)".into(),
        ErrorKind::InvalidAudience => "`aud` does not name this server's audience (--jwt-audience)".into(),
        ErrorKind::InvalidIssuer => "`iss` is not this server's issuer (--jwt-issuer)".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("missing claim `{claim}`"),
        ErrorKind::InvalidClaimFormat(claim) => format!("malformed claim `{claim}`"),
        ErrorKind::Json(e) => format!("bad claims: {e}"),
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => "not a JWT".into(),
        other => format!("{other:?}"),
    }
}

/// What a token allows, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    subject: Option<String>,
    /// `exp`, in seconds since the Unix epoch.
    expires: u64,
    subscribe: Channels,
    publish: Channels,
    /// Whether the token had a `channels` claim at all (for the refusal's wording).
    claimed: bool,
}

/// An operation on a channel that a token must allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Subscribing, with or without `since` (history included).
    Subscribe,
    Publish,
}

impl Access {
    fn verb(self) -> &'static str {
        match self {
            Access::Subscribe => "subscribing to",
            Access::Publish => "publishing on",
        }
    }
    fn claim(self) -> &'static str {
        match self {
            Access::Subscribe => "channels.subscribe",
            Access::Publish => "channels.publish",
        }
    }
}

/// Why an operation is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// The token's `exp` has passed.
    Expired,
    /// The token does not list the channel for this operation.
    NotGranted { access: Access, channel: String, claimed: bool },
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denied::Expired => f.write_str("the token has expired"),
            Denied::NotGranted { access, channel, claimed: true } => {
                write!(f, "the token does not allow {} {channel:?} (not in `{}`)", access.verb(), access.claim())
            }
            Denied::NotGranted { access, channel, claimed: false } => {
                write!(f, "the token does not allow {} {channel:?} (it has no `channels` claim)", access.verb())
            }
        }
    }
}

impl Grant {
    /// `exp`, in seconds since the Unix epoch.
    pub fn expires(&self) -> u64 {
        self.expires
    }

    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }

    /// Whether the token lists `channel` for `access` (expiry aside).
    pub fn allows(&self, access: Access, channel: &str) -> bool {
        match access {
            Access::Subscribe => self.subscribe.matches(channel),
            Access::Publish => self.publish.matches(channel),
        }
    }

    /// Whether `access` to `channel` is allowed at `now`.
    pub fn check(&self, access: Access, channel: &str, now: SystemTime) -> Result<(), Denied> {
        if time_left(self.expires, now).is_zero() {
            return Err(Denied::Expired);
        }
        if !self.allows(access, channel) {
            return Err(Denied::NotGranted { access, channel: channel.to_owned(), claimed: self.claimed });
        }
        Ok(())
    }
}

/// How long until `exp` (seconds since the Unix epoch) passes, at `now`; zero once it has.
pub fn time_left(exp: u64, now: SystemTime) -> Duration {
    Duration::from_millis(exp.saturating_mul(1000).saturating_sub(unix_millis(now)))
}

fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The channels one list of a `channels` claim covers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Channels(Vec<Pattern>);

/// One entry of a `channels` list: an exact channel name (`room:a`), or a prefix followed by a
/// single trailing `*` (`room:*` covers every channel whose name starts with `room:`; `*` alone
/// covers every channel). A `*` anywhere else is an error, not a literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Pattern, String> {
        match s.strip_suffix('*') {
            Some("") => Ok(Pattern::Prefix(String::new())),
            Some(prefix) if !prefix.contains('*') => {
                validate_channel(prefix).map_err(|why| format!("{s:?}: {why}"))?;
                Ok(Pattern::Prefix(prefix.to_owned()))
            }
            _ if s.contains('*') => Err(format!("{s:?}: `*` may only end a pattern")),
            _ => {
                validate_channel(s).map_err(|why| format!("{s:?}: {why}"))?;
                Ok(Pattern::Exact(s.to_owned()))
            }
        }
    }

    pub fn matches(&self, channel: &str) -> bool {
        match self {
            Pattern::Exact(name) => name == channel,
            Pattern::Prefix(prefix) => channel.starts_with(prefix.as_str()),
        }
    }
}

impl Channels {
    fn parse(list: Vec<String>, key: &str) -> Result<Channels, String> {
        if list.len() > MAX_PATTERNS {
            return Err(format!(
                "invalid token: `channels.{key}` has {} entries; the limit is {MAX_PATTERNS}",
                list.len()
            ));
        }
        list.iter()
            .map(|s| Pattern::parse(s))
            .collect::<Result<Vec<_>, _>>()
            .map(Channels)
            .map_err(|why| format!("invalid token: `channels.{key}` entry {why}"))
    }

    fn matches(&self, channel: &str) -> bool {
        self.0.iter().any(|p| p.matches(channel))
    }
}

/// The token of a request: its bearer header (the scheme in any case), else its `access_token`
/// query parameter.
pub fn token<'a>(authorization: Option<&'a str>, query: Option<&'a str>) -> Option<&'a str> {
    if let Some((scheme, credentials)) = authorization.and_then(|h| h.trim().split_once(' '))
        && scheme.eq_ignore_ascii_case("bearer")
    {
        return Some(credentials.trim());
    }
    query?.split('&').find_map(|kv| kv.strip_prefix("access_token="))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::{Value, json};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    fn sign(claims: &Value, secret: &[u8]) -> String {
        encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret).unwrap()).unwrap()
    }

    fn auth() -> Auth {
        Auth::new(SECRET, None, None).unwrap()
    }

    fn grant(claims: Value) -> Result<Grant, String> {
        auth().verify(&sign(&claims, SECRET), SystemTime::now())
    }

    fn channels(subscribe: &[&str], publish: &[&str]) -> Value {
        json!({"exp": now() + 60, "channels": {"subscribe": subscribe, "publish": publish}})
    }

    #[test]
    fn signature_and_shape_are_checked_and_every_refusal_says_why() {
        let auth = auth();
        assert!(auth.check(Some(&sign(&channels(&["a"], &[]), SECRET))).is_ok());
        assert!(auth.check(None).unwrap_err().contains("missing token"));
        let other = sign(&channels(&["a"], &[]), b"another-secret-of-32-bytes......");
        assert!(auth.check(Some(&other)).unwrap_err().contains("bad signature"));
        assert!(auth.check(Some("not.a.jwt")).unwrap_err().contains("invalid token"));
        let no_exp = sign(&json!({"iat": now()}), SECRET);
        let err = auth.check(Some(&no_exp)).unwrap_err();
        assert!(err.contains("`exp`"), "{err}");
    }

    #[test]
    fn secrets_shorter_than_32_bytes_are_refused_naming_the_flag() {
        let err = Auth::new(&SECRET[..31], None, None).unwrap_err();
        assert!(err.contains("--jwt-secret") && err.contains("32"), "{err}");
        assert!(Auth::new(SECRET, None, None).is_ok());
    }

    #[test]
    fn exp_ends_the_token_to_the_millisecond() {
        let exp = now() + 60;
        let token = sign(&json!({"exp": exp}), SECRET);
        let at = |secs: u64, ms: u64| UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(ms);
        let auth = auth();
        assert!(auth.verify(&token, at(exp - 1, 999)).is_ok());
        assert!(auth.verify(&token, at(exp, 0)).unwrap_err().contains("expired"));
        assert_eq!(time_left(exp, at(exp - 2, 250)), Duration::from_millis(1750));
        assert_eq!(time_left(exp, at(exp + 5, 0)), Duration::ZERO);
        let g = auth.verify(&token, at(exp - 10, 0)).unwrap();
        assert_eq!(g.expires(), exp);
        assert_eq!(g.check(Access::Subscribe, "a", at(exp, 1)), Err(Denied::Expired));
    }

    #[test]
    fn nbf_is_checked_with_a_small_leeway() {
        let n = now();
        let token = |nbf: u64| sign(&json!({"exp": n + 600, "nbf": nbf}), SECRET);
        let now = SystemTime::now();
        assert!(auth().verify(&token(n), now).is_ok());
        assert!(auth().verify(&token(n + 3), now).is_ok(), "within the leeway");
        let err = auth().verify(&token(n + 60), now).unwrap_err();
        assert!(err.contains("nbf"), "{err}");
    }

    #[test]
    fn aud_and_iss_are_checked_when_configured() {
        let exp = now() + 60;
        let strict = Auth::new(SECRET, Some("chat"), Some("https://issuer.example")).unwrap();
        let verify = |a: &Auth, claims: Value| a.verify(&sign(&claims, SECRET), SystemTime::now());
        assert!(verify(&strict, json!({"exp": exp, "aud": "chat", "iss": "https://issuer.example"})).is_ok());
        assert!(
            verify(&strict, json!({"exp": exp, "aud": ["other", "chat"], "iss": "https://issuer.example"})).is_ok()
        );
        let err = verify(&strict, json!({"exp": exp, "aud": "other", "iss": "https://issuer.example"})).unwrap_err();
        assert!(err.contains("`aud`"), "{err}");
        let err = verify(&strict, json!({"exp": exp, "iss": "https://issuer.example"})).unwrap_err();
        assert!(err.contains("missing claim `aud`"), "{err}");
        let err = verify(&strict, json!({"exp": exp, "aud": "chat", "iss": "https://evil.example"})).unwrap_err();
        assert!(err.contains("`iss`"), "{err}");
        let err = verify(&strict, json!({"exp": exp, "aud": "chat"})).unwrap_err();
        assert!(err.contains("missing claim `iss`"), "{err}");
        // Without the flags, the claims are ignored.
        assert!(verify(&auth(), json!({"exp": exp, "aud": "anyone", "iss": "anyone"})).is_ok());
    }

    #[test]
    fn patterns_are_exact_names_or_prefixes_with_one_trailing_star() {
        let p = |s: &str| Pattern::parse(s).unwrap();
        assert!(p("room:a").matches("room:a"));
        assert!(!p("room:a").matches("room:ab"));
        assert!(p("room:*").matches("room:a"));
        assert!(p("room:*").matches("room:"));
        assert!(!p("room:*").matches("room"));
        assert!(!p("room:*").matches("lobby"));
        assert!(p("*").matches("anything.at-all"));
        for bad in ["ro*m", "*room", "room:**", "a b*", "", "a/b"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn channel_claims_grant_subscribe_and_publish_separately() {
        let g = grant(channels(&["room:a", "news:*"], &["room:a"])).unwrap();
        let now = SystemTime::now();
        assert!(g.check(Access::Subscribe, "room:a", now).is_ok());
        assert!(g.check(Access::Subscribe, "news:today", now).is_ok());
        assert!(g.check(Access::Publish, "room:a", now).is_ok());
        let denied = g.check(Access::Publish, "news:today", now).unwrap_err();
        assert_eq!(
            denied.to_string(),
            "the token does not allow publishing on \"news:today\" (not in `channels.publish`)"
        );
        let denied = g.check(Access::Subscribe, "room:b", now).unwrap_err();
        assert!(denied.to_string().contains("subscribing to \"room:b\""), "{denied}");
        let publish_only = grant(json!({"exp": now_plus(60), "channels": {"publish": ["*"]}})).unwrap();
        assert!(publish_only.check(Access::Publish, "x", now).is_ok());
        assert!(publish_only.check(Access::Subscribe, "x", now).is_err());
    }

    fn now_plus(secs: u64) -> u64 {
        now() + secs
    }

    #[test]
    fn without_a_channels_claim_a_token_allows_no_channel() {
        let g = grant(json!({"exp": now_plus(60), "sub": "u1"})).unwrap();
        assert_eq!(g.subject(), Some("u1"));
        let denied = g.check(Access::Subscribe, "room:a", SystemTime::now()).unwrap_err();
        assert!(denied.to_string().contains("no `channels` claim"), "{denied}");
        assert!(g.check(Access::Publish, "room:a", SystemTime::now()).is_err());
    }

    #[test]
    fn malformed_channel_claims_refuse_the_token() {
        let err = grant(json!({"exp": now_plus(60), "channels": {"subscribe": ["a*b"]}})).unwrap_err();
        assert!(err.contains("channels.subscribe") && err.contains("a*b"), "{err}");
        let err = grant(json!({"exp": now_plus(60), "channels": {"subcribe": ["a"]}})).unwrap_err();
        assert!(err.contains("subcribe"), "a typo is an error, not a silent deny: {err}");
        let err = grant(json!({"exp": now_plus(60), "channels": ["a"]})).unwrap_err();
        assert!(err.contains("bad claims"), "{err}");
        let many: Vec<String> = (0..=MAX_PATTERNS).map(|i| format!("c{i}")).collect();
        let err = grant(json!({"exp": now_plus(60), "channels": {"publish": many}})).unwrap_err();
        assert!(err.contains("limit"), "{err}");
    }

    #[test]
    fn the_token_comes_from_the_header_in_any_case_or_the_query() {
        assert_eq!(token(Some("Bearer abc"), Some("access_token=xyz")), Some("abc"));
        assert_eq!(token(Some("bearer abc"), None), Some("abc"));
        assert_eq!(token(Some("BEARER  abc "), None), Some("abc"));
        assert_eq!(token(None, Some("a=1&access_token=xyz&b=2")), Some("xyz"));
        assert_eq!(token(Some("Basic abc"), None), None);
        assert_eq!(token(Some("Bearerabc"), None), None);
        assert_eq!(token(None, Some("a=1")), None);
    }

    #[test]
    fn debug_shows_neither_secret_nor_token() {
        let shown = format!("{:?}", Auth::new(SECRET, Some("chat"), None).unwrap());
        assert!(!shown.contains("0123456789abcdef"), "{shown}");
    }
}
