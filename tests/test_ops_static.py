"""Operations files checked without a Docker engine or a cluster: the Dockerfile, the compose
stack, the nginx balancer, Prometheus (``promtool check config|rules``, ``promtool test
rules``), the Grafana dashboard and provisioning, and the Kubernetes manifests.

Each check reads the files as the tool that consumes them would (YAML, JSON, the
Dockerfile's instructions) and cross-checks them against each other and against the code:
every ``UNICORN_*`` variable is a real setting with a valid value, every metric a query
names is one the service exports, every port and label lines up. ``promtool`` tests skip
only when the binary is absent (``make test`` installs it with apt).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from app.serving.config import ENV_PREFIX, Settings
from app.serving.metrics import ServiceMetrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"
PROMETHEUS_DIR = DEPLOY / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "rules" / "unicorn.rules.yml"
RULES_TEST = PROMETHEUS_DIR / "tests" / "unicorn.rules.test.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "unicorn.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "unicorn.yml"
K8S = DEPLOY / "k8s"
OPERATIONS_DOC = ROOT / "docs" / "OPERATIONS.md"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

# RSS of one `unicorn serve` worker on the demo bundle with the Redis cache, measured with
# ps (docs/OPERATIONS.md, "Sizing"): the highest seen under load and across 15 reloads.
MEASURED_RSS_PEAK_MIB = 154

# Every panel the issue asks the dashboard for, found by a word of its title.
REQUIRED_PANELS = (
    "request rate",
    "latency by task",
    "cache hit ratio",
    "cache errors",
    "inference time",
    "batch size",
    "error rate by status",
    "model version",
)
SEVERITIES = {"page", "ticket"}
K8S_VERSION = "1.32.0"  # the oldest Kubernetes the manifests are validated against


# --- helpers ------------------------------------------------------------------------------
def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def exported_series() -> set[str]:
    """Every series name the service exposes (histogram _bucket/_sum/_count, counter
    _total...), from the service's own registry."""
    names: set[str] = {"up"}
    for family in ServiceMetrics().registry.collect():
        if family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
        elif family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        else:
            names.add(family.name)
    return names


SERIES_NAME = re.compile(r"(?<![\w:])(unicorn_[a-z0-9_]+)(?![\w:])")


def unknown_series(expr: str) -> set[str]:
    return set(SERIES_NAME.findall(expr)) - exported_series()


def settings_from_env(env: dict[str, Any]) -> Settings:
    """Validate ``UNICORN_*`` variables exactly as the service would read them."""
    values: dict[str, Any] = {}
    for key, value in env.items():
        assert key.startswith(ENV_PREFIX), f"{key} is not a UNICORN_ setting"
        field = key.removeprefix(ENV_PREFIX).lower()
        assert field in Settings.model_fields, (
            f"{key} is not a field of app.serving.config.Settings"
        )
        values[field] = value
    return Settings(**values)


INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?::?-(?P<default>[^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose's ``${VAR:-default}`` as it resolves with no .env: the default."""
    if not isinstance(value, str):
        return value
    return INTERPOLATION.sub(lambda m: m.group("default") or "", value)


def markdown_anchors(path: Path) -> set[str]:
    anchors = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s+", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if not Path(PROMTOOL).exists():
        pytest.skip(f"promtool not found ({PROMTOOL}); `make test` installs it with apt")
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )


# --- Dockerfile ---------------------------------------------------------------------------
def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """``{stage: [(INSTRUCTION, arguments)]}`` with line continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.match(r"(\S+)\s+AS\s+(\S+)", args.strip(), re.IGNORECASE)
            assert match, f"every stage is named: FROM {args}"
            current = match.group(2)
            stages[current] = []
        stages[current].append((instruction, args.strip()))
    return stages


def test_every_target_the_docs_build_exists_and_is_built_on_the_runtime_stage() -> None:
    """The targets docker-compose.yml and docs/OPERATIONS.md build are stages, each built
    on the hardened ``runtime`` stage; every stage a FROM or COPY --from names is defined
    above it (or is a build context the docs pass)."""
    stages = dockerfile_stages()
    parent = {name: steps[0][1].split()[0] for name, steps in stages.items() if name}
    docs = OPERATIONS_DOC.read_text()
    targets = set(re.findall(r"--target (\S+)", docs))
    targets |= {s["build"]["target"] for s in load_yaml(COMPOSE)["services"].values()
                if isinstance(s.get("build"), dict) and "target" in s["build"]}  # fmt: skip
    assert targets, "no target found in docker-compose.yml or docs/OPERATIONS.md"
    for target in targets:
        assert target in stages, f"{target}: no such Dockerfile stage"
        chain = [target]
        while chain[-1] in parent:
            chain.append(parent[chain[-1]])
        assert "runtime" in chain, f"{target} is built on {chain}, not on runtime"
    contexts = set(re.findall(r"--build-context (\w+)=", docs))
    defined: set[str] = set()
    for name, steps in stages.items():
        for instruction, args in steps:
            if instruction == "FROM":
                refs = [args.split()[0]]
            else:
                refs = re.findall(r"--from=(\S+)", args) if instruction == "COPY" else []
            for ref in refs:
                if not ref.startswith("$"):  # ${PYTHON_IMAGE}: an image, not a stage
                    assert ref in defined | contexts, f"{name}: {instruction} {ref}: undefined"
        defined.add(name)


def test_the_base_image_and_the_train_stage_are_pinned() -> None:
    """The serving install (requirements.lock) is checked in test_dependencies.py; here
    the rest of what the image build installs."""
    args = dict(a.split("=", 1) for i, a in dockerfile_stages()[""] if i == "ARG")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", args["PYTHON_IMAGE"])
    project = load_toml(ROOT / "pyproject.toml")["project"]
    train_pins = (DEPLOY / "docker" / "requirements-train.txt").read_text()
    train_args = dict(a.split("=", 1) for i, a in dockerfile_stages()["train"] if i == "ARG")
    for spec in project["optional-dependencies"]["train"]:
        wanted = Requirement(spec)
        if wanted.name == "torch":  # installed from the CPU wheel index, pinned by TORCH_VERSION
            assert wanted.specifier.contains(train_args["TORCH_VERSION"]), wanted
        else:
            pin = re.search(rf"^{re.escape(wanted.name)}==(\S+)", train_pins, re.M)
            assert pin and wanted.specifier.contains(pin[1]), f"{wanted} is not pinned"


def load_toml(path: Path) -> dict[str, Any]:
    import tomllib

    with path.open("rb") as fh:
        return tomllib.load(fh)


def test_runtime_stage_is_small_non_root_and_healthchecked() -> None:
    stages = dockerfile_stages()
    runtime = stages["runtime"]
    text = "\n".join(f"{i} {a}" for i, a in runtime)
    assert runtime[0] == ("FROM", "base AS runtime"), "runtime starts from the slim base"
    for banned in ("torch", "gcc", "build-essential", "apt-get install", "pip install"):
        assert banned not in text, f"runtime stage must not contain {banned!r}"
    copies = [a for i, a in runtime if i == "COPY"]
    sources = {m.group(1) for a in copies if (m := re.search(r"--from=(\S+)", a))}
    assert sources == {"serving-venv"}, "runtime copies only the serving virtualenv"
    users = [a for i, a in runtime if i == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, "runs as non-root"
    assert re.fullmatch(r"\d+:\d+", users[-1]), "numeric USER so runAsNonRoot can verify it"
    (healthcheck,) = [a for i, a in runtime if i == "HEALTHCHECK"]
    assert "/opt/unicorn/healthcheck.py" in healthcheck and "/healthz" in healthcheck
    assert ("EXPOSE", "8000") in runtime
    env = dict(re.findall(r"(UNICORN_\w+)=(\S+)", text))
    assert settings_from_env(env).host == "0.0.0.0"
    # torch comes from the CPU wheel index, in the train stage only.
    train = "\n".join(a for _, a in stages["train"])
    assert "download.pytorch.org/whl/cpu" in train and "build-bundle" in train
    demo_copies = [a for i, a in stages["demo"] if i == "COPY"]
    assert demo_copies == ["--from=train /bundles/demo /srv/bundles/demo"]


def dockerignore_allows(path: str) -> bool:
    """The .dockerignore is an allow-list (``*`` then ``!path/``)."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    assert "*" in lines, ".dockerignore starts by excluding everything"
    allowed = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    return any(path == a or path.startswith(a + "/") for a in allowed)


def test_every_file_the_build_copies_exists_and_is_in_the_context() -> None:
    for stage, instructions in dockerfile_stages().items():
        for instruction, args in instructions:
            if instruction != "COPY" or "--from=" in args:
                continue
            *sources, _dest = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{stage}: COPY {source}: no such file"
                assert dockerignore_allows(source), f"{source} is excluded by .dockerignore"


@pytest.mark.integration
def test_container_healthcheck_script_probes_the_service(live_server: Any) -> None:
    script = DEPLOY / "docker" / "healthcheck.py"
    env = {"UNICORN_PORT": str(live_server.port), "PATH": "/usr/bin:/bin"}
    for path in ("/healthz", "/readyz"):
        ok = subprocess.run([sys.executable, script, path], env=env, capture_output=True)
        assert ok.returncode == 0, ok.stderr
    missing = subprocess.run(
        [sys.executable, script, "/no-such-route"], env=env, capture_output=True, text=True
    )
    assert missing.returncode == 1 and "404" in missing.stderr
    with closed_port() as port:
        down = subprocess.run(
            [sys.executable, script], env={**env, "UNICORN_PORT": str(port)},
            capture_output=True, text=True,
        )  # fmt: skip
    assert down.returncode == 1 and "unhealthy" in down.stderr


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port with nothing listening (bound, never listened, so never reused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


# --- docker-compose.yml -------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def test_compose_runs_the_whole_stack_with_one_up(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "api", "lb", "prometheus", "grafana", "locust"}
    default = {name for name, s in services.items() if not s.get("profiles")}
    assert default == {"redis", "api", "lb", "prometheus", "grafana"}
    assert services["locust"]["profiles"] == ["loadtest"]
    for name in default:
        test = services[name].get("healthcheck", {}).get("test")
        assert test and test[0] in {"CMD", "CMD-SHELL"}, f"{name} has a healthcheck"
    for name, service in services.items():
        image = service["image"]
        tag = image.rsplit(":", 1)[-1] if ":" in image else ""
        if name == "api":
            assert image == "unicorn:demo" and "build" in service
        else:
            assert re.search(r"\d", tag) and tag != "latest", f"{name}: pin {image}"


def test_compose_dependencies_wait_for_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert condition == {"condition": "service_healthy"}, f"{name} -> {dependency}"
            assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"
    assert "redis" in services["api"]["depends_on"]
    assert "api" in services["lb"]["depends_on"]


def test_compose_api_replicas_share_redis_and_use_valid_settings(
    compose: dict[str, Any],
) -> None:
    api = compose["services"]["api"]
    assert api["deploy"]["replicas"] >= 2
    stages = dockerfile_stages()
    assert api["build"]["target"] in stages and api["build"]["context"] == "."
    env = {k: interpolate(v) for k, v in api["environment"].items()}
    settings = settings_from_env(env)
    assert settings.cache_backend == "redis"
    assert settings.redis_url == "redis://redis:6379/0", "the redis service, shared"
    assert settings.admin_token is None, "no admin token unless the operator sets one"
    assert settings.bundle == Path("/srv/bundles/demo"), "the demo image's bundle"
    assert api["healthcheck"]["test"][-1] == "/healthz"
    assert str(settings.port) in api["expose"]
    assert api["read_only"] is True and "/tmp" in api["tmpfs"]


def test_compose_files_and_volumes_exist(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            if isinstance(volume, dict):
                source, create = volume["source"], volume.get("bind", {}).get("create_host_path")
            else:
                source, create = volume.split(":")[0], False
            if source.startswith("."):
                assert create or (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: named volume {source} is not declared"
    locust = compose["services"]["locust"]
    locustfile = locust["command"][locust["command"].index("-f") + 1]
    mount = next(v for v in locust["volumes"] if v.startswith("./loadtest:"))
    container_dir = Path(mount.split(":")[1])
    relative = (Path(locust["working_dir"]) / locustfile).relative_to(container_dir)
    assert (ROOT / "loadtest" / relative).is_file(), f"locust runs {locustfile}: missing"
    for key, value in compose["services"]["grafana"]["environment"].items():
        if key == "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH":
            assert Path(value).name == DASHBOARD.name
    text = COMPOSE.read_text()
    for match in INTERPOLATION.finditer(text):
        assert match.group("default") is not None or match.group(0).endswith(":-}"), (
            f"{match.group(0)} needs a default so `docker compose up` works without .env"
        )


def test_compose_ports_line_up_through_the_balancer(compose: dict[str, Any]) -> None:
    services = compose["services"]
    conf = NGINX_CONF.read_text()
    upstream = re.search(r"upstream\s+(\w+)\s*\{(.*?)\}", conf, re.S)
    assert upstream
    (server,) = re.findall(r"server\s+(\S+?):(\d+)", upstream.group(2))
    api_port = interpolate(services["api"]["environment"]["UNICORN_PORT"])
    assert server == ("api", api_port), "nginx balances over the api service's port"
    assert f"proxy_pass http://{upstream.group(1)};" in conf
    (listen,) = re.findall(r"listen\s+(\d+);", conf)
    assert any(p.endswith(f":{listen}") for p in services["lb"]["ports"])
    assert listen in services["lb"]["healthcheck"]["test"][-1]
    assert re.search(r"location \^~ /admin/ \{\s*default_type [^;]+;\s*return 403", conf), (
        "admin calls never go through the balancer (they must reach every replica)"
    )
    assert f"{Settings().max_body_bytes // 1024}k" in conf, "body limit = UNICORN_MAX_BODY_BYTES"


def test_compose_prometheus_scrapes_every_api_replica(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = load_yaml(PROMETHEUS_CONFIG)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "unicorn"]
    (sd,) = job["dns_sd_configs"]
    api_port = int(interpolate(compose["services"]["api"]["environment"]["UNICORN_PORT"]))
    assert sd == {"names": ["api"], "type": "A", "port": api_port, "refresh_interval": "5s"}
    assert job["metrics_path"] == "/metrics"


def test_compose_grafana_is_provisioned(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    prom_port = compose["services"]["prometheus"]["ports"][0].rsplit(":", 1)[-1]
    assert datasource["url"] == f"http://prometheus:{prom_port}"
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    panel_sources = {
        t["datasource"]["uid"] for p in load_dashboard()["panels"] for t in p.get("targets", [])
    }
    assert panel_sources == {datasource["uid"]}, "panels use the provisioned datasource"


# --- Prometheus -----------------------------------------------------------------------------
@pytest.mark.integration
def test_promtool_accepts_the_prometheus_config() -> None:
    result = run_promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout, "the rules file is found by the config"


@pytest.mark.integration
def test_promtool_accepts_the_rules() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration
def test_alerts_fire_on_the_series_built_to_trip_them() -> None:
    result = run_promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def rules() -> Iterator[dict[str, Any]]:
    for group in load_yaml(RULES)["groups"]:
        yield from group["rules"]


def test_every_alert_is_tested_documented_and_names_real_metrics() -> None:
    alerts = [r for r in rules() if "alert" in r]
    records = {r["record"] for r in rules() if "record" in r}
    tested = set(re.findall(r"alertname: (\w+)", RULES_TEST.read_text()))
    anchors = markdown_anchors(OPERATIONS_DOC)
    assert len(alerts) >= 8
    for rule in rules():
        assert not unknown_series(rule["expr"]), f"{rule}: {unknown_series(rule['expr'])}"
        for name in re.findall(r"(?<![\w:])(\w+:\w+:\w+)", rule["expr"]):
            assert name in records, f"{name} is not a recording rule"
    for alert in alerts:
        name = alert["alert"]
        assert name in tested, f"{name} has no promtool unit test"
        assert alert["labels"]["severity"] in SEVERITIES, name
        notes = alert["annotations"]
        assert notes["summary"] and notes["description"], name
        page, _, anchor = notes["runbook_url"].partition("#")
        # Absolute once Prometheus fills in where the docs are (its external labels).
        assert page == "{{ $externalLabels.runbook_base }}/OPERATIONS.md", f"{name}: {page}"
        assert anchor in anchors, f"{name}: runbook {anchor}"
    base = load_yaml(PROMETHEUS_CONFIG)["global"]["external_labels"]["runbook_base"]
    assert re.fullmatch(r"https?://[^/]+/\S+", base), base  # the compose stack's docs/
    assert {"UnicornRankLatencyP99High", "UnicornHigh5xxRate", "UnicornCacheErrors"} <= {
        a["alert"] for a in alerts
    }


def test_operator_rules_equal_the_rules_file() -> None:
    (rule,) = load_yaml_all(K8S / "monitoring" / "prometheusrule.yaml")
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"] == load_yaml(RULES), (
        "deploy/k8s/monitoring/prometheusrule.yaml must hold the groups of "
        "deploy/prometheus/rules/unicorn.rules.yml under spec: (copy them, indented 2)"
    )


# --- Grafana dashboard ----------------------------------------------------------------------
def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    """``(panel title, expr)`` for every query of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in load_dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def test_dashboard_has_every_required_panel() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"]
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for wanted in REQUIRED_PANELS:
        assert wanted in titles, f"no panel about {wanted!r}"
    latency = next(p for p in dashboard["panels"] if "latency by task" in p["title"].lower())
    quantiles = {re.search(r"histogram_quantile\(([\d.]+)", t["expr"]).group(1)  # type: ignore[union-attr]
                 for t in latency["targets"]}  # fmt: skip
    assert quantiles == {"0.5", "0.95", "0.99"}
    assert all("task" in t["expr"] for t in latency["targets"])


def test_dashboard_layout_and_queries_are_well_formed() -> None:
    dashboard = load_dashboard()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel.get("targets"), f"{panel['title']} has no query"
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]
    for title, expr in dashboard_queries():
        assert not unknown_series(expr), f"{title}: {unknown_series(expr)} not exported"
        assert expr.count("(") == expr.count(")"), title
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    used = {m for _, e in dashboard_queries() for m in re.findall(r"\$(\w+)", e)}
    assert used - {"__rate_interval"} <= variables, "every $variable is defined"


# --- Kubernetes -----------------------------------------------------------------------------
def kustomize_resources(directory: Path) -> list[dict[str, Any]]:
    """The objects a kustomization lists (resources only; patches are checked apart)."""
    kustomization = load_yaml(directory / "kustomization.yaml")
    objects: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        path = (directory / resource).resolve()
        assert path.exists(), f"{directory}: resource {resource} does not exist"
        objects += kustomize_resources(path) if path.is_dir() else load_yaml_all(path)
    return objects


@pytest.fixture(scope="module")
def k8s_base() -> dict[tuple[str, str], dict[str, Any]]:
    objects = kustomize_resources(K8S / "base")
    by_key = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    assert len(by_key) == len(objects), "no two objects share a kind and name"
    return by_key


def test_k8s_base_has_the_objects_of_a_scaled_deployment(
    k8s_base: dict[tuple[str, str], dict[str, Any]],
) -> None:
    assert set(k8s_base) == {
        ("Namespace", "unicorn"), ("ConfigMap", "unicorn-settings"),
        ("Deployment", "unicorn"), ("Service", "unicorn"),
        ("HorizontalPodAutoscaler", "unicorn"), ("PodDisruptionBudget", "unicorn"),
        ("Deployment", "unicorn-redis"), ("Service", "unicorn-redis"),
        ("NetworkPolicy", "unicorn-redis"),
    }  # fmt: skip
    for obj in k8s_base.values():
        assert obj["apiVersion"] in {
            "v1", "apps/v1", "autoscaling/v2", "policy/v1", "networking.k8s.io/v1",
        }, obj["kind"]  # fmt: skip


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_k8s_deployment_probes_security_and_resources(
    k8s_base: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployment = k8s_base[("Deployment", "unicorn")]
    spec = deployment["spec"]
    pod = spec["template"]
    assert "replicas" not in spec, "the HPA owns the replica count"
    assert matches(spec["selector"]["matchLabels"], pod["metadata"]["labels"])
    api = container(deployment)
    port = {p["name"]: p["containerPort"] for p in api["ports"]}["http"]
    assert api["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert api["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert api["startupProbe"]["httpGet"]["path"] == "/healthz"
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    image_user = [a for i, a in dockerfile_stages()["runtime"] if i == "USER"][-1]
    assert f"{security['runAsUser']}:{security['runAsGroup']}" == image_user, "the image's user"
    assert api["securityContext"]["readOnlyRootFilesystem"] is True
    assert api["securityContext"]["allowPrivilegeEscalation"] is False
    assert any(m["mountPath"] == "/tmp" for m in api["volumeMounts"]), "writable /tmp"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] == "/metrics"
    resources = api["resources"]
    request = mebibytes(resources["requests"]["memory"])
    limit = mebibytes(resources["limits"]["memory"])
    assert request >= 1.2 * MEASURED_RSS_PEAK_MIB, "the request covers the measured peak"
    assert limit >= 2 * MEASURED_RSS_PEAK_MIB, "room for a larger bundle or a reload"
    assert limit <= 4 * MEASURED_RSS_PEAK_MIB, "the limit matches what a pod uses"
    assert resources["requests"]["cpu"] and resources["limits"]["cpu"]


def mebibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return float(number) * (1024 if unit == "Gi" else 1)


def test_k8s_settings_are_valid_and_point_at_the_redis_service(
    k8s_base: dict[tuple[str, str], dict[str, Any]],
) -> None:
    data = k8s_base[("ConfigMap", "unicorn-settings")]["data"]
    settings = settings_from_env(data)
    assert settings.host == "0.0.0.0" and settings.workers == 1
    redis_service = k8s_base[("Service", "unicorn-redis")]
    redis_port = redis_service["spec"]["ports"][0]["port"]
    assert settings.redis_url == f"redis://unicorn-redis:{redis_port}/0"
    api = container(k8s_base[("Deployment", "unicorn")])
    assert api["envFrom"] == [{"configMapRef": {"name": "unicorn-settings"}}]
    port = {p["name"]: p["containerPort"] for p in api["ports"]}["http"]
    assert settings.port == port
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in api["env"]}
    assert set(secret_env) == {"UNICORN_ADMIN_TOKEN", "UNICORN_LOG_USER_SALT"}
    assert all(ref["optional"] is True for ref in secret_env.values())
    redis_pod = k8s_base[("Deployment", "unicorn-redis")]["spec"]["template"]
    assert matches(redis_service["spec"]["selector"], redis_pod["metadata"]["labels"])
    policy = k8s_base[("NetworkPolicy", "unicorn-redis")]["spec"]
    api_labels = k8s_base[("Deployment", "unicorn")]["spec"]["template"]["metadata"]["labels"]
    assert matches(policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"], api_labels)


def test_k8s_service_hpa_and_pdb_select_the_api(
    k8s_base: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployment = k8s_base[("Deployment", "unicorn")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = k8s_base[("Service", "unicorn")]["spec"]
    assert matches(service["selector"], labels)
    port_names = {p["name"] for p in container(deployment)["ports"]}
    assert all(p["targetPort"] in port_names for p in service["ports"])
    hpa = k8s_base[("HorizontalPodAutoscaler", "unicorn")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": "unicorn"}  # fmt: skip
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    pdb = k8s_base[("PodDisruptionBudget", "unicorn")]["spec"]
    assert matches(pdb["selector"]["matchLabels"], labels)


def test_k8s_service_monitor_scrapes_the_api_service(
    k8s_base: dict[tuple[str, str], dict[str, Any]],
) -> None:
    objects = {o["kind"]: o for o in kustomize_resources(K8S / "monitoring")}
    monitor = objects["ServiceMonitor"]
    service = k8s_base[("Service", "unicorn")]
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # The job label is the Service's name; the alert rules select job="unicorn".
    assert service["metadata"]["name"] == "unicorn"
    assert 'up{job="unicorn"}' in RULES.read_text()


def apply_json_patch(obj: dict[str, Any], operations: list[dict[str, Any]]) -> None:
    """The RFC 6902 operations the overlay uses (add/replace/remove), failing on a path
    that does not exist, as kustomize does."""
    for op in operations:
        *parents, last = [p.replace("~1", "/") for p in op["path"].strip("/").split("/")]
        node: Any = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if op["op"] == "add" and isinstance(node, list):
            node.append(op["value"]) if last == "-" else node.insert(int(last), op["value"])
        elif op["op"] == "add":
            node[last] = op["value"]
        elif op["op"] == "replace":
            key: Any = int(last) if isinstance(node, list) else last
            assert key in node or isinstance(node, list), f"no {op['path']} to replace"
            node[key] = op["value"]
        elif op["op"] == "remove":
            assert last in node, f"no {op['path']} to remove"
            del node[last]
        else:
            raise AssertionError(f"unsupported patch op {op['op']}")


def production_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """The production overlay's objects: its resources with its patches applied."""
    overlay_dir = K8S / "overlays" / "production"
    overlay = load_yaml(overlay_dir / "kustomization.yaml")
    objects = {(o["kind"], o["metadata"]["name"]): o for o in kustomize_resources(overlay_dir)}
    for patch in overlay["patches"]:
        body = yaml.safe_load(patch["patch"])
        if isinstance(body, dict) and body.get("$patch") == "delete":
            key = (body["kind"], body["metadata"]["name"])
            assert key in objects, f"delete patch of unknown {key}"
            del objects[key]
            continue
        key = (patch["target"]["kind"], patch["target"]["name"])
        assert key in objects, f"patch of unknown {key}"
        apply_json_patch(objects[key], body)
    return objects


def test_k8s_production_overlay_applies_to_the_base() -> None:
    overlay = load_yaml(K8S / "overlays" / "production" / "kustomization.yaml")
    objects = production_objects()
    assert not any(name == "unicorn-redis" for _, name in objects), "managed Redis instead"
    assert {"ServiceMonitor", "PrometheusRule"} <= {kind for kind, _ in objects}
    data = objects[("ConfigMap", "unicorn-settings")]["data"]
    assert "UNICORN_REDIS_URL" not in data, "the managed Redis URL holds a password: a Secret"
    settings_from_env(data)
    env = {e["name"]: e for e in container(objects[("Deployment", "unicorn")])["env"]}
    assert env["UNICORN_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "unicorn-secrets"
    (image,) = overlay["images"]
    assert image["name"] == "unicorn" and image["newTag"] != "demo"
    assert data["UNICORN_BUNDLE"] == "/srv/bundles/current", "the Dockerfile `model` target"


def test_k8s_objects_match_the_kubernetes_api_schema(
    k8s_base: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """Strict OpenAPI-schema validation (unknown or misspelt fields fail) of the base and
    of the patched production objects; the operator's CRDs have no schema there."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (dev extra)"
    )
    crds = {"ServiceMonitor", "PrometheusRule"}
    for (kind, name), obj in [*k8s_base.items(), *production_objects().items()]:
        if kind in crds:
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{kind}/{name}: {exc.message} at {list(exc.path)}") from None


# --- the runbook ----------------------------------------------------------------------------
def test_operations_doc_covers_the_zero_to_scaled_path() -> None:
    text = OPERATIONS_DOC.read_text()
    for command in (
        "docker compose up",
        "promtool check config",
        "kubectl apply -k deploy/k8s/overlays/production",
        "/admin/reload",
        "--scale api=",
    ):
        assert command in text, f"docs/OPERATIONS.md does not show {command!r}"
    for path in re.findall(r"`((?:deploy|tests|docs|loadtest)/[\w./-]+)`", text):
        assert (ROOT / path).exists(), f"docs/OPERATIONS.md names {path}: no such file"
