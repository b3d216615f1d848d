"""
Tests for L{iapd.pki}, the C{iap-pki} command and the L{certs} test PKI.

Certificates are read back with L{iapd.roles}, the code the daemons use, and one real
pyOpenSSL handshake proves that the EKU convention (DESIGN.md 4) survives OpenSSL's
verification of both peers.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL

import iapd
from iapd import pki
from iapd.pki_cli import main
from iapd.roles import (
    IAP_ALERT_CONSUMER,
    IAP_ALERT_GENERATOR,
    IAP_IDEF_CONFIGURATOR,
    extended_key_usages,
    has_role,
    identity_of,
)

from .certs import handshake, make_test_pki

CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
X509_V_ERR_INVALID_PURPOSE = 26

EXPECTED_USAGES = {
    ("sensor", False): {CLIENT_AUTH, IAP_ALERT_GENERATOR},
    ("manager", False): {SERVER_AUTH, IAP_ALERT_CONSUMER},
    ("manager", True): {SERVER_AUTH, IAP_ALERT_CONSUMER, IAP_IDEF_CONFIGURATOR},
    ("proxy", False): {SERVER_AUTH, CLIENT_AUTH},
}


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_signed_by(cert: x509.Certificate, ca: x509.Certificate) -> None:
    """Raises unless C{ca}'s key made C{cert}'s signature."""
    assert cert.issuer == ca.subject
    ca.public_key().verify(  # type: ignore[call-arg]
        cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
    )


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "ca"
    pki.init_ca(directory)
    return directory


class TestInitCA:
    def test_files_and_modes(self, tmp_path: Path) -> None:
        directory = tmp_path / "new" / "ca"
        cert_path = pki.init_ca(directory)
        assert cert_path == directory / "ca.crt"
        assert mode_of(directory) == 0o700
        assert mode_of(directory / "ca.key") == 0o600
        assert b"-----BEGIN PRIVATE KEY-----" in (directory / "ca.key").read_bytes()

    def test_key_mode_ignores_permissive_umask(self, tmp_path: Path) -> None:
        old = os.umask(0)
        try:
            pki.init_ca(tmp_path / "ca")
        finally:
            os.umask(old)
        assert mode_of(tmp_path / "ca" / "ca.key") == 0o600

    def test_ca_certificate_profile(self, ca_dir: Path) -> None:
        cert = load_cert(ca_dir / "ca.crt")
        ext = cert.extensions
        bc = ext.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and bc.value.ca and bc.value.path_length == 0
        ku = ext.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
        assert not ku.value.digital_signature
        ext.get_extension_for_class(x509.SubjectKeyIdentifier)
        # An EKU on the CA would be intersected with every leaf's and break the roles.
        with pytest.raises(x509.ExtensionNotFound):
            ext.get_extension_for_class(x509.ExtendedKeyUsage)
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.public_key().curve.name == "secp256r1"
        assert cert.signature_hash_algorithm.name == "sha256"
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
            "iapd development CA"
        )
        assert_signed_by(cert, cert)

    def test_name_and_days(self, tmp_path: Path) -> None:
        cert = load_cert(pki.init_ca(tmp_path, name="Example CA", days=10))
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Example CA"
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert lifetime == timedelta(days=10) + pki.BACKDATE

    @pytest.mark.parametrize("existing", ["ca.key", "ca.crt"])
    def test_refuses_to_overwrite(self, tmp_path: Path, existing: str) -> None:
        (tmp_path / existing).write_bytes(b"precious")
        with pytest.raises(pki.PKIError, match=f"CA already exists in {tmp_path}: {existing}"):
            pki.init_ca(tmp_path)
        assert (tmp_path / existing).read_bytes() == b"precious"
        assert sorted(p.name for p in tmp_path.iterdir()) == [existing]


class TestIssue:
    @pytest.mark.parametrize(("role", "configurator"), sorted(EXPECTED_USAGES))
    def test_role_usages(self, ca_dir: Path, role: str, configurator: bool) -> None:
        cert_path, key_path = pki.issue(ca_dir, role, "host.test", configurator=configurator)
        assert (cert_path, key_path) == (ca_dir / "host.test.crt", ca_dir / "host.test.key")
        assert mode_of(key_path) == 0o600
        cert = load_cert(cert_path)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        assert eku.critical
        assert extended_key_usages(cert) == EXPECTED_USAGES[role, configurator]
        assert has_role(cert, IAP_ALERT_GENERATOR) == (role == "sensor")
        assert has_role(cert, IAP_ALERT_CONSUMER) == (role == "manager")
        assert has_role(cert, IAP_IDEF_CONFIGURATOR) == configurator

    def test_leaf_profile(self, ca_dir: Path) -> None:
        before = datetime.now(timezone.utc).replace(microsecond=0)
        cert = load_cert(pki.issue(ca_dir, "sensor", "Sensor1.Example.org", days=30)[0])
        ca = load_cert(ca_dir / "ca.crt")
        ext = cert.extensions
        assert cert.subject.rfc4514_string() == "CN=Sensor1.Example.org"
        san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["Sensor1.Example.org"]
        assert identity_of(cert) == "sensor1.example.org"
        bc = ext.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and not bc.value.ca
        ku = ext.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
        aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert aki.key_identifier == ca_ski.digest
        ext.get_extension_for_class(x509.SubjectKeyIdentifier)
        assert cert.not_valid_before_utc <= before - pki.BACKDATE + timedelta(seconds=2)
        assert cert.not_valid_before_utc >= before - pki.BACKDATE - timedelta(seconds=2)
        assert cert.not_valid_after_utc - cert.not_valid_before_utc == (
            timedelta(days=30) + pki.BACKDATE
        )
        assert_signed_by(cert, ca)

    def test_random_serials(self, ca_dir: Path) -> None:
        a = load_cert(pki.issue(ca_dir, "sensor", "a.test")[0])
        b = load_cert(pki.issue(ca_dir, "sensor", "b.test")[0])
        assert a.serial_number != b.serial_number
        assert a.serial_number.bit_length() > 64

    def test_long_name_lives_in_critical_san(self, ca_dir: Path) -> None:
        name = ".".join(["a" * 60, "b" * 60, "test"])
        cert = load_cert(pki.issue(ca_dir, "sensor", name)[0])
        assert len(cert.subject) == 0
        assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
        assert identity_of(cert) == name

    def test_verifies_with_policy_builder(self, ca_dir: Path) -> None:
        """
        cryptography's own path validation accepts the certificates once its web PKI
        profile tolerates a critical EKU (the draft asks for critical role extensions).
        """
        verification = pytest.importorskip("cryptography.x509.verification")
        if not hasattr(verification, "ExtensionPolicy"):
            pytest.skip("cryptography < 45 has no ExtensionPolicy")

        def require_purpose(policy, cert, eku) -> None:
            if eku is None or policy.extended_key_usage not in eku:
                raise ValueError(f"EKU lacks {policy.extended_key_usage}")

        ee_policy = verification.ExtensionPolicy.webpki_defaults_ee().may_be_present(
            x509.ExtendedKeyUsage, verification.Criticality.AGNOSTIC, require_purpose
        )
        builder = (
            verification.PolicyBuilder()
            .store(verification.Store([load_cert(ca_dir / "ca.crt")]))
            .extension_policies(
                ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=ee_policy,
            )
        )
        manager = load_cert(pki.issue(ca_dir, "manager", "manager.test")[0])
        sensor = load_cert(pki.issue(ca_dir, "sensor", "sensor.test")[0])
        server_verifier = builder.build_server_verifier(verification.DNSName("manager.test"))
        assert server_verifier.verify(manager, [])[0] == manager
        client = builder.build_client_verifier().verify(sensor, [])
        assert client.subjects == [x509.DNSName("sensor.test")]
        # The TLS purpose is still enforced: a sensor certificate cannot serve.
        with pytest.raises(verification.VerificationError, match="serverAuth"):
            builder.build_server_verifier(verification.DNSName("sensor.test")).verify(sensor, [])

    def test_refuses_to_overwrite(self, ca_dir: Path) -> None:
        cert_path, key_path = pki.issue(ca_dir, "sensor", "s.test")
        key_before = key_path.read_bytes()
        with pytest.raises(pki.PKIError, match="refusing to overwrite s.test.key, s.test.crt"):
            pki.issue(ca_dir, "manager", "s.test")
        assert key_path.read_bytes() == key_before

    def test_refuses_half_pair_without_writing(self, ca_dir: Path) -> None:
        (ca_dir / "s.test.crt").write_bytes(b"precious")
        with pytest.raises(pki.PKIError, match="refusing to overwrite s.test.crt"):
            pki.issue(ca_dir, "sensor", "s.test")
        assert not (ca_dir / "s.test.key").exists()

    def test_unknown_role(self, ca_dir: Path) -> None:
        message = "unknown role 'admin': choose one of sensor, manager, proxy"
        with pytest.raises(pki.PKIError, match=message):
            pki.issue(ca_dir, "admin", "x.test")

    def test_configurator_only_for_managers(self, ca_dir: Path) -> None:
        with pytest.raises(pki.PKIError, match="manager certificates only"):
            pki.issue(ca_dir, "sensor", "x.test", configurator=True)

    @pytest.mark.parametrize(
        "name",
        ["", "a..b", ".a", "a.", "-a.test", "a-.test", "a_b.test", "*.test", "../x",
         "a/b", "a b", "\u212a.test", "é.test", "a" * 64 + ".test", ("a" * 63 + ".") * 4],
    )
    def test_bad_names(self, ca_dir: Path, name: str) -> None:
        with pytest.raises(pki.PKIError, match="invalid name"):
            pki.issue(ca_dir, "sensor", name)
        assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.crt", "ca.key"]

    @pytest.mark.parametrize("name", ["a", "localhost", "1.2", "xn--bcher-kva.test", "a-b.C9.test"])
    def test_good_names(self, ca_dir: Path, name: str) -> None:
        pki.issue(ca_dir, "sensor", name)

    def test_missing_ca(self, tmp_path: Path) -> None:
        with pytest.raises(pki.PKIError, match=r"no CA in .*: ca.key not found .*iap-pki init-ca"):
            pki.issue(tmp_path, "sensor", "s.test")

    def test_mismatched_ca_key(self, tmp_path: Path) -> None:
        pki.init_ca(tmp_path / "a")
        pki.init_ca(tmp_path / "b")
        (tmp_path / "b" / "ca.key").unlink()
        os.link(tmp_path / "a" / "ca.key", tmp_path / "b" / "ca.key")
        with pytest.raises(pki.PKIError, match="does not belong to"):
            pki.issue(tmp_path / "b", "sensor", "s.test")


class TestMakeCertificate:
    def test_no_eku_means_no_role(self) -> None:
        ca_key, ca_cert = pki.make_self_signed_ca("t")
        _, cert = pki.make_certificate(ca_key, ca_cert, "x.test", None)
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        assert extended_key_usages(cert) == frozenset()
        assert not has_role(cert, IAP_ALERT_GENERATOR)
        assert_signed_by(cert, ca_cert)

    def test_noncritical_role_is_refused(self) -> None:
        ca_key, ca_cert = pki.make_self_signed_ca("t")
        _, cert = pki.make_certificate(
            ca_key, ca_cert, "x.test", [CLIENT_AUTH, IAP_ALERT_GENERATOR], eku_critical=False
        )
        assert IAP_ALERT_GENERATOR in extended_key_usages(cert)
        assert not has_role(cert, IAP_ALERT_GENERATOR)

    def test_cn_fallback_without_san(self) -> None:
        ca_key, ca_cert = pki.make_self_signed_ca("t")
        _, cert = pki.make_certificate(ca_key, ca_cert, "CN-Only.test", [CLIENT_AUTH], san=False)
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert identity_of(cert) == "cn-only.test"

    def test_validity_and_ca_flag(self) -> None:
        ca_key, ca_cert = pki.make_self_signed_ca("t")
        start = datetime(2020, 1, 1, tzinfo=timezone.utc)
        end = datetime(2020, 2, 1, tzinfo=timezone.utc)
        _, cert = pki.make_certificate(
            ca_key, ca_cert, "sub.test", None, not_before=start, not_after=end, is_ca=True
        )
        assert (cert.not_valid_before_utc, cert.not_valid_after_utc) == (start, end)
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


class TestTestPKI:
    """The shared helper really has the defects the TLS tests rely on."""

    @pytest.fixture(scope="class")
    def shared_pki(self, tmp_path_factory: pytest.TempPathFactory):
        return make_test_pki(tmp_path_factory.mktemp("pki"))

    def test_defects(self, shared_pki) -> None:
        ca = load_cert(shared_pki.ca)
        other = load_cert(shared_pki.other_ca)
        c = {name: load_cert(getattr(shared_pki, name)[0]) for name in (
            "manager", "sensor", "sensor2", "sensor_cn_only", "sensor_no_role",
            "sensor_noncritical", "sensor_expired", "sensor_other_ca", "manager_no_consumer",
            "manager_as_sensor", "manager_other_ca", "manager_wrong_name", "sensor_ed25519")}
        for name, cert in c.items():
            assert_signed_by(cert, other if name.endswith("_other_ca") else ca)
            key_path = getattr(shared_pki, name)[1]
            assert mode_of(key_path) == 0o600
        assert [identity_of(c[n]) for n in ("manager", "sensor", "sensor2")] == [
            "manager.test", "sensor1.test", "sensor2.test"]
        assert has_role(c["manager"], IAP_ALERT_CONSUMER)
        for n in ("sensor", "sensor2", "sensor_cn_only", "sensor_expired", "sensor_other_ca"):
            assert has_role(c[n], IAP_ALERT_GENERATOR), n
        assert identity_of(c["sensor_cn_only"]) == "sensor-cn.test"
        with pytest.raises(x509.ExtensionNotFound):
            c["sensor_cn_only"].extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert extended_key_usages(c["sensor_no_role"]) == {CLIENT_AUTH}
        assert not has_role(c["sensor_noncritical"], IAP_ALERT_GENERATOR)
        assert c["sensor_expired"].not_valid_after_utc < datetime.now(timezone.utc)
        assert extended_key_usages(c["manager_no_consumer"]) == {SERVER_AUTH}
        assert extended_key_usages(c["manager_as_sensor"]) == {CLIENT_AUTH, IAP_ALERT_GENERATOR}
        assert has_role(c["manager_other_ca"], IAP_ALERT_CONSUMER)
        assert identity_of(c["manager_other_ca"]) == "manager.test"
        assert has_role(c["manager_wrong_name"], IAP_ALERT_CONSUMER)
        assert identity_of(c["manager_wrong_name"]) == "other-manager.test"
        assert isinstance(c["sensor_ed25519"].public_key(), ed25519.Ed25519PublicKey)
        assert has_role(c["sensor_ed25519"], IAP_ALERT_GENERATOR)


class TestCLI:
    def test_init_and_issue(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        directory = tmp_path / "pki"
        assert main(["init-ca", str(directory), "--name", "Test CA", "--days", "30"]) == 0
        assert capsys.readouterr().out.split() == [
            "wrote", str(directory / "ca.key"), "wrote", str(directory / "ca.crt")]
        assert main(["issue", str(directory), "--role", "manager", "m.test", "--configurator",
                     "--days", "7"]) == 0
        assert capsys.readouterr().out.split() == [
            "wrote", str(directory / "m.test.key"), "wrote", str(directory / "m.test.crt")]
        assert mode_of(directory) == 0o700
        assert mode_of(directory / "ca.key") == mode_of(directory / "m.test.key") == 0o600
        cert = load_cert(directory / "m.test.crt")
        assert has_role(cert, IAP_ALERT_CONSUMER) and has_role(cert, IAP_IDEF_CONFIGURATOR)
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert lifetime == timedelta(days=7) + pki.BACKDATE
        assert_signed_by(cert, load_cert(directory / "ca.crt"))

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["issue", "{d}", "--role", "sensor", "x.test"], "no CA in {d}: ca.key not found"),
            (["init-ca", "{d}"], None),
            (["issue", "{d}", "--role", "sensor", "bad_name"], "invalid name 'bad_name'"),
            (["issue", "{d}", "--role", "admin", "x.test"],
             "argument --role: invalid choice: 'admin' (choose from"),
            (["issue", "{d}", "x.test"], "the following arguments are required: --role"),
            (["issue", "{d}", "--role", "sensor", "x.test", "--days", "0"],
             "argument --days: must be at least 1"),
            (["issue", "{d}", "--role", "proxy", "x.test", "--configurator"],
             "the configurator role applies to manager certificates only"),
            ([], "the following arguments are required: COMMAND"),
        ],
    )
    def test_errors(self, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                    argv: list[str], message: str | None) -> None:
        d = str(tmp_path / "pki")
        if message is None:  # a second init-ca
            assert main(["init-ca", d]) == 0
            capsys.readouterr()
            message = f"CA already exists in {d}: ca.key, ca.crt"
        assert main([a.format(d=d) for a in argv]) == 2
        out, err = capsys.readouterr()
        assert out == ""
        assert f"iap-pki: error: {message.format(d=d)}" in err
        assert "Traceback" not in err

    def test_help_explains_roles(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["issue", "--help"]) == 0
        out = capsys.readouterr().out
        for text in ("sensor", "manager", "proxy", "clientAuth", "serverAuth",
                     IAP_ALERT_GENERATOR.dotted_string, IAP_ALERT_CONSUMER.dotted_string,
                     IAP_IDEF_CONFIGURATOR.dotted_string, "untrusted"):
            assert text in out

    def run_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        root = str(Path(iapd.__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [root, os.environ.get("PYTHONPATH")])))
        return subprocess.run([sys.executable, "-m", "iapd.pki_cli", *args],
                              capture_output=True, text=True, env=env, timeout=60)

    def test_real_process(self, tmp_path: Path) -> None:
        d = tmp_path / "pki"
        done = self.run_cli("init-ca", str(d))
        assert (done.returncode, done.stderr) == (0, "")
        done = self.run_cli("issue", str(d), "--role", "sensor", "s.test")
        assert (done.returncode, done.stderr) == (0, "")
        assert str(d / "s.test.crt") in done.stdout
        assert mode_of(d / "s.test.key") == 0o600
        assert has_role(load_cert(d / "s.test.crt"), IAP_ALERT_GENERATOR)
        done = self.run_cli("issue", str(d), "--role", "sensor", "s.test")
        assert done.returncode == 2
        assert done.stderr == (
            f"iap-pki: error: refusing to overwrite s.test.key, s.test.crt in {d}\n")


# Real TLS: OpenSSL's own verification of the convention, through memory BIOs.

def tls_context(ca: Path, cert: Path, key: Path, errors: list[int],
                version: int = SSL.TLS1_3_VERSION) -> SSL.Context:
    def record(conn, x509_, errnum, depth, ok):
        if not ok:
            errors.append(errnum)
        return ok

    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_max_proto_version(version)
    ctx.load_verify_locations(str(ca))
    ctx.use_certificate_file(str(cert))
    ctx.use_privatekey_file(str(key))
    ctx.check_privatekey()
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, record)
    return ctx


def pair(ca: Path, sensor: tuple[Path, Path], manager: tuple[Path, Path],
         version: int = SSL.TLS1_3_VERSION):
    client_errors: list[int] = []
    server_errors: list[int] = []
    client = SSL.Connection(tls_context(ca, *sensor, client_errors, version), None)
    client.set_connect_state()
    client.set_tlsext_host_name(b"manager.test")
    server = SSL.Connection(tls_context(ca, *manager, server_errors, version), None)
    server.set_accept_state()
    return client, server, client_errors, server_errors


class TestTLS:
    @pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION])
    def test_mutual_auth_with_issued_certificates(self, ca_dir: Path, version: int) -> None:
        from service_identity.cryptography import verify_certificate_hostname

        sensor = pki.issue(ca_dir, "sensor", "sensor1.test")
        manager = pki.issue(ca_dir, "manager", "manager.test")
        client, server, client_errors, server_errors = pair(
            ca_dir / "ca.crt", sensor, manager, version)
        handshake(client, server)
        assert client_errors == server_errors == []
        assert client.get_protocol_version() == server.get_protocol_version()
        client.send(b"IAP/0.2 IAP-Version: 0.2\r\n\r\n")
        server.bio_write(client.bio_read(65536))
        assert server.recv(1024) == b"IAP/0.2 IAP-Version: 0.2\r\n\r\n"

        seen_by_manager = server.get_peer_certificate().to_cryptography()
        seen_by_sensor = client.get_peer_certificate().to_cryptography()
        assert has_role(seen_by_manager, IAP_ALERT_GENERATOR)
        assert identity_of(seen_by_manager) == "sensor1.test"
        assert has_role(seen_by_sensor, IAP_ALERT_CONSUMER)
        verify_certificate_hostname(seen_by_sensor, "manager.test")

    def test_role_oid_alone_is_refused_by_openssl(self, ca_dir: Path) -> None:
        """Without clientAuth beside it, OpenSSL's SSL client purpose check fails."""
        ca_key, ca_cert = pki.load_ca(ca_dir)
        key, cert = pki.make_certificate(ca_key, ca_cert, "bare.test", [IAP_ALERT_GENERATOR])
        bare = pki.write_pair(ca_dir, "bare", key, cert)
        manager = pki.issue(ca_dir, "manager", "manager.test")
        client, server, client_errors, server_errors = pair(ca_dir / "ca.crt", bare, manager)
        with pytest.raises(SSL.Error):
            handshake(client, server)
        assert server_errors == [X509_V_ERR_INVALID_PURPOSE]
        assert client_errors == []
