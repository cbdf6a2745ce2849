//! `wsfleet-server tune`: the node-tuning DaemonSet's job. Writes the requested kernel settings
//! (only keys on [`ALLOWED_SYSCTLS`]) under `/proc/sys`, reports each one's value before and
//! after, then sleeps until it is stopped so the pod stays Ready while the node is tuned.
//!
//! The allow-list is the operator's too (`wsfleet_contract::tune`), whose CRD refuses any other
//! key; the check here keeps a hand-made DaemonSet from writing anything else either.

use std::path::{Path, PathBuf};

pub use wsfleet_contract::tune::ALLOWED_SYSCTLS;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TuneError {
    #[error("sysctl {0:?} is not on the allow-list ({list})", list = ALLOWED_SYSCTLS.join(", "))]
    NotAllowed(String),
    #[error("sysctl {0:?} must be KEY=VALUE")]
    Malformed(String),
    #[error("sysctl {key}: value {value:?} must be whole numbers separated by spaces")]
    BadValue { key: String, value: String },
}

/// One requested setting, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysctl {
    pub key: String,
    pub value: String,
}

impl std::str::FromStr for Sysctl {
    type Err = TuneError;
    fn from_str(s: &str) -> Result<Self, TuneError> {
        let (key, value) = s.split_once('=').ok_or_else(|| TuneError::Malformed(s.to_owned()))?;
        let (key, value) = (key.trim(), value.trim());
        if !ALLOWED_SYSCTLS.contains(&key) {
            return Err(TuneError::NotAllowed(key.to_owned()));
        }
        let numbers = value.split_whitespace().collect::<Vec<_>>();
        if numbers.is_empty() || !numbers.iter().all(|n| n.bytes().all(|b| b.is_ascii_digit())) {
            return Err(TuneError::BadValue { key: key.to_owned(), value: value.to_owned() });
        }
        Ok(Sysctl { key: key.to_owned(), value: numbers.join(" ") })
    }
}

impl Sysctl {
    /// `net.core.somaxconn` -> `<root>/net/core/somaxconn`
    pub fn path(&self, root: &Path) -> PathBuf {
        root.join(self.key.replace('.', "/"))
    }
}

/// What happened to one setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub key: String,
    pub before: Option<String>,
    pub after: Result<String, String>,
}

/// Writes every setting under `root` (normally `/proc/sys`) and reads each back.
pub fn apply(settings: &[Sysctl], root: &Path) -> Vec<Applied> {
    settings
        .iter()
        .map(|s| {
            let path = s.path(root);
            let read = || std::fs::read_to_string(&path).map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "));
            let before = read().ok();
            let after = std::fs::write(&path, format!("{}\n", s.value))
                .and_then(|()| read())
                .map_err(|e| format!("cannot write {}: {e}", path.display()));
            Applied { key: s.key.clone(), before, after }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allow_listed_numeric_settings_parse() {
        let s: Sysctl = "net.core.somaxconn=65535".parse().unwrap();
        assert_eq!(s, Sysctl { key: "net.core.somaxconn".into(), value: "65535".into() });
        let s: Sysctl = "net.ipv4.ip_local_port_range = 1024   65535".parse().unwrap();
        assert_eq!(s.value, "1024 65535");
        assert!(matches!("kernel.panic=1".parse::<Sysctl>(), Err(TuneError::NotAllowed(_))));
        assert!(matches!("net.core.somaxconn".parse::<Sysctl>(), Err(TuneError::Malformed(_))));
        assert!(matches!("net.core.somaxconn=lots".parse::<Sysctl>(), Err(TuneError::BadValue { .. })));
        assert!(matches!("net.core.somaxconn=".parse::<Sysctl>(), Err(TuneError::BadValue { .. })));
        assert!(matches!("net.core.somaxconn=1;reboot".parse::<Sysctl>(), Err(TuneError::BadValue { .. })));
    }

    #[test]
    fn writes_under_the_given_root_and_reports_before_and_after() {
        let root = std::env::temp_dir().join(format!("wsfleet-tune-{}", std::process::id()));
        std::fs::create_dir_all(root.join("net/core")).unwrap();
        std::fs::write(root.join("net/core/somaxconn"), "4096\n").unwrap();
        let settings = vec!["net.core.somaxconn=65535".parse().unwrap(), "fs.file-max=100".parse().unwrap()];
        let report = apply(&settings, &root);
        assert_eq!(report[0].before.as_deref(), Some("4096"));
        assert_eq!(report[0].after, Ok("65535".into()));
        assert!(report[1].after.is_err(), "fs/ does not exist under the test root");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
