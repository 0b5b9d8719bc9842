"""DEV/TEST ONLY key material: chains, names, file modes, the config snippet, a real handshake."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent.config import parse_config
from agent.devpki import CONTROL_PLANE_URI, DEV_ONLY, DevMaterial, IssuedCert, make_dev_pki
from agent.rpc.envelope import open_envelope
from agent.rpc.pb import agent_pb2 as pb
from agent.rpc.signing import (
    keyid_for,
    make_header,
    private_key_from_pem,
    sign_envelope,
    trust_policy_from_config,
)

AGENT = "dialer-01.example"


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> DevMaterial:
    return make_dev_pki(tmp_path_factory.mktemp("pki"), AGENT)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def verifier(material: DevMaterial) -> PolicyBuilder:
    return PolicyBuilder().store(Store([load(material.ca_cert)])).time(dt.datetime.now(dt.UTC))


def sans(path: Path) -> x509.SubjectAlternativeName:
    return load(path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value


@pytest.mark.parametrize(
    "name",
    [
        x509.DNSName("localhost"),
        x509.DNSName(AGENT),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ],
    ids=str,
)
def test_server_cert_chains_to_the_ca_for_each_of_its_names(
    material: DevMaterial, name: x509.DNSName | x509.IPAddress
) -> None:
    chain = verifier(material).build_server_verifier(name).verify(load(material.server.cert), [])
    assert chain[-1] == load(material.ca_cert)


def test_server_cert_is_ecdsa_p256_named_after_the_agent(material: DevMaterial) -> None:
    cert = load(material.server.cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == AGENT
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)


def test_control_plane_client_cert_chains_and_names_the_control_plane(
    material: DevMaterial,
) -> None:
    verified = verifier(material).build_client_verifier().verify(load(material.client.cert), [])
    assert verified.subjects == [x509.UniformResourceIdentifier(CONTROL_PLANE_URI)]
    cn = load(material.client.cert).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert cn[0].value == "control-plane"


def test_server_cert_is_not_a_client_cert(material: DevMaterial) -> None:
    with pytest.raises(VerificationError):
        verifier(material).build_client_verifier().verify(load(material.server.cert), [])


def test_private_keys_are_owner_only_and_certs_world_readable(material: DevMaterial) -> None:
    for path in (material.ca_key, material.client.key, material.signing.key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # The daemon reads its key as the service user: group-readable, as the README installs it.
    assert stat.S_IMODE(material.server.key.stat().st_mode) == 0o640
    for path in (material.ca_cert, material.server.cert, material.client.cert):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


@pytest.mark.parametrize(("name", "mode"), [("server.key", 0o640), ("client.key", 0o600)])
def test_regenerating_tightens_a_key_file_that_was_readable(
    tmp_path: Path, name: str, mode: int
) -> None:
    key = tmp_path / name
    key.write_bytes(b"old")
    key.chmod(0o644)
    make_dev_pki(tmp_path, AGENT)
    assert stat.S_IMODE(key.stat().st_mode) == mode


def test_every_file_says_dev_test_only(material: DevMaterial) -> None:
    files = sorted(p for p in material.directory.iterdir() if p.is_file())
    assert files
    for path in files:
        assert DEV_ONLY.encode() in path.read_bytes(), path
    assert DEV_ONLY in material.config_toml()
    for cert in (material.ca_cert, material.server.cert, material.client.cert):
        assert DEV_ONLY in load(cert).subject.rfc4514_string()


def test_signing_key_matches_its_keyid_and_public_key(material: DevMaterial) -> None:
    key = private_key_from_pem(material.signing.key.read_bytes())
    assert keyid_for(key.public_key()) == material.signing.keyid
    assert material.signing.public_b64 in material.config_snippet.read_text()


def test_config_snippet_loads_and_trusts_the_signing_key(material: DevMaterial) -> None:
    config = parse_config(f'agent_id = "{AGENT}"\n' + material.config_snippet.read_text())
    assert config.api.server_cert == material.server.cert
    assert config.api.server_key == material.server.key
    assert config.api.client_ca == material.ca_cert
    assert config.api.allowed_identities == (CONTROL_PLANE_URI,)
    policy = trust_policy_from_config(config)
    key = private_key_from_pem(material.signing.key.read_bytes())
    request = pb.EraseRequest(header=make_header(AGENT, 1_000_000), subject="x")
    opened = open_envelope(sign_envelope(request, key), pb.EraseRequest, policy, 1_000_000)
    assert opened.keyid == material.signing.keyid


def test_config_toml_takes_a_listen_address_and_other_keys(material: DevMaterial) -> None:
    text = material.config_toml(
        listen="127.0.0.1:17443", allowed_identities=["spiffe://x/y"], trusted_keys={}
    )
    config = parse_config(f'agent_id = "{AGENT}"\n' + text)
    assert config.api.port == 17443
    assert config.api.allowed_identities == ("spiffe://x/y",)
    assert config.signing.trusted_keys == ()


def test_extra_certs_come_from_the_same_ca(material: DevMaterial) -> None:
    intruder = material.issue_client_cert(
        "intruder", common_name="intruder", uri_sans=["spiffe://vicifast/intruder"]
    )
    verified = verifier(material).build_client_verifier().verify(load(intruder.cert), [])
    assert verified.subjects == [x509.UniformResourceIdentifier("spiffe://vicifast/intruder")]
    assert stat.S_IMODE(intruder.key.stat().st_mode) == 0o600

    rotated = material.issue_server_cert("server-rotated")
    assert load(rotated.cert).serial_number != load(material.server.cert).serial_number
    assert sans(rotated.cert) == sans(material.server.cert)
    verifier(material).build_server_verifier(x509.DNSName("localhost")).verify(
        load(rotated.cert), []
    )


def test_extra_certs_may_be_expired(material: DevMaterial) -> None:
    past = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    old = material.issue_client_cert("expired", not_before=past, not_after=past + dt.timedelta(1))
    with pytest.raises(VerificationError):
        verifier(material).build_client_verifier().verify(load(old.cert), [])


def test_extra_signing_keys_are_distinct(material: DevMaterial) -> None:
    second = material.new_signing_key("signing-next")
    assert second.keyid != material.signing.keyid
    assert stat.S_IMODE(second.key.stat().st_mode) == 0o600


# ---------------------------------------------------------------------------------------------
# The material works for gRPC mutual TLS (BoringSSL reads the files with their banner).


def health_status(port: int, ca: Path, client: IssuedCert) -> object:
    credentials = grpc.ssl_channel_credentials(
        ca.read_bytes(), client.key.read_bytes(), client.cert.read_bytes()
    )
    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        try:
            request = health_pb2.HealthCheckRequest()
            return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status
        except grpc.RpcError as exc:
            return exc.code()


def test_dev_material_completes_an_mtls_handshake_and_foreign_clients_do_not(
    material: DevMaterial, tmp_path: Path
) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    credentials = grpc.ssl_server_credentials(
        [(material.server.key.read_bytes(), material.server.cert.read_bytes())],
        root_certificates=material.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("localhost:0", credentials)
    server.start()
    try:
        foreign = make_dev_pki(tmp_path, AGENT)
        assert health_status(port, material.ca_cert, material.client) == (
            health_pb2.HealthCheckResponse.SERVING
        )
        assert health_status(port, material.ca_cert, foreign.client) == (
            grpc.StatusCode.UNAVAILABLE
        )
    finally:
        server.stop(None)
