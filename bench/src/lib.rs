//! Shared helpers of the connect-storm bench.

use std::fs;
use std::path::Path;

/// Reads `utime + stime` (clock ticks) and VmRSS (KiB) of a process from /proc.
pub fn proc_sample(pid: u32) -> anyhow::Result<(u64, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')').ok_or_else(|| anyhow::anyhow!("bad stat"))? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = f[11].parse()?;
    let stime: u64 = f[12].parse()?;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((utime + stime, rss))
}

/// Clock ticks per second (USER_HZ); 100 on every Linux this runs on.
pub const CLK_TCK: u64 = 100;

pub fn write(path: &Path, data: &str) -> anyhow::Result<()> {
    fs::write(path, data)?;
    Ok(())
}
