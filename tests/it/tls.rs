//! TLS and mTLS on the gRPC listener, with certificates made for the test (rcgen): plaintext
//! refused, a wrong client certificate refused, certificates reloaded without a restart, and
//! the CLI over TLS.

use std::path::{Path, PathBuf};
use std::time::Duration;

use herald::proto::broker_service_client::BrokerServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::support::authority::Authority;
use crate::support::{Backend, eventually, publish_request, spawn_app};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    // Written whole, then renamed into place, as a certificate manager does.
    let staged = dir.join(format!("{name}.new"));
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(&staged, &path).unwrap();
    path
}

async fn tls_client(
    address: std::net::SocketAddr,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<BrokerServiceClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://localhost:{}", address.port()))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(BrokerServiceClient::new(channel))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_the_api_refuses_plaintext_and_reloads_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let first = Authority::new();
    let (cert, key) = first.leaf(&["localhost", "127.0.0.1"]);
    let cert_path = write(dir.path(), "cert.pem", &cert);
    let key_path = write(dir.path(), "key.pem", &key);
    let app = spawn_app(Backend::Embedded, |config| {
        config.tls_cert = Some(cert_path.clone());
        config.tls_key = Some(key_path.clone());
    })
    .await;
    let mut client = tls_client(app.address, &first.pem(), None).await.unwrap();
    client
        .publish(publish_request("t", "x"))
        .await
        .expect("over TLS");

    // Plaintext HTTP/2 gets no answer from a TLS listener.
    let plaintext = Channel::from_shared(format!("http://{}", app.address))
        .unwrap()
        .timeout(Duration::from_secs(2))
        .connect_lazy();
    let refused = BrokerServiceClient::new(plaintext)
        .publish(publish_request("t", "x"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Internal
        ),
        "{refused:?}"
    );

    // The certificate is renewed by another CA: served without a restart.
    let second = Authority::new();
    let (cert, key) = second.leaf(&["localhost"]);
    write(dir.path(), "key.pem", &key);
    write(dir.path(), "cert.pem", &cert);
    eventually(
        Duration::from_secs(10),
        "the new certificate is served",
        || async {
            match tls_client(app.address, &second.pem(), None).await {
                Ok(mut client) => client.publish(publish_request("t", "x")).await.is_ok(),
                Err(_) => false,
            }
        },
    )
    .await;
    assert!(
        tls_client(app.address, &first.pem(), None).await.is_err(),
        "the old certificate is gone"
    );
    // The CLI trusts the CA it is given.
    let ca_path = write(dir.path(), "ca.pem", &second.pem());
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["publish", "--topic", "t", "--data", "{}", "--tls-ca"])
        .arg(&ca_path)
        .args([
            "--server",
            &format!("https://localhost:{}", app.address.port()),
        ])
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_clients_without_a_certificate_from_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let servers = Authority::new();
    let clients = Authority::new();
    let strangers = Authority::new();
    let (cert, key) = servers.leaf(&["localhost"]);
    let cert_path = write(dir.path(), "cert.pem", &cert);
    let key_path = write(dir.path(), "key.pem", &key);
    let client_ca = write(dir.path(), "clients.pem", &clients.pem());
    let app = spawn_app(Backend::Embedded, |config| {
        config.tls_cert = Some(cert_path.clone());
        config.tls_key = Some(key_path.clone());
        config.tls_client_ca = Some(client_ca.clone());
    })
    .await;
    let attempt = |identity: Option<(String, String)>| {
        let ca = servers.pem();
        let address = app.address;
        async move {
            let mut client = tls_client(address, &ca, identity.as_ref()).await.ok()?;
            client.publish(publish_request("t", "x")).await.ok()
        }
    };
    assert!(attempt(None).await.is_none(), "no client certificate");
    assert!(
        attempt(Some(strangers.leaf(&["client"]))).await.is_none(),
        "a certificate from another CA"
    );
    assert!(
        attempt(Some(clients.leaf(&["client"]))).await.is_some(),
        "a certificate from the client CA"
    );
    app.stop().await;
}
