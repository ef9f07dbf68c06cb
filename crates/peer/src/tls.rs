//! TLS 1.3 for peers. No CA: the server accepts any correctly self-signed Ed25519 client
//! certificate and takes its key as the principal; the client accepts a server only when the
//! server's certificate key equals the key pinned in the httpkey URL.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use std::sync::Arc;
use x509_parser::prelude::*;

use super::identity::{key_id, Identity};

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Checks that `der` is a well-formed, currently valid, correctly self-signed certificate for
/// an Ed25519 key, and returns that key.
pub fn self_signed_key(der: &[u8], now: UnixTime) -> Result<[u8; 32], String> {
    let (rest, cert) =
        parse_x509_certificate(der).map_err(|e| format!("malformed certificate: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the certificate".into());
    }
    let spki = cert.public_key();
    if spki.algorithm.algorithm != x509_parser::oid_registry::OID_SIG_ED25519 {
        return Err("certificate key is not Ed25519".into());
    }
    let key: [u8; 32] = spki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| "Ed25519 key is not 32 bytes".to_string())?;
    if cert.issuer() != cert.subject() {
        return Err("certificate is not self-signed (issuer differs from subject)".into());
    }
    cert.verify_signature(None)
        .map_err(|e| format!("certificate is not signed by its own key: {e}"))?;
    let at = ASN1Time::from_timestamp(now.as_secs() as i64).map_err(|e| e.to_string())?;
    if !cert.validity().is_valid_at(at) {
        return Err("certificate is outside its validity period".into());
    }
    Ok(key)
}

/// The key of an already verified peer certificate.
pub fn cert_key(der: &[u8]) -> Option<[u8; 32]> {
    let (_, cert) = parse_x509_certificate(der).ok()?;
    cert.public_key()
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .ok()
}

/// The signature methods both verifiers share: TLS 1.3 only, with the provider's algorithms.
macro_rules! tls13_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            Err(Error::General("TLS 1.2 is not offered".into()))
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            tls13_sig(message, cert, dss)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            schemes()
        }
    };
}

fn tls13_sig(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    verify_tls13_signature(
        message,
        cert,
        dss,
        &provider().signature_verification_algorithms,
    )
}

fn schemes() -> Vec<SignatureScheme> {
    provider()
        .signature_verification_algorithms
        .supported_schemes()
}

/// Server side: a client certificate is required and must be correctly self-signed.
#[derive(Debug)]
pub struct SelfSignedClients;

impl ClientCertVerifier for SelfSignedClients {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        match self_signed_key(end_entity, now) {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(reason) => {
                tracing::debug!(%reason, "peer client certificate refused");
                Err(Error::General(reason))
            }
        }
    }
    tls13_signatures!();
}

/// The key of a server's certificate, which must be valid and correctly self-signed.
fn server_key(end_entity: &CertificateDer<'_>, now: UnixTime) -> Result<[u8; 32], Error> {
    self_signed_key(end_entity, now)
        .map_err(|r| Error::General(format!("server certificate refused: {r}")))
}

/// Client side: the server must present a self-signed certificate for the pinned key.
#[derive(Debug)]
pub struct PinnedServer {
    pub expected: [u8; 32],
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let key = server_key(end_entity, now)?;
        if key != self.expected {
            return Err(Error::General(format!(
                "server key {} does not match the pinned key {}",
                key_id(&key),
                key_id(&self.expected)
            )));
        }
        Ok(ServerCertVerified::assertion())
    }
    tls13_signatures!();
}

/// Client side of a discovery probe: any valid self-signed Ed25519 server is accepted; the
/// caller reads the key it presented (`probe_key`) and decides nothing else from it.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        server_key(end_entity, now)?;
        Ok(ServerCertVerified::assertion())
    }
    tls13_signatures!();
}

/// Learns the key of the node listening at the other end of `stream` (a node found by
/// discovery): a mutual-TLS handshake presenting `id`, then the connection is dropped.
pub async fn probe_key<S>(
    id: &Identity,
    stream: S,
    timeout: std::time::Duration,
) -> Result<[u8; 32], String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer))
        .with_client_auth_cert(vec![id.cert()], id.private_key())
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("thali.peer").map_err(|e| e.to_string())?;
    let tls = tokio::time::timeout(
        timeout,
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, stream),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_string())?
    .map_err(|e| format!("TLS handshake failed: {e}"))?;
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| cert_key(c))
        .ok_or_else(|| "the server presented no certificate".to_string())
}

pub fn server_config(id: &Identity) -> Result<Arc<rustls::ServerConfig>, Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(SelfSignedClients))
        .with_single_cert(vec![id.cert()], id.private_key())?;
    // No resumption: every connection proves its key afresh. Tickets sent after the handshake
    // also delayed the first response on a new connection by ~40 ms (delayed ACK), measured.
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// A client configuration that presents `id` and accepts only the server key `expected`.
pub fn client_config(
    id: &Identity,
    expected: [u8; 32],
) -> Result<Arc<rustls::ClientConfig>, Error> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer { expected }))
        .with_client_auth_cert(vec![id.cert()], id.private_key())?;
    Ok(Arc::new(cfg))
}

/// Runs the client side of the mutual-TLS handshake over `stream` (TCP or an onion stream),
/// presenting `id` and pinning the httpkey URL's key.
pub async fn connect<S>(
    id: &Identity,
    url: &super::HttpKeyUrl,
    stream: S,
    timeout: std::time::Duration,
) -> Result<tokio_rustls::client::TlsStream<S>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let super::PeerKey::Ed25519(expected) = url.key else {
        return Err(
            "rsapublickey URLs can be parsed but not dialed: thali nodes use Ed25519 keys".into(),
        );
    };
    let cfg = client_config(id, expected).map_err(|e| e.to_string())?;
    let addr = format!("{}:{}", url.host, url.port);
    // The name is not checked (the key is); it only has to be syntactically valid.
    let name = ServerName::try_from("thali.peer").map_err(|e| e.to_string())?;
    tokio::time::timeout(
        timeout,
        tokio_rustls::TlsConnector::from(cfg).connect(name, stream),
    )
    .await
    .map_err(|_| format!("TLS handshake with {addr} timed out"))?
    .map_err(|e| format!("TLS handshake with {addr} failed: {e}"))
}
