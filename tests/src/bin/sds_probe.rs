//! `sds-probe`: subscribes to one secret over delta SDS as any client
//! could (no credentials of its own unless given), and reports what came
//! back as one JSON line. The tests run it as another user, or without the
//! right client certificate, to show such a caller gets nothing.
//!
//! `sds-probe unix:/path NAME` or `sds-probe tcp:127.0.0.1:9181 NAME
//! [--ca ca.pem] [--cert c.pem --key k.pem]`.

use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

struct Report {
    connected: bool,
    resources: usize,
    key_bytes: bool,
    error: String,
}

fn arg(args: &[String], flag: &str) -> Option<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1).cloned())
}

async fn channel(target: &str, args: &[String]) -> Result<tonic::transport::Channel, String> {
    if let Some(path) = target.strip_prefix("unix:") {
        let path = path.to_owned();
        return Endpoint::try_from("http://sds.invalid")
            .map_err(|e| e.to_string())?
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|e| format!("{e:?}"));
    }
    let addr = target.strip_prefix("tcp:").ok_or("unix:PATH or tcp:ADDR")?;
    let mut tls = ClientTlsConfig::new().domain_name("localhost");
    if let Some(ca) = arg(args, "--ca") {
        let pem = std::fs::read(ca).map_err(|e| e.to_string())?;
        tls = tls.ca_certificate(Certificate::from_pem(pem));
    }
    if let (Some(cert), Some(key)) = (arg(args, "--cert"), arg(args, "--key")) {
        let cert = std::fs::read(cert).map_err(|e| e.to_string())?;
        let key = std::fs::read(key).map_err(|e| e.to_string())?;
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::try_from(format!("https://{addr}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn probe(target: &str, name: &str, args: &[String]) -> Report {
    let mut report = Report {
        connected: false,
        resources: 0,
        key_bytes: false,
        error: String::new(),
    };
    let channel = match channel(target, args).await {
        Ok(channel) => channel,
        Err(e) => {
            report.error = e;
            return report;
        }
    };
    report.connected = true;
    let request = DeltaDiscoveryRequest {
        type_url: SECRET_TYPE.into(),
        resource_names_subscribe: vec![name.into()],
        ..DeltaDiscoveryRequest::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let _ = tx.send(request).await;
    let mut client = SecretDiscoveryServiceClient::new(channel);
    let stream = client
        .delta_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let mut stream = match stream {
        Ok(response) => response.into_inner(),
        Err(status) => {
            report.error = status.to_string();
            return report;
        }
    };
    let deadline = tokio::time::sleep(Duration::from_secs(3));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => break,
            message = stream.message() => match message {
                Ok(Some(response)) => {
                    report.resources += response.resources.len();
                    let bytes = prost::Message::encode_to_vec(&response);
                    report.key_bytes |= bytes.windows(11).any(|w| w == b"PRIVATE KEY");
                }
                Ok(None) => break,
                Err(status) => {
                    report.error = status.to_string();
                    break;
                }
            },
        }
    }
    drop(tx);
    report
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(target), Some(name)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: sds-probe unix:PATH|tcp:ADDR NAME [--ca F] [--cert F --key F]");
        std::process::exit(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let report = runtime.block_on(probe(target, name, &args));
    println!(
        "{}",
        serde_json::json!({
            "connected": report.connected,
            "resources": report.resources,
            "key_bytes": report.key_bytes,
            "error": report.error,
        })
    );
}
