"""deploy/kubernetes/: the manifests' schemas and structure, their kustomize rendering and the
rules' sync."""

import copy
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from jsonschema import Draft202012Validator

from exporter.config import parse_config
from exporter.shard import parse_shard

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
ALERTS = ROOT / "prometheus" / "alerts.yml"
NAME = "binance-pm-exporter"
#: the oldest release the README names, and the newest kubernetes-validate ships
KUBERNETES_VERSIONS = ("1.28", "1.37")
#: the prometheus-operator fields we use: no package ships the CRDs' schemas
CRD_SCHEMA = ROOT / "tests" / "fixtures" / "prometheus-operator.schema.json"


def load(name: str) -> dict[str, Any]:
    document = yaml.safe_load((KUBE / name).read_text())
    assert isinstance(document, dict)
    return document


def container(statefulset: dict[str, Any]) -> dict[str, Any]:
    (exporter,) = statefulset["spec"]["template"]["spec"]["containers"]
    return exporter


def env(statefulset: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container(statefulset)["env"]}


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen", KUBE / "generate_prometheusrule.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def schema_errors(document: dict[str, Any]) -> list[str]:
    """Where `document` breaks its schema: Kubernetes' own (strict: no unknown field) for the
    core kinds, the prometheus-operator fields we use for the CRD kinds. A kind with no
    schema raises."""
    if document["apiVersion"].startswith("monitoring.coreos.com/"):
        schema = json.loads(CRD_SCHEMA.read_text())
        validator = Draft202012Validator({**schema, "$ref": f"#/$defs/{document['kind']}"})
        return [
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(document)
        ]
    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{version} {'.'.join(map(str, e.absolute_path))}: {e.message}")
    return errors


RESOURCES = load("kustomization.yaml")["resources"]


@pytest.mark.parametrize("name", RESOURCES)
def test_every_manifest_matches_its_schema(name: str) -> None:
    assert schema_errors(load(name)) == []


CONTAINER = "spec.template.spec.containers.0"
BROKEN = [  # (manifest, dotted path of the field to set (numbers index lists), value)
    ("statefulset.yaml", "spec.replica", 3),  # unknown (a typo)
    ("statefulset.yaml", "spec.replicas", "3"),  # mistyped
    ("statefulset.yaml", f"{CONTAINER}.readinessProbe.httpGet.paht", "/readyz"),
    ("statefulset.yaml", f"{CONTAINER}.securityContext.runAsNonRoot", "true"),
    ("statefulset.yaml", "spec.template.spec.volumes.1.secret.defaultMode", "0440"),
    ("service.yaml", "spec.ports.0.port", "9745"),
    ("service.yaml", "metadata.label", {"a": "b"}),
    ("servicemonitor.yaml", "spec.endpoints.0.intervall", "30s"),
    ("servicemonitor.yaml", "spec.endpoints.0.interval", "30 seconds"),
    ("servicemonitor.yaml", "spec.selector.matchLabel", {"a": "b"}),
    ("servicemonitor.yaml", "spec.endpoints.0.port", 9745),
    ("prometheusrule.yaml", "spec.groups.1.rules.0.expresion", "up"),
    ("prometheusrule.yaml", "spec.groups.1.rules.0.for", "5 minutes"),
    ("prometheusrule.yaml", "spec.groups.1.rules.0.labels", {"severity": 1}),
    ("prometheusrule.yaml", "metadata.labels.x", True),
]


@pytest.mark.parametrize(("name", "path", "value"), BROKEN, ids=[f"{n}:{p}" for n, p, _ in BROKEN])
def test_an_unknown_or_mistyped_field_is_refused(name: str, path: str, value: Any) -> None:
    document = copy.deepcopy(load(name))
    *parents, last = path.split(".")
    node: Any = document
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value
    assert schema_errors(document) != []


def test_every_manifest_parses_and_the_kustomization_lists_them() -> None:
    kustomization = load("kustomization.yaml")
    for resource in kustomization["resources"]:
        document = load(resource)
        assert {"apiVersion", "kind", "metadata"} <= document.keys()
        assert document["metadata"]["name"] == NAME
    generated = kustomization["configMapGenerator"][0]
    assert generated["files"] == ["config.yaml"]


def test_the_statefulset_runs_one_shard_per_pod_from_its_ordinal() -> None:
    statefulset, service = load("statefulset.yaml"), load("service.yaml")
    variables = env(statefulset)
    names = list(variables)
    assert variables["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # Kubernetes expands $(POD_NAME) only if it is defined earlier in the list.
    assert names.index("POD_NAME") < names.index("BINANCE_PM_EXPORTER_SHARD")
    shard = variables["BINANCE_PM_EXPORTER_SHARD"]["value"]
    assert shard == f"$(POD_NAME)/{statefulset['spec']['replicas']}"
    for ordinal in range(statefulset["spec"]["replicas"]):
        pod = f"{statefulset['metadata']['name']}-{ordinal}"
        assert parse_shard(shard.replace("$(POD_NAME)", pod)).index == ordinal
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()


def test_ports_probes_and_hardening() -> None:
    statefulset, service = load("statefulset.yaml"), load("service.yaml")
    monitor = load("servicemonitor.yaml")
    exporter = container(statefulset)
    (port,) = exporter["ports"]
    assert port["containerPort"] == 9745
    assert "--web.listen-address=:9745" in exporter["args"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert exporter["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert exporter["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pod = statefulset["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user
    assert exporter["securityContext"]["readOnlyRootFilesystem"] is True
    assert exporter["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_keys_come_from_a_secret_the_set_references_but_does_not_contain(tmp_path: Path) -> None:
    statefulset = load("statefulset.yaml")
    volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    assert volumes["keys"]["secret"]["secretName"] == f"{NAME}-keys"
    assert volumes["config"]["configMap"]["name"] == f"{NAME}-config"
    mounts = {m["name"]: m["mountPath"] for m in container(statefulset)["volumeMounts"]}
    kinds = {load(r)["kind"] for r in load("kustomization.yaml")["resources"]}
    assert "Secret" not in kinds
    # config.yaml is a valid config once the Secret's files are where it says.
    text = (KUBE / "config.yaml").read_text()
    secret_dir = mounts["keys"]
    assert secret_dir + "/" in text
    data = yaml.safe_load(text.replace(secret_dir + "/", f"{tmp_path}/"))
    _account_files(statefulset, tmp_path / "accounts.d")
    data["accounts_dir"] = str(tmp_path / "accounts.d")
    for account in data["accounts"]:
        (tmp_path / f"{account['name']}.api_key").write_text("k" * 64)
        (tmp_path / f"{account['name']}.api_secret").write_text("s" * 64)
    pem = tmp_path / "desk-b.pem"
    pem.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
        )
    )
    config = parse_config(data, environ={}, base_dir=tmp_path)
    assert [a.name for a in config.accounts] == ["desk-a", "desk-b", "desk-c", "desk-d"]
    for account in yaml.safe_load(text)["accounts"]:  # only files, never an inline secret
        assert not {"api_key", "api_secret", "private_key"} & account.keys()


# kustomize's own work (the generated ConfigMap, the replacement) needs kustomize; the
# manifests themselves are checked above on every machine.
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kubectl_kustomize_renders_the_set() -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(KUBE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    documents = list(yaml.safe_load_all(result.stdout))
    by_kind = {d["kind"]: d for d in documents}
    assert set(by_kind) == {
        "ConfigMap",
        "Service",
        "StatefulSet",
        "ServiceMonitor",
        "PrometheusRule",
    }
    statefulset = by_kind["StatefulSet"]
    volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    # the generated ConfigMap's hashed name is referenced
    assert volumes["config"]["configMap"]["name"] == by_kind["ConfigMap"]["metadata"]["name"]
    assert "config.yaml" in by_kind["ConfigMap"]["data"]
    replicas = statefulset["spec"]["replicas"]
    assert env(statefulset)["BINANCE_PM_EXPORTER_SHARD"]["value"] == f"$(POD_NAME)/{replicas}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_the_shard_total_follows_replicas(tmp_path: Path) -> None:
    copy = tmp_path / "kubernetes"
    shutil.copytree(KUBE, copy)
    path = copy / "statefulset.yaml"
    path.write_text(path.read_text().replace("replicas: 3", "replicas: 5"))
    result = subprocess.run(
        ["kubectl", "kustomize", str(copy)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    (statefulset,) = (d for d in yaml.safe_load_all(result.stdout) if d["kind"] == "StatefulSet")
    assert env(statefulset)["BINANCE_PM_EXPORTER_SHARD"]["value"] == "$(POD_NAME)/5"


def test_the_generator_wraps_the_groups_of_an_alerts_file(tmp_path: Path) -> None:
    source = tmp_path / "alerts.yml"
    source.write_text(
        "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: |\n"
        "          up == 0\n          or\n          vector(1)\n        for: 5m\n"
    )
    rendered = generator().render(source)
    assert rendered.startswith("# GENERATED from prometheus/alerts.yml")
    rule = yaml.safe_load(rendered)
    assert rule["kind"] == "PrometheusRule"
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == yaml.safe_load(source.read_text())
    assert "expr: |\n" in rendered  # PromQL stays readable


@pytest.mark.skipif(not ALERTS.exists(), reason="prometheus/alerts.yml is not in this tree yet")
def test_the_prometheusrule_is_in_sync_with_alerts_yml() -> None:
    rule = load("prometheusrule.yaml")
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())
    assert (KUBE / "prometheusrule.yaml").read_text() == generator().render(ALERTS), (
        "run: python deploy/kubernetes/generate_prometheusrule.py"
    )


def test_each_shard_keeps_its_snapshot_on_a_volume_of_its_own() -> None:
    statefulset = load("statefulset.yaml")
    exporter = container(statefulset)
    (flag,) = [a for a in exporter["args"] if a.startswith("--storage.path=")]
    path = flag.partition("=")[2]
    mounts = {m["mountPath"]: m for m in exporter["volumeMounts"]}
    assert not mounts[path].get("readOnly", False)
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == mounts[path]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_every_runbook_url_is_built_from_one_configurable_base(tmp_path: Path) -> None:
    gen = generator()
    text = ALERTS.read_text()
    urls = re.findall(r"runbook_url: (\S+)", text)
    assert len(urls) >= 20
    assert all(url.startswith(gen.DEFAULT_RUNBOOK_BASE + "#") for url in urls)
    base = "https://git.example.com/ops/binance-pm-exporter/blob/main/docs/runbook.md"
    wanted = [url.replace(gen.DEFAULT_RUNBOOK_BASE, base) for url in urls]

    def runbook_urls(groups: list[dict[str, Any]]) -> list[str]:
        return [r["annotations"]["runbook_url"] for g in groups for r in g["rules"] if "alert" in r]

    assert runbook_urls(yaml.safe_load(gen.render(ALERTS, base))["spec"]["groups"]) == wanted
    rule, alerts = tmp_path / "prometheusrule.yaml", tmp_path / "alerts.yml"
    args = ["--runbook-base", base + "/", "--out", str(rule), "--alerts-out", str(alerts)]
    assert gen.main(args) == 0
    assert runbook_urls(yaml.safe_load(rule.read_text())["spec"]["groups"]) == wanted
    # the alerts file keeps its comments; only the runbook_urls change
    assert alerts.read_text() == text.replace(gen.DEFAULT_RUNBOOK_BASE + "#", base + "#")
    assert runbook_urls(yaml.safe_load(alerts.read_text())["groups"]) == wanted
    with pytest.raises(ValueError, match="runbook_url not on"):
        gen.rebase_runbooks("        runbook_url: https://elsewhere/runbook.md#x\n", base)


def _account_files(statefulset: dict[str, Any], directory: Path) -> list[str]:
    """Write, as the kubelet would, the files the `accounts` volume projects from its
    Secrets (one account.yaml each); their account names."""
    volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    directory.mkdir()
    names = []
    for source in volumes["accounts"]["projected"]["sources"]:
        (item,) = source["secret"]["items"]
        name = item["path"].removesuffix(".yaml")
        (directory / item["path"]).write_text(
            yaml.safe_dump({"name": name, "api_key": "k" * 64, "api_secret": "s" * 64})
        )
        names.append(name)
    return names


def test_one_secret_per_account_is_mounted_where_accounts_dir_says(tmp_path: Path) -> None:
    statefulset = load("statefulset.yaml")
    volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    sources = volumes["accounts"]["projected"]["sources"]
    assert len(sources) >= 2
    for source in sources:
        (item,) = source["secret"]["items"]
        assert item["key"] == "account.yaml"
        name = item["path"].removesuffix(".yaml")
        assert source["secret"]["name"] == f"binance-pm-account-{name}"
        assert not source["secret"].get("optional", False)  # a missing Secret is an error
    assert volumes["accounts"]["projected"]["defaultMode"] == 0o440
    (mount,) = [m for m in container(statefulset)["volumeMounts"] if m["name"] == "accounts"]
    assert mount["readOnly"] is True
    config = yaml.safe_load((KUBE / "config.yaml").read_text())
    assert config["accounts_dir"] == mount["mountPath"]
    # Not under another volume's mount: a read-only mount cannot take another inside it.
    others = [m["mountPath"] for m in container(statefulset)["volumeMounts"] if m is not mount]
    assert not [o for o in others if mount["mountPath"].startswith(o + "/")]
    names = _account_files(statefulset, tmp_path / "accounts.d")
    data = {**config, "accounts": [], "accounts_dir": str(tmp_path / "accounts.d")}
    assert [a.name for a in parse_config(data, environ={}, base_dir=tmp_path).accounts] == names
