"""proto/, its version file, devstack's LND and the committed stubs agree (service.lightning.protos).

The stubs are regenerated with the pinned grpcio-tools into a temporary folder and compared byte
for byte; a failure here means: run ``python -m service.lightning.protos --update`` (after
installing the pinned grpcio-tools), or fix proto/ (proto/README.md says how to update)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from service.lightning import protos

ROOT = Path(__file__).resolve().parents[2]


def _devstack_lnd_versions() -> dict[str, str]:
    """The LND version each devstack file builds or runs by default."""
    build = re.search(r"^LND_VERSION=\$\{LND_VERSION:-([^}]+)\}", (ROOT / "devstack/build.sh").read_text(), re.M)
    stack = re.search(
        r"^LND_VERSION = os\.environ\.get\(\"LND_VERSION\", \"([^\"]+)\"\)", (ROOT / "devstack/stack").read_text(), re.M
    )
    assert build and stack, "devstack's LND_VERSION default is no longer where this test reads it"
    return {"devstack/build.sh": build[1], "devstack/stack": stack[1]}


def test_the_protos_are_the_recorded_files() -> None:
    assert protos.source_drift() == []


def test_the_recorded_lnd_version_is_devstacks() -> None:
    version = protos.recorded()["lnd_version"]
    assert _devstack_lnd_versions() == {"devstack/build.sh": version, "devstack/stack": version}


def test_the_committed_stubs_are_what_the_protos_generate() -> None:
    assert protos.stub_drift() == []


def test_a_changed_proto_or_stub_is_reported(tmp_path: Path) -> None:
    """The checks above can fail: one byte changed in a proto, or in a stub, is found."""
    proto_dir, package_dir = tmp_path / "proto", tmp_path / "lnrpc"
    shutil.copytree(protos.PROTO_DIR, proto_dir)
    shutil.copytree(protos.PACKAGE_DIR, package_dir, ignore=shutil.ignore_patterns("__pycache__"))
    stub = package_dir / "routerrpc" / "router_pb2.py"
    stub.write_text(stub.read_text().replace("RouteFeeRequest", "RouteFeeRequesT", 1))
    assert protos.stub_drift(package_dir) == ["routerrpc/router_pb2.py: differs"]
    (package_dir / "routerrpc" / "router_pb2.py").unlink()
    assert protos.stub_drift(package_dir) == ["routerrpc/router_pb2.py: missing"]
    with (proto_dir / "routerrpc" / "router.proto").open("a") as f:
        f.write("// edited\n")
    assert [p.split(":")[0] for p in protos.source_drift(proto_dir)] == ["routerrpc/router.proto"]


def test_the_stubs_are_lnds_current_api() -> None:
    """What the 0.16 stubs lacked and the client now uses, by name from the generated code."""
    from service.lightning._stubs import ln, rt

    assert ln.Payment.PaymentStatus.Name(ln.Payment.INITIATED) == "INITIATED"
    assert ln.PaymentFailureReason.Name(ln.FAILURE_REASON_CANCELED) == "FAILURE_REASON_CANCELED"
    assert "payment_request" in rt.RouteFeeRequest.DESCRIPTOR.fields_by_name
    assert "cancelable" in rt.SendPaymentRequest.DESCRIPTOR.fields_by_name
    assert "blinded_paths" in ln.PayReq.DESCRIPTOR.fields_by_name
    assert "DeleteCanceledInvoice" in ln.DESCRIPTOR.services_by_name["Lightning"].methods_by_name


def test_the_clients_enums_name_every_value_of_lnds() -> None:
    """A value a new LND version adds (read as our default today) fails here, to be named."""
    from service.lightning import client
    from service.lightning._stubs import ln

    pairs = [
        (client.InvoiceState, ln.Invoice.InvoiceState, ""),
        (client.HtlcState, ln.InvoiceHTLCState, ""),
        (client.PaymentStatus, ln.Payment.PaymentStatus, ""),
        (client.FailureReason, ln.PaymentFailureReason, "FAILURE_REASON_"),
    ]
    for ours, theirs, prefix in pairs:
        assert {m.name: m.value for m in ours} == {
            name.removeprefix(prefix): value for name, value in theirs.items()
        }, ours.__name__
