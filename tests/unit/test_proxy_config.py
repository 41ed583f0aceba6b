"""The local cluster's assumptions about the repo's nginx.conf hold."""

from __future__ import annotations

import pytest

from testpulse.devtools.cluster import NGINX_CONF, PROXY_FAIL_TIMEOUT_SECONDS, NodeSpec, render_nginx_conf

pytestmark = pytest.mark.unit


def test_rolling_restart_waits_out_the_proxys_fail_timeout() -> None:
    text = NGINX_CONF.read_text()
    assert f"fail_timeout={PROXY_FAIL_TIMEOUT_SECONDS}s" in text


def test_rendering_the_committed_nodes_reproduces_the_committed_file() -> None:
    text = NGINX_CONF.read_text()
    nodes = [NodeSpec(f"node{i}", 8100 + i) for i in (1, 2, 3)]
    assert render_nginx_conf(text, nodes, port=8080) == text


def test_rendering_routes_each_node_tag_to_its_own_upstream_only() -> None:
    rendered = render_nginx_conf(NGINX_CONF.read_text(), [NodeSpec("node1", 9001), NodeSpec("node7", 9007)], port=9000)
    assert "listen 127.0.0.1:9000" in rendered
    assert '"~^node7\\."     testpulse_node7;' in rendered
    assert "server 127.0.0.1:9007;" in rendered
    assert "server 127.0.0.1:8101" not in rendered and "testpulse_node3" not in rendered


def test_the_handshake_upstream_shares_its_state_between_nginx_workers() -> None:
    rendered = render_nginx_conf(NGINX_CONF.read_text(), [NodeSpec("node1", 9001), NodeSpec("node2", 9002)], port=9000)
    shared = rendered[rendered.index("upstream testpulse_nodes {") :]
    shared = shared[: shared.index("}")]
    assert "least_conn;" in shared and "zone testpulse_nodes" in shared
