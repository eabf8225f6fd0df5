//! rumqttd 0.20's own broker, embedded bare: one v4 listener with TLS and client-certificate
//! verification (`capath`), default-ish router settings sized for a connect storm.

use std::collections::HashMap;

use clap::Parser;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8885")]
    listen: std::net::SocketAddr,
    #[arg(long)]
    cert: String,
    #[arg(long)]
    key: String,
    /// CA that client certificates must chain to.
    #[arg(long)]
    ca: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server = ServerSettings {
        name: "v4-tls".into(),
        listen: args.listen,
        tls: Some(TlsConfig::Rustls {
            capath: Some(args.ca),
            certpath: args.cert,
            keypath: args.key,
        }),
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 60000,
            max_payload_size: 20480,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 100_000,
            max_outgoing_packet_count: 200,
            max_segment_size: 104_857_600,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    eprintln!("rumqttd-tls listening on {}", args.listen);
    Broker::new(config).start()?;
    Ok(())
}
