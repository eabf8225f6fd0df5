//! A queue between threads whose receiver is woken once a tick while items keep coming, not
//! once an item: in a connect storm, the hand-over of opened sessions from the openings'
//! runtime to the sessions' runtime, and the controller's publications to its bus task.
//!
//! A channel wakes its receiver for every item that finds it idle. In a storm of 3,000–4,000
//! connections a second, each opened session spawned onto the sessions' runtime and each
//! admission's audit event sent to the bus task woke a parked worker there, and on two cores
//! each wake-up preempts a thread that was handshaking (BENCHMARKS.md, issue 11, eleventh and
//! thirteenth days). Here a push wakes the receiver only when the queue was empty, and the
//! receiver takes everything queued at once: immediately after a quiet moment (a lone item
//! waits for nothing), and while items keep coming, a [`TICK`] after its previous take, so an
//! item waits a tick at most.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// While items keep coming, how long after one take the receiver makes the next.
pub const TICK: Duration = Duration::from_millis(1);

/// How long without a take counts as a quiet moment (the next item is taken at once).
const QUIET: Duration = Duration::from_millis(4);

struct Queue<T> {
    items: Vec<T>,
    /// No more items are accepted ([`Handover::close`]).
    closed: bool,
    /// When the receiver last took items.
    last_take: Option<Instant>,
}

/// Items on their way from any thread to one receiving task; see the module's documentation.
pub struct Handover<T> {
    queue: Mutex<Queue<T>>,
    ready: Notify,
}

impl<T> Default for Handover<T> {
    fn default() -> Self {
        Handover {
            queue: Mutex::new(Queue {
                items: Vec::new(),
                closed: false,
                last_take: None,
            }),
            ready: Notify::new(),
        }
    }
}

impl<T> Handover<T> {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue<T>> {
        // Every critical section is a single Vec operation: a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `item`, waking the receiver only if nothing was queued (it takes all that is
    /// queued when it runs); `Err(item)` once the queue is closed.
    pub fn push(&self, item: T) -> Result<(), T> {
        let first = {
            let mut queue = self.queue();
            if queue.closed {
                return Err(item);
            }
            queue.items.push(item);
            queue.items.len() == 1
        };
        if first {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Waits for items and takes all that are queued, in the order pushed: at once after a
    /// quiet moment, else a [`TICK`] after the previous take. Cancel-safe (for `select!`):
    /// items are taken only when this returns. Never returns an empty batch; on a closed
    /// queue it waits for ever (see [`Handover::close`]).
    pub async fn take(&self) -> Vec<T> {
        loop {
            let last_take = {
                let queue = self.queue();
                (!queue.items.is_empty()).then_some(queue.last_take)
            };
            let Some(last_take) = last_take else {
                self.ready.notified().await;
                continue;
            };
            if let Some(at) = last_take.filter(|at| at.elapsed() < QUIET) {
                tokio::time::sleep_until(at + TICK).await;
            }
            let mut queue = self.queue();
            if queue.items.is_empty() {
                continue;
            }
            queue.last_take = Some(Instant::now());
            return std::mem::take(&mut queue.items);
        }
    }

    /// What is queued now, without waiting.
    pub fn try_take(&self) -> Vec<T> {
        std::mem::take(&mut self.queue().items)
    }

    /// Refuses every later push and returns what is queued: the receiver's last take.
    pub fn close(&self) -> Vec<T> {
        let mut queue = self.queue();
        queue.closed = true;
        std::mem::take(&mut queue.items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A receiver that records when it took each item.
    fn receiver(
        handover: &Arc<Handover<u32>>,
    ) -> tokio::sync::mpsc::UnboundedReceiver<(u32, Instant)> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let handover = Arc::clone(handover);
        tokio::spawn(async move {
            loop {
                for item in handover.take().await {
                    let _ = tx.send((item, Instant::now()));
                }
            }
        });
        rx
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_item_is_taken_at_once_and_a_storm_a_tick_at_a_time() {
        let handover = Arc::new(Handover::default());
        let mut taken = receiver(&handover);
        let start = Instant::now();
        assert!(handover.push(1).is_ok());
        let (item, at) = taken.recv().await.expect("taken");
        assert_eq!((item, at), (1, start), "a lone item waits for nothing");
        // More right after: gathered until a tick after the last take, then taken together,
        // in order.
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
    async fn a_take_given_up_while_it_waits_for_the_tick_loses_nothing() {
        let handover: Handover<u32> = Handover::default();
        assert!(handover.push(1).is_ok());
        assert_eq!(handover.take().await, [1]);
        assert!(handover.push(2).is_ok());
        // Within the tick: the take is waiting for it when it is given up.
        // (A zero timeout polls the take once: far enough to wait for the tick.)
        let given_up = tokio::time::timeout(Duration::ZERO, handover.take()).await;
        assert!(given_up.is_err(), "it waited for the tick");
        assert!(handover.push(3).is_ok());
        assert_eq!(handover.take().await, [2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_queue_gives_what_it_holds_and_refuses_the_rest() {
        let handover: Handover<u32> = Handover::default();
        assert!(handover.push(1).is_ok());
        assert!(handover.push(2).is_ok());
        assert_eq!(handover.close(), [1, 2]);
        assert_eq!(handover.push(3), Err(3));
        assert!(handover.try_take().is_empty());
    }

    #[test]
    fn try_take_takes_what_is_queued_without_waiting() {
        let handover: Handover<u32> = Handover::default();
        assert!(handover.try_take().is_empty());
        assert!(handover.push(7).is_ok());
        assert_eq!(handover.try_take(), [7]);
    }
}
