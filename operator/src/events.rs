//! Events, published beside the reconciles rather than in their way: a reconcile hands an
//! event over and goes on, and [`IN_FLIGHT`] requests at most carry them to the API server.
//!
//! Why: a cluster's first reconcile publishes an event per child it creates and one when the
//! cluster turns Ready. Awaited in turn, those requests doubled the round trips of the first
//! pass, the pace at which 1,000 new clusters got their children and their status.
//!
//! Bounded: at most [`QUEUE`] events wait; past that an event is dropped, counted
//! (`wsfleet_operator_events_dropped_total`) and logged at debug level: events tell a story,
//! the status is the truth, and a reconcile never waits for one. What is queued when the
//! operator stops is not published.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, Recorder};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, warn};

/// Events waiting to be published, at most.
pub const QUEUE: usize = 4096;
/// Event requests to the API server at once, at most.
pub const IN_FLIGHT: usize = 16;

pub struct Events {
    queue: mpsc::Sender<(Event, ObjectReference)>,
    dropped: Counter,
}

impl Events {
    /// Starts the task that publishes what [`Events::publish`] is handed (it ends when this
    /// drops). Needs a tokio runtime.
    pub fn start(recorder: Recorder, dropped: Counter) -> Self {
        let (queue, mut waiting) = mpsc::channel::<(Event, ObjectReference)>(QUEUE);
        tokio::spawn(async move {
            let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
            while let Some((event, reference)) = waiting.recv().await {
                let Ok(turn) = in_flight.clone().acquire_owned().await else { return };
                let recorder = recorder.clone();
                tokio::spawn(async move {
                    if let Err(e) = recorder.publish(&event, &reference).await {
                        warn!(error = %e, reason = %event.reason, "could not publish an event");
                    }
                    drop(turn);
                });
            }
        });
        Events { queue, dropped }
    }

    /// Queues `event` about `reference`; drops it (counted) when [`QUEUE`] events wait already.
    pub fn publish(&self, event: Event, reference: ObjectReference) {
        if let Err(e) = self.queue.try_send((event, reference)) {
            self.dropped.inc();
            let (event, _) = e.into_inner();
            debug!(reason = %event.reason, "event dropped: the queue of events is full");
        }
    }
}
