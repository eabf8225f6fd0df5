//! The simulator's limit on open files, raised at start from the soft limit to the hard one:
//! every simulated device holds a socket, and the usual soft limit of 1024 would end a load
//! long before the machine's own limit does.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors kept for all but the devices' sockets: the runtime, the operator's connection,
/// the state files a device opens while it boots.
pub const RESERVED: u64 = 64;

/// The soft limit on open files before and after [`raise_open_files`]; `None` is unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFiles {
    /// Before.
    pub before: Option<u64>,
    /// Now.
    pub now: Option<u64>,
}

impl OpenFiles {
    /// Devices that may be connected at once (a socket each, [`RESERVED`] kept for the rest);
    /// `None` when unlimited.
    pub fn devices(&self) -> Option<u64> {
        self.now.map(|n| n.saturating_sub(RESERVED))
    }
}

/// The limit to set for `limit`: the soft limit up to the hard one, when that is higher and
/// finite (an unlimited soft limit for open files is refused, by Linux and macOS alike);
/// `None` when there is nothing to raise.
pub fn raised(limit: Rlimit) -> Option<Rlimit> {
    match (limit.current, limit.maximum) {
        (Some(soft), Some(hard)) if soft < hard => Some(Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        }),
        _ => None,
    }
}

/// Raises this process's soft limit on open files to its hard limit.
pub fn raise_open_files() -> Result<OpenFiles, rustix::io::Errno> {
    let limit = getrlimit(Resource::Nofile);
    if let Some(new) = raised(limit) {
        setrlimit(Resource::Nofile, new)?;
    }
    Ok(OpenFiles {
        before: limit.current,
        now: getrlimit(Resource::Nofile).current,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(current: Option<u64>, maximum: Option<u64>) -> Rlimit {
        Rlimit { current, maximum }
    }

    #[test]
    fn the_soft_limit_goes_up_to_a_finite_hard_limit_only() {
        assert_eq!(
            raised(limit(Some(1024), Some(524_288))),
            Some(limit(Some(524_288), Some(524_288)))
        );
        assert_eq!(raised(limit(Some(20_000), Some(20_000))), None);
        assert_eq!(raised(limit(Some(1024), None)), None);
        assert_eq!(raised(limit(None, None)), None);
    }

    #[test]
    fn the_devices_allowed_leave_room_for_the_rest() {
        let files = |now| OpenFiles { before: None, now };
        assert_eq!(files(Some(20_000)).devices(), Some(20_000 - RESERVED));
        assert_eq!(files(Some(10)).devices(), Some(0));
        assert_eq!(files(None).devices(), None);
    }

    #[test]
    fn raising_leaves_the_soft_limit_at_the_hard_one() {
        let files = raise_open_files().expect("raise");
        let now = getrlimit(Resource::Nofile);
        assert_eq!(files.now, now.current);
        assert!(raised(now).is_none(), "{now:?}");
    }
}
