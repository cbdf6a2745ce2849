//! Optional JWT check at the handshake. With `--jwt-secret`, an upgrade must carry an HS256
//! token signed with that secret and not expired (`exp` is required), either as
//! `Authorization: Bearer <token>` or, for browsers (which cannot set headers on a WebSocket),
//! as the `access_token` query parameter. Anything else is answered 401 before the upgrade.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// Shortest secret accepted (HS256 keys should be at least 32 bytes; 16 is the floor).
pub const MIN_SECRET_LEN: usize = 16;

pub struct Auth {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth(HS256)")
    }
}

impl Auth {
    pub fn new(secret: &[u8]) -> Result<Self, String> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(format!("the JWT secret must be at least {MIN_SECRET_LEN} bytes"));
        }
        let key = DecodingKey::from_secret(secret).map_err(|e| e.to_string())?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        Ok(Auth { key, validation })
    }

    /// Why the token is refused, if it is.
    pub fn check(&self, token: Option<&str>) -> Result<(), String> {
        let token = token.ok_or("missing token: send `Authorization: Bearer <jwt>` or `?access_token=<jwt>`")?;
        jsonwebtoken::decode::<serde_json::Value>(token, &self.key, &self.validation)
            .map(drop)
            .map_err(|e| format!("invalid token: {e}"))
    }
}

/// The token of a request: its bearer header, else its `access_token` query parameter.
pub fn token<'a>(authorization: Option<&'a str>, query: Option<&'a str>) -> Option<&'a str> {
    if let Some(bearer) = authorization.and_then(|h| h.strip_prefix("Bearer ")) {
        return Some(bearer.trim());
    }
    query?.split('&').find_map(|kv| kv.strip_prefix("access_token="))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn token_with(exp_in: i64, secret: &[u8]) -> String {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let claims = serde_json::json!({"sub": "client-1", "exp": now + exp_in});
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret).unwrap()).unwrap()
    }

    #[test]
    fn valid_tokens_pass_and_every_bad_one_says_why() {
        let auth = Auth::new(SECRET).unwrap();
        assert!(auth.check(Some(&token_with(60, SECRET))).is_ok());
        assert!(auth.check(None).unwrap_err().contains("missing token"));
        assert!(auth.check(Some(&token_with(-120, SECRET))).unwrap_err().contains("Expired"));
        assert!(
            auth.check(Some(&token_with(60, b"another-secret-of-32-bytes......")))
                .unwrap_err()
                .contains("invalid token")
        );
        assert!(auth.check(Some("not.a.jwt")).is_err());
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let no_exp = encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"iat": now}),
            &EncodingKey::from_secret(SECRET).unwrap(),
        )
        .unwrap();
        assert!(auth.check(Some(&no_exp)).is_err(), "exp is required");
        assert!(Auth::new(b"short").is_err());
    }

    #[test]
    fn the_token_comes_from_the_header_or_the_query() {
        assert_eq!(token(Some("Bearer abc"), Some("access_token=xyz")), Some("abc"));
        assert_eq!(token(None, Some("a=1&access_token=xyz&b=2")), Some("xyz"));
        assert_eq!(token(Some("Basic abc"), None), None);
        assert_eq!(token(None, Some("a=1")), None);
    }
}
