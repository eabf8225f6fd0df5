//! The processes a load run measures, by name: fleetd, or a cluster's edges, controllers, NATS
//! servers and PostgreSQL. Their CPU time and resident memory are read from Linux's `/proc`; a
//! process that has exited or cannot be read is "not measured", never an error of the run.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Clock ticks a second of the CPU times in `/proc/<pid>/stat` (Linux's USER_HZ, 100 on every
/// architecture it runs on).
const TICKS_PER_SECOND: f64 = 100.0;

/// One process to measure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeasuredProcess {
    /// What it is in the report: `edge-0`, `controller-1`, `nats-2`, `postgres-0`, or a name
    /// given with `--pid NAME=PID`.
    pub name: String,
    /// Its process id.
    pub pid: u32,
    /// Count its children too: PostgreSQL's postmaster does little itself, its backends (one
    /// child process per connection) do the work.
    pub with_children: bool,
    /// The server of the run (an index into [`crate::LoadOptions::servers`]) that this process
    /// listens on, when it is one: its CPU time is then also divided by the devices sent to it.
    pub edge: Option<usize>,
}

impl MeasuredProcess {
    /// Process `pid`, alone, named `name`, listening on none of the run's servers.
    pub fn new(name: impl Into<String>, pid: u32) -> Self {
        MeasuredProcess {
            name: name.into(),
            pid,
            with_children: false,
            edge: None,
        }
    }
}

/// `NAME=PID`, as `--pid` takes it: a name without `=` or white space, and a process id
/// above 0.
impl FromStr for MeasuredProcess {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let Some((name, pid)) = text.split_once('=') else {
            return Err(format!("{text:?} is not NAME=PID"));
        };
        if name.is_empty() || name.chars().any(char::is_whitespace) {
            return Err(format!(
                "{text:?}: the name before '=' must be non-empty, without spaces"
            ));
        }
        match pid.parse::<u32>() {
            Ok(pid) if pid > 0 => Ok(MeasuredProcess::new(name, pid)),
            _ => Err(format!("{text:?}: {pid:?} is not a process id")),
        }
    }
}

/// The fields of `/proc/<pid>/stat` that a measurement needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stat {
    /// Exited, not reaped yet (`Z`), or dead (`X`).
    exited: bool,
    ppid: u32,
    /// User plus system time of the process (all its threads), in ticks.
    own_ticks: u64,
    /// User plus system time of its children that it waited for, in ticks.
    reaped_children_ticks: u64,
    /// When it started, in ticks after boot: tells a process from a later one with its pid.
    start: u64,
}

/// The fields after the parenthesised command name (which may hold spaces and parentheses):
/// field 3 of the man page is the first.
fn fields_after_name(stat: &str) -> Option<Vec<&str>> {
    Some(stat[stat.rfind(')')? + 1..].split_whitespace().collect())
}

fn parse_stat(stat: &str) -> Option<Stat> {
    let fields = fields_after_name(stat)?;
    let number = |field: usize| fields.get(field - 3)?.parse::<u64>().ok();
    let state = *fields.first()?;
    Some(Stat {
        exited: matches!(state, "Z" | "X" | "x"),
        ppid: u32::try_from(number(4)?).ok()?,
        own_ticks: number(14)? + number(15)?,
        reaped_children_ticks: number(16)? + number(17)?,
        start: number(22)?,
    })
}

/// User plus system CPU time in clock ticks from the text of `/proc/<pid>/stat` (fields 14
/// and 15, counted after the parenthesised command name, which may hold spaces).
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let fields = fields_after_name(stat)?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS` in KiB from the text of `/proc/<pid>/status`.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => Some(value),
        Some(_) => None,
    }
}

fn read_stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn read_rss_kib(pid: u32) -> Option<u64> {
    parse_vm_rss(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// The processes whose parent is `pid`, found by reading every process's `stat`: the
/// kernel's own list (`/proc/<pid>/task/<tid>/children`) exists only with
/// `CONFIG_PROC_CHILDREN`, which not every kernel has.
fn children_of(pid: u32) -> Vec<(u32, Stat)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|child| Some((child, read_stat(child)?)))
        .filter(|(_, stat)| stat.ppid == pid)
        .collect()
}

/// A process's CPU time at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuSample {
    ticks: u64,
    start: u64,
}

impl CpuSample {
    /// The CPU time, in milliseconds, that the process spent from `self` to `later`; `None`
    /// when `later` is another process with the same pid (the first one exited) or counted
    /// less.
    pub fn ms_until(self, later: CpuSample) -> Option<f64> {
        if later.start != self.start || later.ticks < self.ticks {
            return None;
        }
        Some((later.ticks - self.ticks) as f64 * 1000.0 / TICKS_PER_SECOND)
    }
}

/// The CPU time of `process` so far; `None` when it has exited or cannot be read. With its
/// children: its own time, its reaped children's (a backend that ended during the run counts
/// there), and every live or unreaped child's own and reaped children's.
pub fn cpu_sample(process: &MeasuredProcess) -> Option<CpuSample> {
    let stat = read_stat(process.pid).filter(|s| !s.exited)?;
    let mut ticks = stat.own_ticks;
    if process.with_children {
        ticks += stat.reaped_children_ticks;
        ticks += children_of(process.pid)
            .iter()
            .map(|(_, child)| child.own_ticks + child.reaped_children_ticks)
            .sum::<u64>();
    }
    Some(CpuSample {
        ticks,
        start: stat.start,
    })
}

/// The resident memory of `process`, in KiB; `None` when it has exited or cannot be read.
/// With its children: the sum of their resident memory and its own, an upper bound (pages
/// they share, such as PostgreSQL's shared buffers, count once in each).
pub fn rss_kib(process: &MeasuredProcess) -> Option<u64> {
    let own = read_rss_kib(process.pid)?;
    if !process.with_children {
        return Some(own);
    }
    let children: u64 = children_of(process.pid)
        .iter()
        .filter_map(|(child, _)| read_rss_kib(*child))
        .sum();
    Some(own + children)
}

/// What one named process cost during a load run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessFigures {
    /// Its name (`edge-0`, `controller-0`, `nats-0`, `postgres-0`, or as `--pid` gave it).
    pub name: String,
    /// Its process id.
    pub pid: u32,
    /// Its children are counted in (PostgreSQL's backends).
    pub with_children: bool,
    /// The server address it listens on, when it is one of the run's servers.
    pub server: Option<String>,
    /// Devices (stations and phones) the run sent to that server.
    pub devices: Option<usize>,
    /// Its CPU time during the onboarding (the window of `fleetd_cpu_ms_per_device`).
    pub cpu_ms: Option<f64>,
    /// `cpu_ms` divided by the devices onboarded (by every server).
    pub cpu_ms_per_device: Option<f64>,
    /// `cpu_ms` divided by `devices`: what one connection costs this edge.
    pub cpu_ms_per_connection: Option<f64>,
    /// Its resident memory with every station connected (when `fleetd_rss_kib` is read).
    pub rss_kib: Option<u64>,
}

impl ProcessFigures {
    /// The figures of `process` from its CPU samples before and after the onboarding and its
    /// memory; `devices` are those sent to its server, `onboarded` those onboarded in all.
    pub fn new(
        process: &MeasuredProcess,
        server: Option<(&str, usize)>,
        cpu: (Option<CpuSample>, Option<CpuSample>),
        rss_kib: Option<u64>,
        onboarded: usize,
    ) -> Self {
        let cpu_ms = match cpu {
            (Some(before), Some(after)) => before.ms_until(after),
            _ => None,
        };
        let per = |n: usize| cpu_ms.filter(|_| n > 0).map(|ms| ms / n as f64);
        ProcessFigures {
            name: process.name.clone(),
            pid: process.pid,
            with_children: process.with_children,
            server: server.map(|(address, _)| address.to_owned()),
            devices: server.map(|(_, devices)| devices),
            cpu_ms,
            cpu_ms_per_device: per(onboarded),
            cpu_ms_per_connection: server.and_then(|(_, devices)| per(devices)),
            rss_kib,
        }
    }
}

/// The CPU time of every measured process together, per device onboarded; `None` when none
/// was measured or nothing was onboarded. A process not measured adds nothing.
pub fn total_cpu_ms_per_device(figures: &[ProcessFigures], onboarded: usize) -> Option<f64> {
    let measured: Vec<f64> = figures.iter().filter_map(|f| f.cpu_ms).collect();
    (!measured.is_empty() && onboarded > 0).then(|| measured.iter().sum::<f64>() / onboarded as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pid above Linux's largest (2^22): no such process.
    const NO_SUCH_PID: u32 = 4_000_000_000;

    #[test]
    fn a_pid_is_named_name_equals_pid() {
        let process: MeasuredProcess = "edge-a=1234".parse().unwrap();
        assert_eq!(process, MeasuredProcess::new("edge-a", 1234));
        assert!(!process.with_children);
        assert_eq!(process.edge, None);
        for bad in [
            "edge-a",
            "=12",
            "edge a=12",
            "edge=",
            "edge=0",
            "edge=-1",
            "edge=x",
        ] {
            let error = bad.parse::<MeasuredProcess>().unwrap_err();
            assert!(error.contains(bad), "{bad}: {error}");
        }
    }

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        let stat = "4242 (fleetd (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 37 4 6 20 0 \
                    9 0 777 3133440 376 18446744073709551615";
        let parsed = parse_stat(stat).unwrap();
        assert_eq!(
            parsed,
            Stat {
                exited: false,
                ppid: 1,
                own_ticks: 287,
                reaped_children_ticks: 10,
                start: 777,
            }
        );
        assert_eq!(parse_cpu_ticks(stat), Some(287));
        assert!(parse_stat(&stat.replace(") S", ") Z")).unwrap().exited);
        assert_eq!(parse_stat("4242 (fleetd) S 1 2 3"), None);
    }

    #[test]
    fn cpu_time_is_the_difference_of_samples_of_one_process() {
        let before = CpuSample {
            ticks: 100,
            start: 7,
        };
        let after = CpuSample {
            ticks: 125,
            start: 7,
        };
        assert_eq!(before.ms_until(after), Some(250.0));
        // The pid was taken by a later process.
        let other = CpuSample {
            ticks: 125,
            start: 8,
        };
        assert_eq!(before.ms_until(other), None);
        assert_eq!(after.ms_until(before), None);
    }

    #[test]
    fn the_test_process_is_measured_from_proc() {
        let me = MeasuredProcess::new("me", std::process::id());
        let before = cpu_sample(&me).expect("own stat");
        // Spend CPU until the clock has ticked (bounded: a process that never sees its own
        // CPU time move fails here).
        let started = std::time::Instant::now();
        let mut x = 0u64;
        let (after, ms) = loop {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            let after = cpu_sample(&me).expect("own stat");
            let ms = before.ms_until(after).expect("the same process");
            if ms > 0.0 {
                break (after, ms);
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "no CPU time seen"
            );
        };
        let rss = rss_kib(&me).expect("own status");
        assert!(rss > 0);

        let figures = ProcessFigures::new(
            &me,
            Some(("127.0.0.1:8883", 4)),
            (Some(before), Some(after)),
            Some(rss),
            2,
        );
        assert_eq!(figures.cpu_ms, Some(ms));
        assert_eq!(figures.cpu_ms_per_device, Some(ms / 2.0));
        assert_eq!(figures.cpu_ms_per_connection, Some(ms / 4.0));
        assert_eq!(figures.devices, Some(4));
        assert_eq!(figures.server.as_deref(), Some("127.0.0.1:8883"));
        assert_eq!(figures.rss_kib, Some(rss));
        assert_eq!(total_cpu_ms_per_device(&[figures], 2), Some(ms / 2.0));
    }

    #[test]
    fn a_process_with_children_counts_them() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep starts");
        let me = MeasuredProcess {
            with_children: true,
            ..MeasuredProcess::new("me", std::process::id())
        };
        // Once it is `sleep` (before its exec it is a copy of this process, as big).
        let comm = format!("/proc/{}/comm", child.id());
        let started = std::time::Instant::now();
        while std::fs::read_to_string(&comm).map_or(true, |c| c.trim() != "sleep") {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "no exec"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let children = children_of(me.pid);
        let found = children.iter().any(|(pid, _)| *pid == child.id());
        let alone = || rss_kib(&MeasuredProcess::new("me", me.pid)).expect("own status");
        let child_rss = rss_kib(&MeasuredProcess::new("child", child.id()));
        let before = alone();
        let with_children = rss_kib(&me).expect("own and the child's status");
        let after = alone();
        let sample = cpu_sample(&me);
        let _ = child.kill();
        let _ = child.wait();
        assert!(found, "{children:?}");
        assert!(sample.is_some());
        // The child's memory is added: more than the test's own alone by at least half the
        // child's (the test's own may move a little between the reads).
        let child_rss = child_rss.expect("the child's status");
        assert!(
            with_children >= before.min(after) + child_rss / 2,
            "{with_children} KiB with the child, {before}/{after} KiB alone, child {child_rss} KiB"
        );
    }

    #[test]
    fn a_process_that_is_gone_is_not_measured() {
        let gone = MeasuredProcess::new("gone", NO_SUCH_PID);
        assert_eq!(cpu_sample(&gone), None);
        assert_eq!(rss_kib(&gone), None);
        let figures = ProcessFigures::new(&gone, Some(("h:1", 3)), (None, None), None, 3);
        assert_eq!(figures.cpu_ms, None);
        assert_eq!(figures.cpu_ms_per_device, None);
        assert_eq!(figures.cpu_ms_per_connection, None);
        assert_eq!(figures.rss_kib, None);
        assert_eq!(total_cpu_ms_per_device(&[figures], 3), None);
        // Nothing onboarded, or no device sent to the edge: no figure per device.
        let me = MeasuredProcess::new("me", std::process::id());
        let sample = cpu_sample(&me);
        let figures = ProcessFigures::new(&me, Some(("h:1", 0)), (sample, sample), None, 0);
        assert_eq!(figures.cpu_ms, Some(0.0));
        assert_eq!(figures.cpu_ms_per_device, None);
        assert_eq!(figures.cpu_ms_per_connection, None);
    }
}
