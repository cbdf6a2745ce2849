//! Pure: what the operator refuses before it builds anything. The API server already refuses
//! most of it (OpenAPI bounds, CEL rules generated from the same contract); these checks hold
//! when that validation was skipped or is older than the operator, and cover what the schema
//! cannot see (the JWT Secret's content). A refused cluster gets a condition and an event and
//! none of its children is written.
//!
//! No client here: the controller fetches the JWT Secret and hands it over.

use k8s_openapi::api::core::v1::{Secret, SecretKeySelector};

use crate::crd::WebSocketCluster;

/// The shortest HS256 secret the operator lets servers start with (RFC 7518 wants a key at
/// least as long as the hash).
pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// Bounds of `redis.managed.maxMemory`.
const MIN_MAX_MEMORY: u64 = 16 << 20;
const MAX_MAX_MEMORY: u64 = 1024 << 30;

/// The spec's own consistency: every sysctl within the contract's bounds, a sane `maxMemory`.
pub fn spec(wsc: &WebSocketCluster) -> Result<(), String> {
    for (key, value) in &wsc.spec.node_tuning.sysctls {
        wsfleet_contract::tune::check(key, value).map_err(|e| format!("spec.nodeTuning.sysctls: {e}"))?;
    }
    if let Some(managed) = &wsc.spec.redis.managed {
        quantity_bytes(&managed.max_memory)
            .filter(|b| (MIN_MAX_MEMORY..=MAX_MAX_MEMORY).contains(b))
            .ok_or_else(|| format!("spec.redis.managed.maxMemory {:?}: 16Mi to 1024Gi", managed.max_memory))?;
    }
    Ok(())
}

/// `256Mi` -> 268435456: the binary suffixes the CRD admits (`Ki`, `Mi`, `Gi`).
pub fn quantity_bytes(q: &str) -> Option<u64> {
    let split = q.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = q.split_at(split);
    let shift = match unit {
        "Ki" => 10,
        "Mi" => 20,
        "Gi" => 30,
        _ => return None,
    };
    n.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// The JWT secret as the servers would read it: present, with the key, long enough. The message
/// names the Secret and the key, never the value.
pub fn jwt_secret(selector: &SecretKeySelector, secret: Option<&Secret>) -> Result<(), String> {
    let (name, key) = (&selector.name, &selector.key);
    let Some(secret) = secret else { return Err(format!("Secret {name} (auth.jwtSecretRef) does not exist")) };
    let value = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|v| v.0.len())
        .or_else(|| secret.string_data.as_ref().and_then(|d| d.get(key)).map(String::len));
    match value {
        None => Err(format!("Secret {name} has no key {key:?} (auth.jwtSecretRef)")),
        Some(len) if len < MIN_JWT_SECRET_BYTES => Err(format!(
            "Secret {name} key {key:?} holds {len} bytes; a JWT secret needs at least {MIN_JWT_SECRET_BYTES}"
        )),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;

    use super::*;
    use crate::children::tests::sample;

    #[test]
    fn hostile_tuning_is_refused_with_the_key_named() {
        let mut wsc = sample("chat");
        assert_eq!(spec(&wsc), Ok(()));
        for (key, value) in [
            ("fs.file-max", "1"),
            ("net.netfilter.nf_conntrack_max", "16"),
            ("kernel.panic", "1"),
            ("net.ipv4.ip_local_port_range", "1 2"),
        ] {
            wsc.spec.node_tuning.sysctls = BTreeMap::from([(key.to_owned(), value.to_owned())]);
            let e = spec(&wsc).expect_err(key);
            assert!(e.starts_with("spec.nodeTuning.sysctls: ") && e.contains(key), "{e}");
        }
        wsc.spec.node_tuning.sysctls = BTreeMap::from([("net.core.somaxconn".into(), "65535".into())]);
        assert_eq!(spec(&wsc), Ok(()));
    }

    #[test]
    fn max_memory_is_parsed_and_bounded() {
        assert_eq!(quantity_bytes("256Mi"), Some(256 << 20));
        assert_eq!(quantity_bytes("2Gi"), Some(2 << 30));
        assert_eq!(quantity_bytes("256M"), None);
        let mut wsc = sample("chat");
        wsc.spec.redis.managed.as_mut().unwrap().max_memory = "1Mi".into();
        assert!(spec(&wsc).unwrap_err().contains("maxMemory"));
    }

    #[test]
    fn a_jwt_secret_must_exist_hold_the_key_and_be_long_enough() {
        let selector = SecretKeySelector { name: "chat-jwt".into(), key: "secret".into(), optional: None };
        let with = |bytes: &[u8]| Secret {
            data: Some(BTreeMap::from([("secret".to_owned(), ByteString(bytes.to_vec()))])),
            ..Default::default()
        };
        assert!(jwt_secret(&selector, None).unwrap_err().contains("Secret chat-jwt"));
        let other_key = Secret { data: Some(BTreeMap::new()), ..Default::default() };
        assert!(jwt_secret(&selector, Some(&other_key)).unwrap_err().contains("no key \"secret\""));
        let short = jwt_secret(&selector, Some(&with(b"too-short-a-secret"))).unwrap_err();
        assert!(short.contains("18 bytes") && !short.contains("too-short"), "{short}");
        assert_eq!(jwt_secret(&selector, Some(&with(&[7u8; 32]))), Ok(()));
    }
}
