//! A throwaway certificate authority and server certificates for the test bed.

use std::fmt;

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::{X509, X509NameBuilder};

use super::TestBedError;
use super::postgres::TEST_HOST as TEST_HOST_NAME;

const VALID_DAYS: u32 = 30;

/// A certificate authority that exists only for one test run.
pub struct TestCa {
    key: PKey<Private>,
    certificate: X509,
}

/// A server certificate and its key, in PEM.
#[derive(Clone)]
pub struct ServerCertificate {
    /// The certificate, PEM.
    pub certificate_pem: Vec<u8>,
    /// The private key, PKCS#8 PEM.
    pub key_pem: Vec<u8>,
}

impl fmt::Debug for ServerCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerCertificate { .. }")
    }
}

impl fmt::Debug for TestCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

fn new_key() -> Result<PKey<Private>, TestBedError> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    Ok(PKey::from_ec_key(EcKey::generate(&group)?)?)
}

/// A self-signed certificate with a 2048-bit RSA key (what Entra requires of service
/// principal certificates), valid for a day.
pub(crate) fn self_signed_rsa(common_name: &str) -> Result<(X509, PKey<Private>), TestBedError> {
    let key = PKey::from_rsa(openssl::rsa::Rsa::generate(2048)?)?;
    let mut builder = certificate_builder(common_name, &key, None, 1)?;
    builder.sign(&key, MessageDigest::sha256())?;
    Ok((builder.build(), key))
}

/// A certificate for `key` issued to `common_name` by `issuer` (itself when `None`), valid
/// for `days` from now; the caller adds extensions and signs.
fn certificate_builder(
    common_name: &str,
    key: &PKey<Private>,
    issuer: Option<&openssl::x509::X509NameRef>,
    days: u32,
) -> Result<openssl::x509::X509Builder, TestBedError> {
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(Nid::COMMONNAME, common_name)?;
    let name = name.build();
    let mut builder = X509::builder()?;
    builder.set_version(2)?;
    let serial = serial()?;
    builder.set_serial_number(&serial)?;
    builder.set_subject_name(&name)?;
    builder.set_issuer_name(issuer.unwrap_or(&name))?;
    builder.set_pubkey(key)?;
    builder.set_not_before(&*Asn1Time::days_from_now(0)?)?;
    builder.set_not_after(&*Asn1Time::days_from_now(days)?)?;
    Ok(builder)
}

fn serial() -> Result<openssl::asn1::Asn1Integer, TestBedError> {
    let mut serial = BigNum::new()?;
    serial.rand(120, MsbOption::MAYBE_ZERO, false)?;
    Ok(serial.to_asn1_integer()?)
}

impl TestCa {
    /// A new CA named `common_name`.
    pub fn generate(common_name: &str) -> Result<Self, TestBedError> {
        let key = new_key()?;
        let mut builder = certificate_builder(common_name, &key, None, VALID_DAYS)?;
        builder.append_extension(BasicConstraints::new().critical().ca().build()?)?;
        builder.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()?,
        )?;
        let ski = SubjectKeyIdentifier::new().build(&builder.x509v3_context(None, None))?;
        builder.append_extension(ski)?;
        builder.sign(&key, MessageDigest::sha256())?;
        Ok(Self {
            key,
            certificate: builder.build(),
        })
    }

    /// The CA certificate, PEM: what a client adds as a trusted root (`PGSSLROOTCERT`).
    pub fn certificate_pem(&self) -> Result<Vec<u8>, TestBedError> {
        Ok(self.certificate.to_pem()?)
    }

    /// A server certificate for `localhost` and `127.0.0.1`, signed by this CA.
    pub fn issue_server_certificate(&self) -> Result<ServerCertificate, TestBedError> {
        self.issue(TEST_HOST_NAME, true)
    }

    /// A server certificate for `dns_name` alone (no address), signed by this CA: a server
    /// that a client trusting this CA must still refuse under any other name.
    pub fn issue_certificate_for(&self, dns_name: &str) -> Result<ServerCertificate, TestBedError> {
        self.issue(dns_name, false)
    }

    fn issue(
        &self,
        dns_name: &str,
        loopback_addresses: bool,
    ) -> Result<ServerCertificate, TestBedError> {
        let key = new_key()?;
        let mut builder = certificate_builder(
            dns_name,
            &key,
            Some(self.certificate.subject_name()),
            VALID_DAYS,
        )?;
        builder.append_extension(BasicConstraints::new().build()?)?;
        builder.append_extension(
            KeyUsage::new()
                .critical()
                .digital_signature()
                .key_agreement()
                .build()?,
        )?;
        builder.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
        let context = builder.x509v3_context(Some(&self.certificate), None);
        let mut san = SubjectAlternativeName::new();
        san.dns(dns_name);
        if loopback_addresses {
            san.ip("127.0.0.1").ip("::1");
        }
        let san = san.build(&context)?;
        let aki = AuthorityKeyIdentifier::new()
            .keyid(false)
            .issuer(false)
            .build(&context)?;
        builder.append_extension(san)?;
        builder.append_extension(aki)?;
        builder.sign(&self.key, MessageDigest::sha256())?;
        Ok(ServerCertificate {
            certificate_pem: builder.build().to_pem()?,
            key_pem: key.private_key_to_pem_pkcs8()?,
        })
    }
}
