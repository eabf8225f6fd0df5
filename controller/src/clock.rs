//! The controller shell's clock. The state machines take `now` as an argument; the shell reads
//! it here, so that tests can run the real service on a simulated clock (30-minute lockouts,
//! 8-hour whitelists) without sleeping.

use std::sync::{Arc, Mutex};

use time::{Duration, OffsetDateTime};

#[derive(Debug)]
enum Source {
    System,
    /// Real time shifted by an offset that tests advance.
    Shifted(Mutex<Duration>),
}

/// A cheap, clonable clock.
#[derive(Debug, Clone)]
pub struct Clock(Arc<Source>);

impl Clock {
    /// The system's UTC clock.
    pub fn system() -> Clock {
        Clock(Arc::new(Source::System))
    }

    /// Real time plus an offset that [`Clock::advance`] moves forward: a simulated clock that
    /// still moves, so ordering between events stays natural.
    pub fn simulated() -> Clock {
        Clock(Arc::new(Source::Shifted(Mutex::new(Duration::ZERO))))
    }

    pub fn now(&self) -> OffsetDateTime {
        let real = OffsetDateTime::now_utc();
        match &*self.0 {
            Source::System => real,
            Source::Shifted(offset) => real + *offset.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Moves a simulated clock forward; a system clock ignores it (returns false).
    pub fn advance(&self, by: Duration) -> bool {
        match &*self.0 {
            Source::System => false,
            Source::Shifted(offset) => {
                *offset.lock().unwrap_or_else(|e| e.into_inner()) += by;
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_simulated_clock_jumps_and_a_system_clock_does_not() {
        let sim = Clock::simulated();
        let before = sim.now();
        assert!(sim.advance(Duration::hours(8)));
        assert!(sim.now() - before >= Duration::hours(8));
        let sys = Clock::system();
        assert!(!sys.advance(Duration::hours(8)));
        assert!(sys.now() - OffsetDateTime::now_utc() < Duration::minutes(1));
    }
}
