//! Bare rustls mutual-TLS accept loop: client certificates required and verified by rustls's
//! own verifier against `--ca` (the clients' CA-chained certificates, as mosquitto and rumqttd
//! verify them in compare.sh), one tokio task per connection, no MQTT. Connections are held
//! until the peer closes them.

use std::sync::Arc;

use clap::Parser;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8884")]
    listen: String,
    #[arg(long)]
    cert: std::path::PathBuf,
    #[arg(long)]
    key: std::path::PathBuf,
    /// The CA (PEM) that client certificates must chain to.
    #[arg(long)]
    ca: std::path::PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let provider = fleet_certs::crypto_provider();
    let certs = fleet_certs::certs_from_pem(&std::fs::read_to_string(&args.cert)?)?;
    let key = fleet_certs::key_from_pem(&std::fs::read_to_string(&args.key)?)?;
    let mut roots = RootCertStore::empty();
    for ca in fleet_certs::certs_from_pem(&std::fs::read_to_string(&args.ca)?)? {
        roots.add(ca)?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(&args.listen).await?;
    eprintln!("tls-loop-server listening on {}", args.listen);
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        tcp.set_nodelay(true).ok();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            if let Ok(mut tls) = acceptor.accept(tcp).await {
                let mut buf = [0u8; 512];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            }
        });
    }
}
