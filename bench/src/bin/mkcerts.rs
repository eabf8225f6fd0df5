//! Makes the bench's test CA and a server certificate (localhost, 127.0.0.1) into a directory:
//! ca.pem, ca.key, server.pem, server.key.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Output directory.
    dir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)?;
    let ca = fleet_certs::FleetCa::generate("bench manufacturer CA")?;
    let server = ca.issue_server(
        &["localhost".to_string()],
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
    )?;
    let d = &args.dir;
    std::fs::write(d.join("ca.pem"), ca.cert_pem())?;
    std::fs::write(d.join("ca.key"), ca.key_pem())?;
    std::fs::write(d.join("server.pem"), &server.cert_pem)?;
    std::fs::write(d.join("server.key"), &server.key_pem)?;
    println!("{}", d.display());
    Ok(())
}
