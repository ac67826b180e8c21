"""The Grafana dashboard only queries metrics that the live server and edge expose."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import start_edge, start_server
from tokenwire.edge.metrics import Outcome
from tokenwire.server.engine import OnnxCausalLM
from tokenwire.server.telemetry.metrics import ServerMetrics
from tokenwire.server.tokenizer import Tokenizer

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "tokenwire-dashboard.json"


def _sample_names(text: str) -> set[str]:
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


async def test_every_dashboard_metric_exists_in_the_live_exposition(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """Each tokenwire_* name in a panel query is a sample name the server or edge exports."""
    metrics = ServerMetrics()
    port, _ = metrics.serve("127.0.0.1", 0)
    server = await start_server(onnx_model, tokenizer, metrics)
    edge = await start_edge(server.target)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            await http.post("/v1/generate", json={"prompt": "x", "max_tokens": 3})
            edge_text = (await http.get("/metrics")).text
            server_text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    finally:
        await edge.edge.stop()
        await server.server.drain()
    exposed = _sample_names(server_text) | _sample_names(edge_text)
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for expr in queries for name in re.findall(r"tokenwire_[a-z_]+", expr)}
    assert len(dashboard["panels"]) >= 10
    assert used
    assert used <= exposed, sorted(used - exposed)


def _outcomes_selected(expr: str) -> set[str]:
    """The edge outcomes a query's tokenwire_edge_streams_total selector keeps (its `outcome`
    matchers applied to every Outcome; PromQL regexes match the whole value)."""
    [selector] = re.findall(r"tokenwire_edge_streams_total(?:\{([^}]*)\})?", expr)
    kept = {str(o) for o in Outcome}
    for op, value in re.findall(r'outcome\s*(=~|!~|!=|=)\s*"([^"]*)"', selector):
        matches = {o for o in kept if (re.fullmatch(value, o) if "~" in op else o == value)}
        kept = matches if op in ("=", "=~") else kept - matches
    return kept


def test_the_edge_outcome_panel_counts_each_request_once() -> None:
    """The panel "Edge streams by outcome" shows every outcome a request ends with and not
    `resumed`, which counts resumes beside those outcomes (the disconnects panel shows it)."""
    dashboard = json.loads(DASHBOARD.read_text())
    [panel] = [p for p in dashboard["panels"] if p["title"] == "Edge streams by outcome"]
    [target] = panel["targets"]
    assert _outcomes_selected(target["expr"]) == {str(o) for o in Outcome} - {Outcome.RESUMED}
