"""The library internals the lean transport rests on (server/transport/internals.py): a canary against the
installed libraries, so that an upgrade that renames or reshapes one fails here, and the probe
itself on fake modules."""

from __future__ import annotations

import logging
import types
from typing import Any

import pytest

from testpulse.transport import auto, internals
from testpulse.transport.internals import Need

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("need", internals.LEAN, ids=lambda need: need.name)
def test_installed_libraries_have_what_the_lean_transport_uses(need: Need) -> None:
    assert internals.missing([need]) == []


@pytest.mark.parametrize("need", internals.SHARED, ids=lambda need: need.name)
def test_installed_libraries_have_what_both_transports_use(need: Need) -> None:
    assert internals.missing([need]) == []


@pytest.mark.parametrize("need", internals.BROKER, ids=lambda need: need.name)
def test_installed_libraries_have_what_the_redis_manager_uses(need: Need) -> None:
    assert internals.missing([need]) == []


@pytest.mark.parametrize("need", internals.REDIS_CLUSTER, ids=lambda need: need.name)
def test_installed_libraries_have_what_redis_cluster_support_uses(need: Need) -> None:
    assert internals.missing([need]) == []


def test_auto_picks_lean_on_the_installed_libraries() -> None:
    assert auto.lean_missing() == ()
    assert auto.select("auto") == "lean"


class Protocol:
    def __init__(self) -> None:
        self.writable = True
        self.conn: Any = None

    def send(self, message: Any) -> None: ...

    def write(self, data: bytes, flush: bool = False) -> None: ...


def fake(name: str = "fake", **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def importer(**modules: types.ModuleType) -> Any:
    def load(name: str) -> types.ModuleType:
        if name not in modules:
            raise ImportError(name)
        return modules[name]

    return load


def test_probe_names_a_missing_module_and_a_missing_attribute() -> None:
    load = importer(lib=fake(Protocol=Protocol))
    needs = [Need("gone", "X"), Need("lib", "Protocol.handle_connect"), Need("lib", "Protocol.send")]
    assert internals.missing(needs, load) == ["gone.X: module not found", "lib.Protocol.handle_connect: not found"]


def test_probe_compares_an_overridden_signature_exactly_and_a_called_one_by_its_leading_parameters() -> None:
    load = importer(lib=fake(Protocol=Protocol))
    assert internals.missing([Need("lib", "Protocol.send", params=("self", "message"), overridden=True)], load) == []
    changed = internals.missing([Need("lib", "Protocol.send", params=("self", "event"), overridden=True)], load)
    assert changed == ["lib.Protocol.send: parameters are (self, message), expected (self, event)"]
    # A call keeps working when the library adds a parameter with a default, not one without.
    assert internals.missing([Need("lib", "Protocol.write", params=("self", "data"))], load) == []
    grown = internals.missing([Need("lib", "Protocol.write", params=("self", "data"), overridden=True)], load)
    assert grown and "expected (self, data)" in grown[0]


def test_probe_finds_instance_attributes_in_the_class_source_and_keys_in_a_table() -> None:
    load = importer(lib=fake(Protocol=Protocol, table={"translate_request": 1}))
    assert internals.missing([Need("lib", "Protocol", assigned=("writable", "conn"))], load) == []
    assert internals.missing([Need("lib", "Protocol", assigned=("writable", "disconnected"))], load) == [
        "lib.Protocol: sets no self.disconnected"
    ]
    assert internals.missing([Need("lib", "table", keys=("translate_request", "websocket"))], load) == [
        "lib.table: no key websocket"
    ]
    assert internals.missing([Need("lib", "Protocol.send", source=("registry[sid] = s",))], load) == [
        "lib.Protocol.send: source no longer has registry[sid] = s"
    ]


def test_auto_falls_back_to_stock_with_one_warning_naming_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(auto, "lean_missing", lambda: ("uvicorn.x.Protocol: sets no self.disconnected",))
    with caplog.at_level(logging.WARNING, logger="testpulse.transport.auto"):
        assert auto.select("auto") == "stock"
        assert auto.select("lean") == "lean"  # an explicit choice is obeyed, without a warning
    assert len(caplog.records) == 1
    assert "uvicorn.x.Protocol: sets no self.disconnected" in caplog.records[0].getMessage()


def test_each_transport_has_its_own_engine_server_and_uvicorn_protocol() -> None:
    from testpulse.transport.lean import LeanEngineServer
    from testpulse.transport.wsprotocol import LeanWebSocketProtocol

    assert auto.engine_server_class("lean") is LeanEngineServer
    assert auto.engine_server_class("stock") is auto.TaggedEngineServer
    assert auto.uvicorn_ws("lean") is LeanWebSocketProtocol
    assert auto.uvicorn_ws("stock") == "auto"


@pytest.mark.parametrize("need", internals.REDIS_CLUSTER, ids=lambda need: need.name)
def test_installed_redis_py_has_what_the_redis_cluster_manager_uses(need: Need) -> None:
    assert internals.missing([need]) == []
