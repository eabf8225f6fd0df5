//! The hand-over of opened sessions from the openings' runtime to the sessions' runtime: in a
//! storm, a tick's worth at a time.
//!
//! Spawning each opened session onto the sessions' runtime from the other one woke a parked
//! worker there for every connection (and that worker, finding work, woke its sibling): 1.25
//! context switches a connection, about a seventh of fleetd's CPU in a connect storm
//! (BENCHMARKS.md, issue 11, eleventh day). One task on the sessions' runtime takes them over
//! instead: at once after a quiet moment (a lone connection waits for nothing), and while they
//! keep coming, every [`TICK`], all that came meanwhile together, which costs a session at most
//! a tick before its first read; its CONNACK was written before.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// While sessions keep coming, how long the receiver lets them gather.
pub(crate) const TICK: Duration = Duration::from_millis(1);

/// Items on their way from one runtime to a task on another.
pub(crate) struct Handover<T> {
    /// What waits, and whether the receiver has ended (nothing is taken over any more).
    queue: Mutex<(Vec<T>, bool)>,
    ready: Notify,
}

impl<T: Send + 'static> Handover<T> {
    pub(crate) fn new() -> Arc<Handover<T>> {
        Arc::new(Handover {
            queue: Mutex::new((Vec::new(), false)),
            ready: Notify::new(),
        })
    }

    /// Queues `item` for the receiver, waking it only if nothing was queued (it takes all that
    /// is queued when it runs); `Err(item)` once the receiver has ended.
    pub(crate) fn push(&self, item: T) -> Result<(), T> {
        let first = {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if queue.1 {
                return Err(item);
            }
            queue.0.push(item);
            queue.0.len() == 1
        };
        if first {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Hands every queued item to `take`, in the order queued, until `shutdown` turns true:
    /// then what is queued, and from then on `push` refuses. After a quiet moment (nothing
    /// taken within four ticks) an item is taken at once; while items keep coming, a tick
    /// after the previous hand-over.
    pub(crate) async fn receive(
        &self,
        mut shutdown: watch::Receiver<bool>,
        mut take: impl FnMut(T),
    ) {
        let mut last: Option<Instant> = None;
        loop {
            let mut stopping = *shutdown.borrow();
            if !stopping {
                let changed = tokio::select! {
                    _ = self.ready.notified() => None,
                    changed = shutdown.changed() => Some(changed.is_ok()),
                };
                stopping = match changed {
                    // The notice's sender is gone: as a shutdown.
                    Some(false) => true,
                    Some(true) => *shutdown.borrow(),
                    None => false,
                };
                if !stopping && last.is_some_and(|at| at.elapsed() < 4 * TICK) {
                    tokio::time::sleep(TICK).await;
                }
            }
            let items = {
                let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                queue.1 = stopping;
                std::mem::take(&mut queue.0)
            };
            last = Some(Instant::now());
            items.into_iter().for_each(&mut take);
            if stopping {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receiver that records when it took each item.
    fn receiver(
        handover: &Arc<Handover<u32>>,
        shutdown: watch::Receiver<bool>,
    ) -> tokio::sync::mpsc::UnboundedReceiver<(u32, Instant)> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let handover = Arc::clone(handover);
        tokio::spawn(async move {
            let take = |item| {
                let _ = tx.send((item, Instant::now()));
            };
            handover.receive(shutdown, take).await;
        });
        rx
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_item_is_taken_at_once_and_a_storm_a_tick_at_a_time() {
        let (_stop, shutdown) = watch::channel(false);
        let handover = Handover::new();
        let mut taken = receiver(&handover, shutdown);
        let start = Instant::now();
        assert!(handover.push(1).is_ok());
        let (item, at) = taken.recv().await.expect("taken");
        assert_eq!((item, at), (1, start), "a lone item waits for nothing");
        // More right after: gathered for a tick, then taken together, in order.
        for item in 2..=4 {
            assert!(handover.push(item).is_ok());
        }
        let mut storm = Vec::new();
        for _ in 2..=4 {
            storm.push(taken.recv().await.expect("taken"));
        }
        assert_eq!(storm.iter().map(|t| t.0).collect::<Vec<_>>(), [2, 3, 4]);
        assert!(storm.iter().all(|t| t.1 == start + TICK), "{storm:?}");
        // After a quiet moment, at once again.
        tokio::time::sleep(10 * TICK).await;
        let quiet = Instant::now();
        assert!(handover.push(5).is_ok());
        assert_eq!(taken.recv().await.expect("taken"), (5, quiet));
    }

    #[tokio::test(start_paused = true)]
    async fn at_shutdown_what_is_queued_is_taken_and_then_nothing_is_accepted() {
        let (stop, shutdown) = watch::channel(false);
        let handover = Handover::new();
        let mut taken = receiver(&handover, shutdown);
        assert!(handover.push(1).is_ok());
        assert_eq!(taken.recv().await.expect("taken").0, 1);
        assert!(handover.push(2).is_ok());
        assert!(stop.send(true).is_ok());
        assert_eq!(taken.recv().await.expect("taken").0, 2);
        assert!(taken.recv().await.is_none(), "the receiver ended");
        assert_eq!(handover.push(3), Err(3));
    }
}
