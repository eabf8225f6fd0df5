//! Shared helpers of the benches: reading a server's CPU time and RSS from /proc, and the one
//! MQTT exchange they time (CONNECT, CONNACK).

use std::fs;
use std::path::Path;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::Connect;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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

/// An MQTT 3.1.1 CONNECT as `client_id`: clean session, `keep_alive_s`, no username or
/// password, no will. Encoded by rumqttc, so that no bench writes MQTT frames by hand.
pub fn connect_packet(client_id: &str, keep_alive_s: u16) -> anyhow::Result<Vec<u8>> {
    let mut connect = Connect::new(client_id);
    connect.keep_alive = keep_alive_s;
    connect.clean_session = true;
    let mut buffer = BytesMut::new();
    connect
        .write(&mut buffer)
        .map_err(|e| anyhow::anyhow!("CONNECT of {client_id}: {e:?}"))?;
    Ok(buffer.to_vec())
}

/// Sends `connect` (from [`connect_packet`]) and reads the CONNACK; an error names the step
/// that failed, or the refusal's return code.
pub async fn connack<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    connect: &[u8],
) -> Result<(), String> {
    stream
        .write_all(connect)
        .await
        .map_err(|e| format!("write: {e}"))?;
    stream.flush().await.map_err(|e| format!("flush: {e}"))?;
    let mut ack = [0u8; 4];
    stream
        .read_exact(&mut ack)
        .await
        .map_err(|e| format!("connack: {e}"))?;
    if ack[0] != 0x20 {
        return Err(format!("not a CONNACK: {:#04x}", ack[0]));
    }
    if ack[3] != 0 {
        return Err(format!("CONNACK refused: {}", ack[3]));
    }
    Ok(())
}
