//! Pure: what the status of a `WebSocketCluster` says, from what its children report.
//!
//! Conditions are keyed by type; `lastTransitionTime` moves only when a condition's status
//! flips; `observedGeneration` advances only when every child was applied.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use crate::children::{self, REDIS_PORT};
use crate::crd::{RedisStatus, WebSocketCluster, WebSocketClusterStatus, condition, reason};

/// What the operator saw of one cluster in one reconcile.
#[derive(Debug, Default, Clone)]
pub struct Observed {
    /// The server Deployment as last applied/read.
    pub server: Option<Deployment>,
    /// The managed Redis Deployment (`None` for external Redis).
    pub redis: Option<Deployment>,
    /// The node-tuning DaemonSet (`None` when tuning is disabled).
    pub tuning: Option<DaemonSet>,
    /// Fleet total from the servers' heartbeats, or why it is unknown.
    pub connections: Option<Result<i64, String>>,
    /// Why applying the children failed, if it did.
    pub apply_error: Option<String>,
    /// Why nothing was applied: the operator refused the spec or a Secret it names, as (reason,
    /// message).
    pub refused: Option<(&'static str, String)>,
}

pub fn compute(wsc: &WebSocketCluster, seen: &Observed, now: &Time) -> WebSocketClusterStatus {
    let previous = wsc.status.clone().unwrap_or_default();
    let generation = wsc.metadata.generation;
    let desired = wsc.spec.replicas;
    let dstat = seen.server.as_ref().and_then(|d| d.status.clone()).unwrap_or_default();
    let (replicas, ready, updated) =
        (dstat.replicas.unwrap_or(0), dstat.ready_replicas.unwrap_or(0), dstat.updated_replicas.unwrap_or(0));
    let deployment_caught_up = seen
        .server
        .as_ref()
        .is_some_and(|d| dstat.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0));

    let (redis_ok, redis_cond) = redis_condition(wsc, seen);
    let mut conds = Vec::new();

    let rolling = !deployment_caught_up || updated < desired || replicas > updated || ready < desired;
    conds.push(if rolling {
        cond(
            condition::PROGRESSING,
            true,
            reason::ROLLING_OUT,
            format!("{updated} of {desired} server pods updated, {ready} ready, {replicas} in total"),
        )
    } else {
        cond(condition::PROGRESSING, false, reason::ROLLOUT_COMPLETE, format!("{desired} server pods up to date"))
    });

    let deadline = dstat.conditions.as_ref().and_then(|cs| {
        cs.iter().find(|c| c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded"))
    });
    conds.push(match (&seen.refused, &seen.apply_error, deadline) {
        (Some((why, message)), _, _) => cond(condition::DEGRADED, true, why, message.clone()),
        (None, Some(e), _) => cond(condition::DEGRADED, true, reason::APPLY_FAILED, e.clone()),
        (None, None, Some(c)) => cond(
            condition::DEGRADED,
            true,
            reason::PROGRESS_DEADLINE_EXCEEDED,
            c.message.clone().unwrap_or_else(|| "the server rollout stopped progressing".into()),
        ),
        // The servers stay in their Service through a bus outage (it is everyone's); this says
        // the fleet is degraded meanwhile (a bus that has not come up yet is not an outage).
        (None, None, None) if !redis_ok && bus_was_up(&previous) => cond(
            condition::DEGRADED,
            true,
            reason::BUS_UNAVAILABLE,
            "the message bus is down: servers keep their clients and take new ones, publishes are refused and \
             subscriptions wait until it is back"
                .into(),
        ),
        (None, None, None) => cond(condition::DEGRADED, false, reason::AS_EXPECTED, "all children applied".into()),
    });

    conds.push(if let Some((why, message)) = &seen.refused {
        cond(condition::READY, false, why, format!("nothing applied: {message}"))
    } else if !redis_ok {
        cond(condition::READY, false, reason::REDIS_NOT_READY, "the message bus is not ready".into())
    } else if desired == 0 {
        cond(condition::READY, true, reason::SCALED_TO_ZERO, "scaled to zero server pods".into())
    } else if ready >= desired && updated >= desired && deployment_caught_up {
        cond(condition::READY, true, reason::ALL_REPLICAS_READY, format!("{ready}/{desired} server pods ready"))
    } else {
        cond(condition::READY, false, reason::REPLICAS_NOT_READY, format!("{ready}/{desired} server pods ready"))
    });
    conds.push(redis_cond);
    conds.push(tuning_condition(wsc, seen));

    let conditions = conds
        .into_iter()
        .map(|mut c| {
            c.observed_generation = generation;
            c.last_transition_time = previous
                .conditions
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == c.status)
                .map(|p| p.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            c
        })
        .collect();

    let (connections, connections_unknown_reason) = match &seen.connections {
        Some(Ok(n)) => (Some(*n), None),
        Some(Err(why)) => (None, Some(why.clone())),
        None => (None, Some("not observed yet".into())),
    };
    WebSocketClusterStatus {
        observed_generation: if seen.apply_error.is_none() && seen.refused.is_none() {
            generation
        } else {
            previous.observed_generation
        },
        replicas,
        ready_replicas: ready,
        updated_replicas: updated,
        selector: children::selector_string(wsc),
        connections,
        connections_unknown_reason,
        redis: Some(RedisStatus { endpoint: redis_endpoint(wsc), ready: redis_ok }),
        conditions,
    }
}

/// Whether the previous status had the bus up, or already reported it lost.
fn bus_was_up(previous: &WebSocketClusterStatus) -> bool {
    previous.conditions.iter().any(|c| {
        (c.type_ == condition::REDIS_READY && c.status == "True")
            || (c.type_ == condition::DEGRADED && c.reason == reason::BUS_UNAVAILABLE)
    })
}

fn redis_endpoint(wsc: &WebSocketCluster) -> String {
    if wsc.spec.redis.managed.is_some() {
        return format!("{}.{}.svc:{REDIS_PORT}", children::redis_name(wsc), wsc.namespace().unwrap_or_default());
    }
    match wsc.spec.redis.external.as_ref() {
        Some(ext) => match (&ext.url, &ext.url_secret_ref) {
            (Some(url), _) => strip_credentials(url),
            (None, Some(secret)) => format!("from Secret {}, key {}", secret.name, secret.key),
            (None, None) => String::new(),
        },
        None => String::new(),
    }
}

/// `redis://user:pass@host:6379/0` -> `host:6379/0`: status is readable by anyone who can read
/// the cluster.
fn strip_credentials(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.rsplit_once('@').map(|(_, host)| host).unwrap_or(rest).to_owned()
}

fn redis_condition(wsc: &WebSocketCluster, seen: &Observed) -> (bool, Condition) {
    if wsc.spec.redis.managed.is_some() {
        let available =
            seen.redis.as_ref().and_then(|d| d.status.as_ref()).is_some_and(|s| s.available_replicas.unwrap_or(0) >= 1);
        return if available {
            (
                true,
                cond(
                    condition::REDIS_READY,
                    true,
                    reason::MANAGED_REDIS_AVAILABLE,
                    "managed Redis is available".into(),
                ),
            )
        } else {
            (
                false,
                cond(
                    condition::REDIS_READY,
                    false,
                    reason::MANAGED_REDIS_UNAVAILABLE,
                    "managed Redis has no available pod".into(),
                ),
            )
        };
    }
    // An external Redis is the user's: the operator reports what it could check, and does not
    // hold the fleet's readiness hostage to its own network view (the servers' readiness
    // already covers their bus).
    let c = match &seen.connections {
        Some(Ok(_)) => {
            cond(condition::REDIS_READY, true, reason::EXTERNAL_REDIS, "external Redis answered the operator".into())
        }
        _ => Condition {
            status: "Unknown".into(),
            ..cond(
                condition::REDIS_READY,
                false,
                reason::EXTERNAL_REDIS,
                "external Redis is not reachable from the operator; server readiness reports the bus".into(),
            )
        },
    };
    (true, c)
}

fn tuning_condition(wsc: &WebSocketCluster, seen: &Observed) -> Condition {
    if !wsc.spec.node_tuning.enabled {
        return cond(condition::NODE_TUNED, false, reason::TUNING_DISABLED, "nodeTuning.enabled is false".into());
    }
    let s = seen.tuning.as_ref().and_then(|d| d.status.clone()).unwrap_or_default();
    let (want, ready) = (s.desired_number_scheduled, s.number_ready);
    if want == 0 {
        cond(condition::NODE_TUNED, false, reason::NO_NODES_MATCH, "no node matches nodeTuning.nodeSelector".into())
    } else if ready >= want {
        cond(condition::NODE_TUNED, true, reason::NODES_TUNED, format!("{ready}/{want} nodes tuned"))
    } else {
        cond(condition::NODE_TUNED, false, reason::TUNING_IN_PROGRESS, format!("{ready}/{want} nodes tuned"))
    }
}

fn cond(type_: &str, status: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: None,
        last_transition_time: Time(Default::default()),
    }
}

/// The condition of `type_` in a status, if any.
pub fn find<'a>(status: &'a WebSocketClusterStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::children::tests::sample;
    use k8s_openapi::api::apps::v1::{DaemonSetStatus, DeploymentStatus};

    fn t(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    fn deployment(generation: i64, observed: i64, replicas: i32, updated: i32, ready: i32) -> Deployment {
        let mut d = Deployment::default();
        d.metadata.generation = Some(generation);
        d.status = Some(DeploymentStatus {
            observed_generation: Some(observed),
            replicas: Some(replicas),
            updated_replicas: Some(updated),
            ready_replicas: Some(ready),
            available_replicas: Some(ready),
            ..Default::default()
        });
        d
    }

    fn healthy(wsc: &WebSocketCluster) -> Observed {
        let n = wsc.spec.replicas;
        Observed {
            server: Some(deployment(1, 1, n, n, n)),
            redis: Some(deployment(1, 1, 1, 1, 1)),
            tuning: None,
            connections: Some(Ok(42)),
            apply_error: None,
            refused: None,
        }
    }

    fn status_of<'a>(s: &'a WebSocketClusterStatus, type_: &str) -> (&'a str, &'a str) {
        let c = find(s, type_).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn a_healthy_fleet_is_ready_and_done() {
        let wsc = sample("chat");
        let s = compute(&wsc, &healthy(&wsc), &t(100));
        assert_eq!(status_of(&s, "Ready"), ("True", "AllReplicasReady"));
        assert_eq!(status_of(&s, "Progressing"), ("False", "RolloutComplete"));
        assert_eq!(status_of(&s, "Degraded"), ("False", "AsExpected"));
        assert_eq!(status_of(&s, "RedisReady"), ("True", "ManagedRedisAvailable"));
        assert_eq!(status_of(&s, "NodeTuned"), ("False", "TuningDisabled"));
        assert_eq!((s.replicas, s.ready_replicas, s.connections), (3, 3, Some(42)));
        assert_eq!(s.observed_generation, Some(1));
        assert!(s.conditions.iter().all(|c| c.observed_generation == Some(1)));
        assert_eq!(s.redis.unwrap().endpoint, "chat-redis.team-a.svc:6379");
    }

    #[test]
    fn a_rollout_in_progress_is_reported() {
        let wsc = sample("chat");
        let mut seen = healthy(&wsc);
        seen.server = Some(deployment(2, 2, 4, 1, 3));
        let s = compute(&wsc, &seen, &t(100));
        assert_eq!(status_of(&s, "Progressing"), ("True", "RollingOut"));
        assert_eq!(status_of(&s, "Ready"), ("False", "ReplicasNotReady"));
        seen.server = Some(deployment(3, 2, 3, 3, 3)); // the Deployment has not seen the new spec yet
        assert_eq!(status_of(&compute(&wsc, &seen, &t(100)), "Progressing"), ("True", "RollingOut"));
    }

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let mut wsc = sample("chat");
        let s1 = compute(&wsc, &healthy(&wsc), &t(100));
        wsc.status = Some(s1.clone());
        let s2 = compute(&wsc, &healthy(&wsc), &t(200));
        assert_eq!(find(&s2, "Ready").unwrap().last_transition_time, t(100));
        wsc.status = Some(s2);
        let mut seen = healthy(&wsc);
        seen.server = Some(deployment(1, 1, 3, 3, 1));
        let s3 = compute(&wsc, &seen, &t(300));
        assert_eq!(find(&s3, "Ready").unwrap().last_transition_time, t(300));
        assert_eq!(find(&s3, "Degraded").unwrap().last_transition_time, t(100));
    }

    #[test]
    fn a_failed_apply_degrades_and_keeps_the_old_observed_generation() {
        let mut wsc = sample("chat");
        wsc.status = Some(compute(&wsc, &healthy(&wsc), &t(100)));
        wsc.metadata.generation = Some(2);
        let mut seen = healthy(&wsc);
        seen.apply_error = Some("Deployment chat-server: forbidden".into());
        let s = compute(&wsc, &seen, &t(200));
        assert_eq!(status_of(&s, "Degraded"), ("True", "ApplyFailed"));
        assert_eq!(s.observed_generation, Some(1));
    }

    #[test]
    fn a_refused_spec_or_secret_is_named_and_keeps_the_old_observed_generation() {
        let mut wsc = sample("chat");
        wsc.status = Some(compute(&wsc, &healthy(&wsc), &t(100)));
        wsc.metadata.generation = Some(2);
        let mut seen = healthy(&wsc);
        seen.refused = Some((reason::JWT_SECRET_INVALID, "Secret chat-jwt has no key \"secret\"".into()));
        let s = compute(&wsc, &seen, &t(200));
        assert_eq!(status_of(&s, "Ready"), ("False", "JwtSecretInvalid"));
        assert_eq!(status_of(&s, "Degraded"), ("True", "JwtSecretInvalid"));
        assert!(find(&s, "Ready").unwrap().message.contains("Secret chat-jwt"));
        assert_eq!(s.observed_generation, Some(1));
    }

    #[test]
    fn redis_and_connections_are_reported_honestly() {
        let mut wsc = sample("chat");
        let mut seen = healthy(&wsc);
        seen.redis = Some(deployment(1, 1, 1, 0, 0));
        seen.connections = Some(Err("redis unreachable from the operator".into()));
        let s = compute(&wsc, &seen, &t(1));
        assert_eq!(status_of(&s, "RedisReady"), ("False", "ManagedRedisUnavailable"));
        assert_eq!(status_of(&s, "Ready"), ("False", "RedisNotReady"));
        assert_eq!(status_of(&s, "Degraded"), ("False", "AsExpected"), "a bus not up yet is no outage");
        // Once up, losing it degrades the fleet until it is back.
        let mut up = sample("chat");
        up.status = Some(compute(&up, &healthy(&up), &t(1)));
        let lost = compute(&up, &seen, &t(2));
        assert_eq!(status_of(&lost, "Degraded"), ("True", "BusUnavailable"));
        up.status = Some(lost);
        assert_eq!(status_of(&compute(&up, &seen, &t(3)), "Degraded"), ("True", "BusUnavailable"));
        assert_eq!(status_of(&compute(&up, &healthy(&up), &t(4)), "Degraded"), ("False", "AsExpected"));
        assert_eq!(s.connections, None);
        assert_eq!(s.connections_unknown_reason.as_deref(), Some("redis unreachable from the operator"));

        wsc.spec.redis =
            serde_json::from_value(serde_json::json!({"external": {"url": "redis://u:secret@r.example:6379"}}))
                .unwrap();
        let s = compute(&wsc, &seen, &t(1));
        assert_eq!(status_of(&s, "RedisReady"), ("Unknown", "ExternalRedis"));
        assert_eq!(s.redis.unwrap().endpoint, "r.example:6379", "no credentials in status");
    }

    #[test]
    fn scaled_to_zero_and_node_tuning() {
        let mut wsc = sample("chat");
        wsc.spec.replicas = 0;
        wsc.spec.node_tuning.enabled = true;
        let mut seen = healthy(&wsc);
        let mut ds = DaemonSet {
            status: Some(DaemonSetStatus { desired_number_scheduled: 3, number_ready: 2, ..Default::default() }),
            ..Default::default()
        };
        seen.tuning = Some(ds.clone());
        let s = compute(&wsc, &seen, &t(1));
        assert_eq!(status_of(&s, "Ready"), ("True", "ScaledToZero"));
        assert_eq!(status_of(&s, "NodeTuned"), ("False", "TuningInProgress"));
        ds.status.as_mut().unwrap().number_ready = 3;
        seen.tuning = Some(ds);
        assert_eq!(status_of(&compute(&wsc, &seen, &t(1)), "NodeTuned"), ("True", "NodesTuned"));
    }
}
