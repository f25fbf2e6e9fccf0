"""Grafana dashboards: rendered JSON, registry check, committed export, and `push` against an HTTP
server that implements and checks Grafana's documented API for the three calls push makes
(grafana.com/docs/grafana/latest/developers/http_api/folder/ and .../dashboard/)."""

import argparse
import json
import re
import shutil
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from raymoe.monitor import metrics as M
from raymoe.monitor.dashboards import DASHBOARDS, check_queries_reference_registry, rendered
from raymoe.monitor.dashboards.cli import add_dashboards_command
from raymoe.monitor.dashboards.grafana_push import GrafanaPushError, export, push
from raymoe.monitor.dashboards.panels import Dashboard, Panel, Row, Target, check_dashboard, sel

REPO = Path(__file__).resolve().parents[2]
CLUSTER = 'ray_io_cluster=~"$cluster"'
UIDS = {
    "training": "raymoe-training",
    "serving": "raymoe-serving",
    "experts": "raymoe-experts",
    "drift": "raymoe-drift",
    "federated": "raymoe-federated",
}


def _targets(model):
    return [(p, t) for p in model["panels"] if p["type"] != "row" for t in p["targets"]]


def test_dashboards_have_stable_uids_and_variables():
    models = rendered()
    assert {n: m["uid"] for n, m in models.items()} == UIDS
    for model in models.values():
        assert model["schemaVersion"] == 39 and model["id"] is None
        variables = {v["name"]: v for v in model["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert variables["cluster"]["query"]["query"] == "label_values(ray_io_cluster)"
    serving = {v["name"]: v for v in models["serving"]["templating"]["list"]}
    assert (
        serving["model"]["definition"]
        == 'label_values(ray_raymoe_serve_requests_total{ray_io_cluster=~"$cluster"}, model)'
    )
    assert serving["model"]["includeAll"] and serving["model"]["allValue"] == ".*"
    assert {"run", "model", "train_layer", "serve_layer"} <= {
        v["name"] for v in models["experts"]["templating"]["list"]
    }


def test_every_panel_has_a_datasource_and_a_target():
    for model in rendered().values():
        ids = [p["id"] for p in model["panels"]]
        assert len(ids) == len(set(ids))
        for panel in model["panels"]:
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
            assert all(t["datasource"] == panel["datasource"] and t["expr"] for t in panel["targets"])
            assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_every_query_names_registry_series_and_carries_the_shared_filter():
    # The series Ray exports, derived here from the registry by the documented naming rule.
    exported = set()
    for spec in M.REGISTRY:
        base = f"ray_{spec.name}"
        exported |= (
            {base + "_total"}
            if spec.kind == "counter"
            else {base + s for s in ("_bucket", "_sum", "_count")}
            if spec.kind == "histogram"
            else {base}
        )
    check_queries_reference_registry()
    for name, model in rendered().items():
        dashboard_filter = DASHBOARDS[name].label_filter
        for _, target in _targets(model):
            selectors = re.findall(r"([a-zA-Z_:][\w:]*)\{([^{}]*)\}", target["expr"])
            assert selectors, target["expr"]
            for series, body in selectors:
                assert series in exported, series
                assert body.startswith(dashboard_filter) and CLUSTER in body


def test_registry_check_names_foreign_metrics_labels_and_missing_filters():
    bad = Dashboard(
        "bad",
        "bad",
        "",
        (),
        (
            Row(
                "r",
                (
                    Panel("a", "", "none", (Target("sum(" + sel(M.SERVE_RUNNING_SEQS, 'deployment=~"x"') + ")"),)),
                    Panel("b", "", "none", (Target("sum(ray_serve_num_http_requests_total{{filters}})"),)),
                    Panel("c", "", "none", (Target("sum(ray_raymoe_serve_running_seqs) / sum(up)"),)),
                    Panel("d", "", "none", (Target("sum(" + sel(M.SERVE_RUNNING_SEQS, 'model=~"$model"') + ")"),)),
                ),
            ),
        ),
    )
    problems = "\n".join(check_dashboard(bad))
    assert "has no label 'deployment'" in problems
    assert "'ray_serve_num_http_requests_total' is not a series" in problems
    assert "'ray_raymoe_serve_running_seqs' is used without a selector" in problems
    assert "'up' is not a series" in problems
    assert "variable $model is not defined" in problems


def _promql(dashboard, row_title, panel_title, index=0):
    """A panel's query as Prometheus sees it with every variable at "All"."""
    row = next(r for r in dashboard.rows if r.title == row_title)
    panel = next(p for p in row.panels if p.title == panel_title)
    expr = panel.targets[index].expr.replace("{filters}", dashboard.label_filter)
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr.replace("$__rate_interval", "5m"))


needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")


@needs_promtool
def test_every_query_parses(tmp_path):
    rules = [
        {"record": f"check:{n}:{i}", "expr": _promql(d, r.title, p.title, i)}
        for n, d in DASHBOARDS.items()
        for r in d.rows
        for p in r.panels
        for i in range(len(p.targets))
    ]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "all", "rules": rules}]}))
    out = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yaml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_expert_turnover_imbalance_and_error_ratio_hand_worked(tmp_path):
    # Prepare: 8 experts of one layer; 1 min samples. For the first hour expert 0 gets 100 tok/min,
    # the others 10 (mean 21.25, hot above 42.5: {0}). Then expert 1 rises to 100 and experts 2-7
    # get nothing (mean 25, hot above 50: {0, 1}). Turnover = 1 new of 2 hot = 0.5; imbalance =
    # 100 / 25 = 4. Requests: only 200s, so the error ratio is 0, not "no data".
    s = 'ray_raymoe_serve_tokens_per_expert_total{model="m", layer="0", expert="%d"}'
    series = [{"series": s % 0, "values": "0+100x120"}, {"series": s % 1, "values": "0+10x60 700+100x59"}]
    series += [{"series": s % e, "values": "0+10x60 600+0x59"} for e in range(2, 8)]
    series.append(
        {
            "series": 'ray_raymoe_serve_requests_total{model="m", route="/v1/completions", status="200"}',
            "values": "0+60x120",
        }
    )
    experts, serving, at = DASHBOARDS["experts"], DASHBOARDS["serving"], "120m"
    layer = [{"labels": '{model="m", layer="0"}'}]
    tests = [
        {
            "expr": _promql(experts, "Serving routing", "Hot-expert turnover"),
            "eval_time": at,
            "exp_samples": [layer[0] | {"value": 0.5}],
        },
        {
            "expr": _promql(experts, "Serving routing", "Load imbalance"),
            "eval_time": at,
            "exp_samples": [layer[0] | {"value": 4}],
        },
        {
            "expr": _promql(serving, "Traffic", "Error ratio"),
            "eval_time": at,
            "exp_samples": [{"labels": '{model="m"}', "value": 0}],
        },
    ]
    spec = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": tests}],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(spec))
    out = subprocess.run(["promtool", "test", "rules", str(tmp_path / "test.yaml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_committed_files_equal_a_fresh_export(tmp_path):
    fresh = {p.relative_to(tmp_path) for p in export(tmp_path)}
    committed = {p.relative_to(REPO / "dashboards") for p in (REPO / "dashboards").glob("*.json")}
    committed |= {p.relative_to(REPO / "dashboards") for p in (REPO / "dashboards/provisioning").glob("*")}
    assert committed == fresh, "run `raymoe dashboards export dashboards` and commit the result"
    for rel in fresh:
        assert (REPO / "dashboards" / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
    provider = yaml.safe_load((tmp_path / "provisioning/dashboards.yaml").read_text())["providers"][0]
    assert provider["type"] == "file" and provider["folderUid"] == "raymoe"
    source = yaml.safe_load((tmp_path / "provisioning/datasources.yaml").read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["url"].startswith("http://")


class FakeGrafana:
    """Grafana's folder and dashboard API for GET /api/folders/:uid, POST /api/folders and
    POST /api/dashboards/db, with the documented status codes and response bodies. `token` may
    write; `viewer_token` may only read (403 on writes, as for a Viewer)."""

    def __init__(self, token="editor-token", viewer_token="viewer-token"):
        self.token, self.viewer_token = token, viewer_token
        self.folders, self.dashboards, self.calls = {}, {}, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self._answer(*fake.handle("GET", self.path, self.headers, None))

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._answer(*fake.handle("POST", self.path, self.headers, raw))

            def _answer(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def _folder(self, uid):
        folder = self.folders[uid]
        return {
            "id": folder["id"],
            "uid": uid,
            "title": folder["title"],
            "url": f"/dashboards/f/{uid}/",
            "hasAcl": False,
            "canSave": True,
            "canEdit": True,
            "canAdmin": True,
            "createdBy": "sa",
            "created": "2026-01-01T00:00:00Z",
            "updatedBy": "sa",
            "updated": "2026-01-01T00:00:00Z",
            "version": 1,
        }

    def handle(self, method, path, headers, raw):
        body = json.loads(raw) if raw else None
        self.calls.append((method, path, body))
        auth = headers.get("Authorization")
        if auth not in (f"Bearer {self.token}", f"Bearer {self.viewer_token}"):
            return 401, {"message": "Unauthorized"}
        if method == "POST" and auth != f"Bearer {self.token}":
            return 403, {"message": "You'll need additional permissions to perform this action."}
        if method == "POST" and not headers.get("Content-Type", "").startswith("application/json"):
            return 400, {"message": "bad request data"}
        if method == "GET" and (m := re.fullmatch(r"/api/folders/([\w-]+)", path)):
            if m.group(1) not in self.folders:
                return 404, {"message": "folder not found", "status": "not-found"}
            return 200, self._folder(m.group(1))
        if (method, path) == ("POST", "/api/folders"):
            uid, title = body.get("uid"), body.get("title")
            if not isinstance(title, str) or not title or (uid is not None and not 0 < len(uid) <= 40):
                return 400, {"message": "invalid folder title or uid"}
            if uid in self.folders or title in {f["title"] for f in self.folders.values()}:
                return 409, {"message": "a folder with the same name or uid already exists"}
            self.folders[uid] = {"id": len(self.folders) + 1, "title": title}
            return 200, self._folder(uid)
        if (method, path) == ("POST", "/api/dashboards/db"):
            return self._save_dashboard(body)
        return 404, {"message": "Not found"}

    def _save_dashboard(self, body):
        dash = body.get("dashboard")
        known = {"dashboard", "folderId", "folderUid", "overwrite", "message"}
        if set(body) - known or not isinstance(dash, dict):
            return 400, {"message": "invalid fields"}
        uid, title = dash.get("uid"), dash.get("title")
        if not isinstance(title, str) or not title or not isinstance(uid, str) or not 0 < len(uid) <= 40:
            return 400, {"message": "dashboard needs a title and a uid of 1 to 40 characters"}
        if ("folderId" in body and "folderUid" in body) or body.get("folderUid") not in self.folders:
            return 400, {"message": "folder not found"}
        old = self.dashboards.get(uid)
        if old is not None and not body.get("overwrite"):
            return 412, {"message": "A dashboard with the same uid already exists", "status": "name-exists"}
        if dash.get("id") is not None and (old is None or dash["id"] != old["id"]):
            return 404, {"message": "Dashboard not found"}
        record = {
            "id": old["id"] if old else len(self.dashboards) + 1,
            "version": old["version"] + 1 if old else 1,
            "folderUid": body["folderUid"],
            "title": title,
            "dashboard": dash,
        }
        self.dashboards[uid] = record
        slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
        return 200, {
            "id": record["id"],
            "uid": uid,
            "url": f"/d/{uid}/{slug}",
            "status": "success",
            "version": record["version"],
            "slug": slug,
        }


@pytest.fixture
def grafana():
    fake = FakeGrafana()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def test_push_creates_folder_and_dashboards_then_overwrites_in_place(grafana):
    first = push(grafana.url, grafana.token, "raymoe", "raymoe")
    assert [c[:2] for c in grafana.calls[:2]] == [("GET", "/api/folders/raymoe"), ("POST", "/api/folders")]
    assert grafana.folders == {"raymoe": {"id": 1, "title": "raymoe"}}
    assert sorted(grafana.dashboards) == sorted(UIDS.values())
    assert {r["version"] for r in first} == {1}
    posts = [c[2] for c in grafana.calls if c[1] == "/api/dashboards/db"]
    assert all(b["overwrite"] is True and b["folderUid"] == "raymoe" for b in posts)

    ids = {uid: d["id"] for uid, d in grafana.dashboards.items()}
    second = push(grafana.url, grafana.token, "raymoe", "raymoe")

    assert len(grafana.folders) == 1 and len(grafana.dashboards) == len(UIDS)
    assert {uid: d["id"] for uid, d in grafana.dashboards.items()} == ids
    assert {r["version"] for r in second} == {2}
    assert sum(1 for c in grafana.calls if c[1] == "/api/folders") == 1


def test_push_reads_the_token_from_the_environment(grafana, monkeypatch):
    monkeypatch.setenv("GRAFANA_TOKEN", grafana.token)
    push(grafana.url)
    assert len(grafana.dashboards) == len(UIDS)


def test_push_with_a_wrong_token_says_so(grafana):
    with pytest.raises(GrafanaPushError, match=r"rejected the token \(401 Unauthorized\).*GRAFANA_TOKEN"):
        push(grafana.url, "wrong-token")
    assert grafana.dashboards == {} and grafana.folders == {}


def test_push_with_a_read_only_token_says_which_permission(grafana):
    with pytest.raises(GrafanaPushError, match=r"403 Access denied.*Editor role"):
        push(grafana.url, grafana.viewer_token)


def test_push_to_an_unreachable_server_says_so():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed on exit: nothing listens there
    with pytest.raises(GrafanaPushError, match=f"cannot reach Grafana at http://127.0.0.1:{port}"):
        push(f"http://127.0.0.1:{port}", "token", timeout_s=2)


def test_push_without_a_token_fails_before_any_request(grafana, monkeypatch):
    monkeypatch.delenv("GRAFANA_TOKEN", raising=False)
    with pytest.raises(ValueError, match="GRAFANA_TOKEN"):
        push(grafana.url)
    assert grafana.calls == []


def test_cli_export_and_push(grafana, monkeypatch, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="raymoe")
    add_dashboards_command(parser.add_subparsers(dest="command", required=True))

    args = parser.parse_args(["dashboards", "export", str(tmp_path)])
    assert args.func(args) == 0 and (tmp_path / "experts.json").is_file()

    monkeypatch.setenv("GRAFANA_TOKEN", grafana.token)
    args = parser.parse_args(["dashboards", "push", "--url", grafana.url, "--folder", "ML Platform"])
    assert args.func(args) == 0
    assert grafana.folders == {"ml-platform": {"id": 1, "title": "ML Platform"}}
    assert "raymoe-experts: version 1" in capsys.readouterr().out

    monkeypatch.setenv("GRAFANA_TOKEN", "wrong")
    assert args.func(args) == 1
    assert "401 Unauthorized" in capsys.readouterr().err
