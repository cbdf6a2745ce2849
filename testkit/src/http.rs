//! Plain HTTP probes of loopback servers: a blocking `GET` and the reading of a Prometheus
//! `/metrics` page. Bounded: 2 s to connect, 5 s to read.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A blocking HTTP/1.0 `GET`: (status, body). Status 0 when nothing answered.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    get(addr, path).unwrap_or((0, String::new()))
}

/// A blocking HTTP/1.0 `GET`: (status, body), or why nothing answered.
pub fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).map_err(|e| e.to_string())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| format!("{addr}{path}: {e}"))?;
    let status = resp.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    let status = status.ok_or_else(|| format!("{addr}{path}: no status in {resp:?}"))?;
    Ok((status, resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()))
}

/// The value of the sample `name` (a metric name, or a name with its whole label set) in a
/// `/metrics` page: its first match.
pub fn metric_in(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The value of the sample `name` on the `/metrics` page at `addr`; 0 when it is absent or
/// nothing answered (a counter not yet incremented is not printed).
pub fn metric(addr: SocketAddr, name: &str) -> f64 {
    metric_in(&http_get(addr, "/metrics").1, name).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::metric_in;

    #[test]
    fn a_sample_is_found_by_its_whole_name_or_label_set() {
        let page = "# TYPE x counter\nwsfleet_connections_total 9\nwsfleet_connections 3\n\
                    wsfleet_closes_total{code=\"1013\"} 2\n";
        assert_eq!(metric_in(page, "wsfleet_connections"), Some(3.0), "not the longer name");
        assert_eq!(metric_in(page, "wsfleet_closes_total"), Some(2.0));
        assert_eq!(metric_in(page, "wsfleet_closes_total{code=\"1013\"}"), Some(2.0));
        assert_eq!(metric_in(page, "wsfleet_closes_total{code=\"1008\"}"), None);
        assert_eq!(metric_in(page, "wsfleet_conn"), None);
    }
}
