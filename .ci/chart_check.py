#!/usr/bin/env python3
"""Offline checks of the crisp-bridge Helm chart (no helm binary, no cluster).

Run through .ci/chart-check.sh, which prepares the virtualenv. Steps:

1. lint the chart with Helm's own engine (helm-python-sdk, Helm v4 library),
   with the default values and every ci/*-values.yaml file;
2. validate each values file (raw and merged with the defaults) against
   values.schema.json with jsonschema (draft-07);
3. render with the default values and each ci/*-values.yaml; check that the
   files under ci/invalid/ are refused (template `fail` or schema);
4. validate every rendered manifest with `kubernetes-validate --strict`;
   CRD kinds it has no schema for get a structural check only;
5. assert chart behaviours (secrets as files, checksums, restricted securityContext,
   TOML config parses and holds the rules, KEDA wiring, PDB choice, new pod options,
   the helm test Pod, ...);
6. validate the PrometheusRule's structure and that its alerts and the Grafana
   dashboard query only metrics src/telemetry/metrics.rs defines; the daily-quota
   alert sums the pods' requests against crisp.dailyQuota x the warning ratio, and
   the dashboard draws that quota (placeholder substituted);
7. check the generated files are current: values.schema.json's config/rules
   (.ci/gen_values_schema.py) and the README's values table (.ci/gen_chart_readme.py).

Exits non-zero on any failure, after printing one summary line.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

import jsonschema
import yaml

import helm_python as helm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".ci"))
import gen_chart_readme  # noqa: E402
import gen_values_schema  # noqa: E402

CHART = ROOT / "helm" / "crisp-bridge"
CI_DIR = CHART / "ci"
KUBE_VERSION = os.environ.get("CHART_CHECK_KUBE_VERSION", "1.33.0")
RELEASE = "cb"
NAMESPACE = "crisp"

# Kinds served by CRDs: kubernetes-validate bundles no schema for them.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}

# Rendering needs credentials (the chart refuses to render without them).
CI_SECRETS = {"secret": {"amqpUrl": "amqp://ci:ci@127.0.0.1:5672/%2f", "crispIdentifier": "ci-identifier", "crispKey": "ci-key"}}
SECRET_KEYS = {"amqp-url": ("amqp", "url"), "crisp-identifier": ("crisp", "identifier"), "crisp-key": ("crisp", "key")}
MOUNT = "/var/run/secrets/crisp-bridge"
TLS_MOUNT = "/etc/crisp-bridge-tls"
METRICS_RS = ROOT / "src" / "telemetry" / "metrics.rs"

passed = 0
failures: list[str] = []


def ok(msg: str) -> None:
    global passed
    passed += 1
    print(f"  ok    {msg}")


def fail(msg: str) -> None:
    failures.append(msg)
    print(f"  FAIL  {msg}")


def check(cond: bool, msg: str, detail: str = "") -> bool:
    if cond:
        ok(msg)
    else:
        fail(msg + (f": {detail}" if detail else ""))
    return cond


def section(title: str) -> None:
    print(f"\n== {title}")


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    assert isinstance(data, dict), f"{path} is not a mapping"
    return data


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------------------
# rendering helpers


def render(chart: helm.Chart, values: dict[str, Any] | None) -> dict[str, str]:
    return chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def documents(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every non-empty YAML document of the rendered templates (NOTES.txt excluded)."""
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__template__"] = path
                docs.append(doc)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    if len(found) != 1:
        raise AssertionError(f"expected exactly one {kind}, found {len(found)}")
    return found[0]


def strip(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "__template__"}


def pod_annotations(docs: list[dict[str, Any]]) -> dict[str, str]:
    return one(docs, "Deployment")["spec"]["template"]["metadata"].get("annotations", {})


def config_maps(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The config ConfigMap(s), not the dashboard's."""
    return [d for d in by_kind(docs, "ConfigMap") if "crisp-bridge.toml" in d.get("data", {})]


def config_toml(docs: list[dict[str, Any]]) -> dict[str, Any]:
    cms = config_maps(docs)
    assert len(cms) == 1, f"expected one config ConfigMap, found {len(cms)}"
    return tomllib.loads(cms[0]["data"]["crisp-bridge.toml"])


# ---------------------------------------------------------------------------
# steps


def step_lint(value_files: list[Path]) -> None:
    section(f"helm lint (Helm {helm.helm_sdk_version()} engine via helm_python.lint)")
    for label, values in [("default values + secrets", CI_SECRETS)] + [
        (rel(p), load_yaml(p)) for p in value_files
    ]:
        report = helm.lint(
            str(CHART), values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
        )
        bad = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
        infos = [m for m in report.get("messages", []) if m.get("severity", 0) < 2]
        for m in infos:
            print(f"        info  {m['path']}: {m['error'].strip()}")
        problems = [f"{m['path']}: {m['error'].strip()}" for m in bad] + [
            e.strip() for e in report.get("errors", []) if e.strip() not in {m["error"].strip() for m in bad}
        ]
        check(
            report.get("total_charts_linted") == 1 and not problems,
            f"lint ({label}): no warnings or errors",
            "; ".join(problems) or f"report {report}",
        )


def schema_has(schema: dict[str, Any], dotted: str) -> bool:
    node: Any = schema
    for part in dotted.split("."):
        props = node.get("properties", {}) if isinstance(node, dict) else {}
        if part not in props:
            return False
        node = props[part]
    return True


def step_schema(chart: helm.Chart, value_files: list[Path], invalid_schema: list[Path]) -> None:
    section("values.schema.json (jsonschema, draft-07)")
    schema = json.loads((CHART / "values.schema.json").read_text())
    try:
        jsonschema.Draft7Validator.check_schema(schema)
        ok("values.schema.json is a valid draft-07 schema")
    except jsonschema.SchemaError as e:
        fail(f"values.schema.json is not a valid draft-07 schema: {e.message}")
        return
    check(schema.get("additionalProperties") is False, "schema refuses unknown top-level values")
    validator = jsonschema.Draft7Validator(schema)
    defaults = load_yaml(CHART / "values.yaml")
    missing = sorted(set(defaults) - set(schema.get("properties", {})))
    check(not missing, "every top-level value in values.yaml is described by the schema", str(missing))

    def errors_of(values: dict[str, Any]) -> list[str]:
        return [
            f"/{'/'.join(str(x) for x in e.absolute_path)}: {e.message}"
            for e in validator.iter_errors(values)
        ]

    check(not errors_of(defaults), "values.yaml validates", "; ".join(errors_of(defaults)))

    # The rows of the README table: leaves, and maps documented as one value.
    keys = [row[0] for row in gen_chart_readme.rows(defaults, gen_chart_readme.comments((CHART / "values.yaml").read_text()))]
    undescribed = [k for k in keys if not schema_has(schema, k)]
    check(not undescribed, f"all {len(keys)} values in values.yaml have a schema entry", ", ".join(undescribed))
    readme = (CHART / "README.md").read_text()
    undocumented = [k for k in keys if f"| `{k}` |" not in readme]
    check(not undocumented, f"all {len(keys)} values are in the README table", ", ".join(undocumented))
    for path in value_files:
        raw = load_yaml(path)
        errs = errors_of(raw)
        check(not errs, f"{rel(path)} validates", "; ".join(errs))
        merged = chart.merge_values(raw)
        errs = errors_of(merged)
        check(not errs, f"{rel(path)} merged with the defaults validates", "; ".join(errs))
    for path in invalid_schema:
        errs = errors_of(chart.merge_values(load_yaml(path)))
        check(bool(errs), f"{rel(path)} is refused by the schema", "it validated")
        if errs:
            print(f"        (refused with: {errs[0]})")
    # Unknown top-level keys (typos) are refused.
    check(bool(errors_of({**defaults, "replicas": 2})), "a misspelt top-level value (replicas) is refused")
    check(not errors_of({**defaults, "global": {"imageRegistry": "r.example.com"}}), "global is accepted (subchart use)")
    typos = [({"rules": [{**defaults["rules"][0], "colour": "blue"}]}, "colour in a rule"),
             ({"config": {"delivery": {"concurency": 8}}}, "concurency in config.delivery"),
             ({"rules": [{**defaults["rules"][0], "color": "teal"}]}, "an unknown color"),
             ({"config": {"crisp": {"timeout": "10 seconds"}}}, "a malformed duration"),
             ({"secretsAs": "volume"}, "an unknown secretsAs"),
             ({"crisp": {"dailyQuota": 0}}, "a daily quota of 0"),
             ({"crisp": {"dailyQuota": "5k"}}, "a daily quota that is not a number"),
             ({"prometheusRule": {"quotaWarningRatio": 1.5}}, "a quota warning ratio above 1")]
    for change, label in typos:
        check(bool(errors_of({**defaults, **change})), f"{label} is refused by the schema")
    check(not errors_of({**defaults, "config": {"crisp": {"key_file": "/run/key"}}}), "config.crisp.key_file is accepted")


def step_render(chart: helm.Chart, value_files: list[Path]) -> dict[str, list[dict[str, Any]]]:
    section("render (helm_python.Chart.render, offline)")
    renders: dict[str, list[dict[str, Any]]] = {}
    for label, values in [("default", CI_SECRETS)] + [(p.name, load_yaml(p)) for p in value_files]:
        try:
            rendered = render(chart, values)
        except helm.HelmError as e:
            fail(f"render with {label} values: {e}")
            continue
        docs = documents(rendered)
        kinds = sorted(d["kind"] for d in docs)
        notes = rendered.get("crisp-bridge/templates/NOTES.txt", "")
        check(bool(docs), f"render with {label} values: {len(docs)} manifests ({', '.join(kinds)})")
        check("/readyz" in notes and "dead-letter queue" in notes, f"NOTES.txt ({label}) explains readiness, metrics and the dead-letter queue")
        renders[label] = docs
        # The bridge's own `check` reads these later (.ci/run), proving the chart's TOML
        # is a config the binary accepts.
        out_dir = os.environ.get("CHART_RENDER_DIR")
        cms = config_maps(docs)
        if out_dir and cms:
            write_for_check(Path(out_dir), Path(label).stem, cms[0]["data"]["crisp-bridge.toml"])
    return renders


def write_for_check(out_dir: Path, stem: str, toml_text: str) -> None:
    """Write a rendered config for .ci/run's `crisp-bridge check`. Its *_file keys name
    the pod's mounted Secret, absent here: point them at files with dummy secrets."""
    secrets = out_dir / "secrets"
    secrets.mkdir(parents=True, exist_ok=True)
    tls = f'"{TLS_MOUNT}/' in toml_text
    for key in SECRET_KEYS:
        value = CI_SECRETS["secret"][{"amqp-url": "amqpUrl", "crisp-identifier": "crispIdentifier", "crisp-key": "crispKey"}[key]]
        if key == "amqp-url" and tls:
            value = value.replace("amqp://", "amqps://")  # check refuses [amqp.tls] with amqp://
        (secrets / f"{stem}-{key}").write_text(value + "\n")
        toml_text = toml_text.replace(f'"{MOUNT}/{key}"', json.dumps(str(secrets / f"{stem}-{key}")))
    if tls:
        # `check` parses the TLS files: a real CA, certificate and matching key.
        tls_dir = out_dir / "tls"
        tls_dir.mkdir(exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-days", "2", "-subj", "/CN=chart-check", "-keyout", str(tls_dir / "tls.key"), "-out", str(tls_dir / "tls.crt")],
                       check=True, capture_output=True)
        (tls_dir / "ca.crt").write_bytes((tls_dir / "tls.crt").read_bytes())
        toml_text = toml_text.replace(f'"{TLS_MOUNT}/', json.dumps(str(tls_dir))[:-1] + "/")
    (out_dir / f"{stem}.toml").write_text(toml_text)


def step_refusals(chart: helm.Chart) -> None:
    section("values that must not render")
    expectations = {
        "hpa-and-keda.yaml": "mutually exclusive",
        "single-active-consumer-and-keda.yaml": "singleActiveConsumer and keda.enabled do not go together",
        "short-grace-period.yaml": "terminationGracePeriodSeconds (60) must be longer",
        "secret-in-config.yaml": "/config/crisp/key",
        "no-secrets.yaml": "secret.amqpUrl is empty and no existingSecret is named",
        "empty-crisp-key.yaml": "secret.crispKey is empty and no existingSecret is named",
        "colour-in-rule.yaml": "additional properties 'colour' not allowed",
        "config-typo.yaml": "additional properties 'concurency' not allowed",
    }
    for name, needle in expectations.items():
        path = CI_DIR / "invalid" / name
        try:
            render(chart, load_yaml(path))
        except helm.HelmError as e:
            message = str(e)
            check(needle in message, f"{rel(path)} fails to render ({type(e).__name__})", f"message lacks {needle!r}: {message}")
            print(f"        ({message.strip().splitlines()[-1].strip()})")
        else:
            fail(f"{rel(path)} rendered but must fail")
    # Grace period parsing: seconds and minutes.
    for timeout, grace, should_pass in [("25s", 26, True), ("25s", 25, False), ("1m", 61, True), ("1m30s", 90, False), ("500ms", 2, True), ("500ms", 1, False)]:
        values = {"config": {"delivery": {"shutdown_timeout": timeout}}, "terminationGracePeriodSeconds": grace, **CI_SECRETS}
        try:
            render(chart, values)
            rendered_ok = True
        except helm.HelmError:
            rendered_ok = False
        check(rendered_ok == should_pass, f"shutdown_timeout {timeout} with grace {grace}s {'renders' if should_pass else 'is refused'}")


def step_kubernetes_validate(renders: dict[str, list[dict[str, Any]]]) -> None:
    section(f"kubernetes-validate --strict -k {KUBE_VERSION}")
    with tempfile.TemporaryDirectory(prefix="crisp-bridge-manifests-") as tmp:
        files: list[str] = []
        for label, docs in renders.items():
            for index, doc in enumerate(docs):
                api_kind = (doc.get("apiVersion"), doc.get("kind"))
                name = f"{label}/{doc['__template__'].split('/')[-1]}#{doc.get('kind')}"
                if api_kind in CRD_KINDS:
                    meta = doc.get("metadata") or {}
                    spec = doc.get("spec")
                    check(
                        bool(meta.get("name")) and isinstance(spec, dict) and bool(spec),
                        f"{name}: CRD kind {api_kind[0]}/{api_kind[1]} has no bundled schema; "
                        "checked structurally (apiVersion, kind, metadata.name, non-empty spec)",
                    )
                    continue
                path = Path(tmp) / f"{label.replace('/', '_')}-{index:02d}-{doc['kind']}.yaml"
                path.write_text(yaml.safe_dump(strip(doc), sort_keys=False))
                files.append(str(path))
        venv_bin = Path(sys.executable).parent
        exe = venv_bin / "kubernetes-validate"
        cmd = [str(exe) if exe.exists() else "kubernetes-validate", "--strict", "-k", KUBE_VERSION, *files]
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        lines = [l for l in proc.stdout.splitlines() + proc.stderr.splitlines() if l.strip()]
        passed_lines = [l for l in lines if l.startswith("INFO") and " passed " in l]
        other = [l for l in lines if not (l.startswith("INFO") and " passed " in l)]
        for l in other:
            print(f"        {l.replace(tmp + '/', '')}")
        check(
            proc.returncode == 0 and not other and len(passed_lines) == len(files),
            f"{len(passed_lines)}/{len(files)} built-in manifests valid against Kubernetes {KUBE_VERSION} (strict)",
            f"exit {proc.returncode}",
        )


def step_behaviour(chart: helm.Chart, renders: dict[str, list[dict[str, Any]]]) -> None:
    section("chart behaviour")
    defaults = chart.values
    full_values = load_yaml(CI_DIR / "full-values.yaml")
    base = renders.get("default")
    full = renders.get("full-values.yaml")
    existing = renders.get("existing-values.yaml")
    options = renders.get("options-values.yaml")
    if not (base and full and existing and options):
        fail("behaviour checks skipped: a render failed")
        return

    def attempt(msg: str, fn: Callable[[], bool | tuple[bool, str]]) -> None:
        try:
            result = fn()
        except Exception as e:  # an assertion path that blew up is a failure, not a crash
            fail(f"{msg}: {type(e).__name__}: {e}")
            return
        if isinstance(result, tuple):
            check(result[0], msg, result[1])
        else:
            check(bool(result), msg)

    # Which resources each configuration produces.
    def kinds(docs: list[dict[str, Any]]) -> set[str]:
        return {d["kind"] for d in docs}

    attempt("default values: Deployment, ConfigMap, Secret, Service, ServiceAccount, PDB, test Pod only",
            lambda: (kinds(base) == {"Deployment", "ConfigMap", "Secret", "Service", "ServiceAccount", "PodDisruptionBudget", "Pod"}, str(kinds(base))))
    attempt("full values: + ServiceMonitor, ScaledObject, TriggerAuthentication, PrometheusRule, dashboard ConfigMap, no HPA",
            lambda: (kinds(full) == {"Deployment", "ConfigMap", "Secret", "Service", "ServiceAccount", "PodDisruptionBudget", "Pod",
                                     "ServiceMonitor", "ScaledObject", "TriggerAuthentication", "PrometheusRule"}
                     and len(by_kind(full, "ConfigMap")) == 2, str(kinds(full))))
    attempt("existing Secret/ConfigMap: chart makes neither, nor a ServiceAccount; HPA present",
            lambda: (kinds(existing) == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor", "Pod"}, str(kinds(existing))))

    # Deployment wiring.
    def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
        return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]

    attempt("image defaults to <repository>:<appVersion>", lambda: (container(base)["image"] == f"crisp-bridge:{chart.metadata['appVersion']}", container(base)["image"]))
    attempt("args run --config /etc/crisp-bridge/crisp-bridge.toml",
            lambda: container(base)["args"] == ["run", "--config", "/etc/crisp-bridge/crisp-bridge.toml"])
    attempt("config file mounted at /etc/crisp-bridge from the ConfigMap",
            lambda: any(m["mountPath"] == "/etc/crisp-bridge" for m in container(base)["volumeMounts"]))

    def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
        return one(docs, "Deployment")["spec"]["template"]["spec"]

    def env_ok(docs: list[dict[str, Any]], secret: str) -> tuple[bool, str]:
        env = {e["name"]: e for e in container(docs)["env"]}
        want = {"CRISP_BRIDGE_AMQP__URL": "amqp-url", "CRISP_BRIDGE_CRISP__IDENTIFIER": "crisp-identifier", "CRISP_BRIDGE_CRISP__KEY": "crisp-key"}
        for name, key in want.items():
            ref = env.get(name, {}).get("valueFrom", {}).get("secretKeyRef", {})
            if ref != {"name": secret, "key": key}:
                return False, f"{name} -> {ref}"
        if any(v.get("name") == "secrets" for v in pod_spec(docs)["volumes"]):
            return False, "Secret volume mounted in env mode"
        return env.get("CRISP_BRIDGE_LOG__FORMAT", {}).get("value") == "json", "CRISP_BRIDGE_LOG__FORMAT"

    def files_ok(docs: list[dict[str, Any]], secret: str, in_toml: bool) -> tuple[bool, str]:
        """Secret mounted as a directory (kubelet refreshes it: no subPath), no secret env."""
        spec, c = pod_spec(docs), container(docs)
        vol = {v["name"]: v for v in spec["volumes"]}.get("secrets", {}).get("secret", {})
        if vol.get("secretName") != secret or {i["key"] for i in vol.get("items", [])} != set(SECRET_KEYS):
            return False, f"volume {vol}"
        mount = [m for m in c["volumeMounts"] if m["name"] == "secrets"]
        if mount != [{"name": "secrets", "mountPath": MOUNT, "readOnly": True}]:
            return False, f"mount {mount}"
        env = {e["name"]: e.get("value") for e in c["env"]}
        if {"CRISP_BRIDGE_AMQP__URL", "CRISP_BRIDGE_CRISP__IDENTIFIER", "CRISP_BRIDGE_CRISP__KEY"} & set(env):
            return False, "a secret is also passed as a variable"
        for key, (sec, name) in SECRET_KEYS.items():
            path = f"{MOUNT}/{key}"
            if in_toml:
                got = config_toml(docs).get(sec, {}).get(f"{name}_file")
            else:
                got = env.get(f"CRISP_BRIDGE_{sec.upper()}__{name.upper()}_FILE")
            if got != path:
                return False, f"{sec}.{name}_file = {got!r}, want {path}"
        return True, ""

    attempt("secrets mounted as files at /var/run/secrets/crisp-bridge; the TOML's *_file keys name them",
            lambda: files_ok(base, f"{RELEASE}-crisp-bridge", in_toml=True))
    attempt("existingSecret mounted as files; with existingConfigMap the *_file paths come as CRISP_BRIDGE_*__*_FILE variables",
            lambda: files_ok(existing, "crisp-bridge-credentials", in_toml=False))
    attempt("secretsAs env: secrets come from the chart's Secret as CRISP_BRIDGE_* variables, no volume; log format json",
            lambda: env_ok(options, "cb-crisp-bridge"))
    attempt("secretsAs env: TOML has no *_file keys",
            lambda: not any(k.endswith("_file") for sec in config_toml(options).values() if isinstance(sec, dict) for k in sec))
    attempt("secretsAs env: a secret whose *_file the user set gets no variable (it would conflict)",
            lambda: "CRISP_BRIDGE_CRISP__KEY" not in {e["name"] for e in container(documents(render(
                chart, {**CI_SECRETS, "secretsAs": "env", "config": {"crisp": {"key_file": "/vault/crisp-key"}}})))["env"]})
    attempt("a *_file key the user sets wins over the chart's path",
            lambda: config_toml(documents(render(chart, {**CI_SECRETS, "config": {"crisp": {"key_file": "/vault/crisp-key"}}})))["crisp"]["key_file"] == "/vault/crisp-key")
    def tls_ok() -> tuple[bool, str]:
        pod = pod_spec(full)
        vol = next((v for v in pod["volumes"] if v["name"] == "amqp-tls"), None)
        if not vol or vol["secret"]["secretName"] != "crisp-bridge-rabbitmq-tls":
            return False, f"volumes {pod['volumes']}"
        if [i["key"] for i in vol["secret"]["items"]] != ["ca.crt", "tls.crt", "tls.key"] or "subPath" in str(container(full)["volumeMounts"]):
            return False, f"items {vol['secret']['items']}"
        mount = next((m for m in container(full)["volumeMounts"] if m["name"] == "amqp-tls"), {})
        tls = config_toml(full)["amqp"].get("tls", {})
        want = {k: f"{mount.get('mountPath')}/{f}" for k, f in [("ca_file", "ca.crt"), ("cert_file", "tls.crt"), ("key_file", "tls.key")]}
        if tls != want or config_toml(full)["crisp"].get("proxy") != "http://proxy.internal:3128":
            return False, f"[amqp.tls] {tls}, crisp {config_toml(full)['crisp']}"
        ca_only = documents(render(chart, {**CI_SECRETS, "amqpTls": {"secretName": "ca", "clientCertificate": False}, "crisp": {"caFile": "/etc/ssl/egress/ca.crt"}}))
        if set(config_toml(ca_only)["amqp"]["tls"]) != {"ca_file"} or config_toml(ca_only)["crisp"].get("ca_file") != "/etc/ssl/egress/ca.crt":
            return False, f"ca only: {config_toml(ca_only)['amqp']}"
        test_pod = one(full, "Pod")["spec"]
        if not any(v["name"] == "amqp-tls" for v in test_pod["volumes"]):
            return False, "helm test pod lacks the TLS volume (check reads the files)"
        with_cm = documents(render(chart, {**load_yaml(CI_DIR / "existing-values.yaml"), "amqpTls": {"secretName": "tls"}, "crisp": {"proxy": "http://p:3128"}}))
        env = {e["name"]: e.get("value") for e in container(with_cm)["env"]}
        if env.get("CRISP_BRIDGE_AMQP__TLS__CERT_FILE") != "/etc/crisp-bridge-tls/tls.crt" or env.get("CRISP_BRIDGE_CRISP__PROXY") != "http://p:3128":
            return False, f"existingConfigMap env {env}"
        return True, ""

    attempt("amqpTls: the Secret's ca.crt/tls.crt/tls.key mounted (no subPath) and named by [amqp.tls]; crisp.proxy/caFile in the TOML; the helm test pod mounts it too; with existingConfigMap as CRISP_BRIDGE_* variables",
            tls_ok)
    attempt("existingConfigMap is mounted when set",
            lambda: one(existing, "Deployment")["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == "crisp-bridge-config")

    def probes(docs: list[dict[str, Any]]) -> bool:
        c = container(docs)
        return (c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
                and c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
                and c["ports"] == [{"name": "admin", "containerPort": 9464, "protocol": "TCP"}])

    attempt("liveness /healthz and readiness /readyz on the admin port 9464", lambda: probes(base))
    attempt("resources: requests 50m/64Mi, limit 512Mi",
            lambda: container(base)["resources"] == {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}})

    def restricted(docs: list[dict[str, Any]]) -> tuple[bool, str]:
        spec = one(docs, "Deployment")["spec"]["template"]["spec"]
        psc, csc = spec.get("securityContext", {}), container(docs).get("securityContext", {})
        problems = []
        if not psc.get("runAsNonRoot") or psc.get("runAsUser") != 65532:
            problems.append(f"pod {psc}")
        if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append("pod seccompProfile")
        expect = {"runAsNonRoot": True, "runAsUser": 65532, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False}
        for k, v in expect.items():
            if csc.get(k) != v:
                problems.append(f"container {k}={csc.get(k)!r}")
        if (csc.get("capabilities") or {}).get("drop") != ["ALL"] or (csc.get("capabilities") or {}).get("add"):
            problems.append(f"capabilities {csc.get('capabilities')}")
        if (csc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append("container seccompProfile")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append("service account token mounted")
        return not problems, "; ".join(problems)

    for label, docs in renders.items():
        attempt(f"securityContext is restricted ({label})", lambda docs=docs: restricted(docs))
    attempt("terminationGracePeriodSeconds defaults to 40",
            lambda: one(base, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 40)

    # Replicas and disruption budget.
    attempt("replicas set from replicaCount without autoscaling", lambda: one(base, "Deployment")["spec"]["replicas"] == 1)
    attempt("replicas left to KEDA / the HPA when they scale",
            lambda: "replicas" not in one(full, "Deployment")["spec"] and "replicas" not in one(existing, "Deployment")["spec"])
    attempt("PDB: maxUnavailable 1 with one replica", lambda: one(base, "PodDisruptionBudget")["spec"].get("maxUnavailable") == 1
            and "minAvailable" not in one(base, "PodDisruptionBudget")["spec"])
    attempt("PDB: minAvailable 1 when at least two replicas are expected", lambda: one(full, "PodDisruptionBudget")["spec"].get("minAvailable") == 1)
    attempt("PDB: replicaCount 3 without autoscaling gives minAvailable 1",
            lambda: one(documents(render(chart, {"replicaCount": 3, **CI_SECRETS})), "PodDisruptionBudget")["spec"].get("minAvailable") == 1)
    attempt("PDB: an explicit bound wins", lambda: one(existing, "PodDisruptionBudget")["spec"] .get("maxUnavailable") == "50%")

    # Service and monitoring.
    attempt("Service exposes port 9464 named admin",
            lambda: one(base, "Service")["spec"]["ports"] == [{"name": "admin", "port": 9464, "targetPort": "admin", "protocol": "TCP"}])
    attempt("ServiceMonitor scrapes /metrics on the admin port",
            lambda: [(e["port"], e["path"]) for e in one(full, "ServiceMonitor")["spec"]["endpoints"]] == [("admin", "/metrics")])
    attempt("HPA targets the Deployment on CPU",
            lambda: one(existing, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["resource"]["name"] == "cpu")

    # KEDA wiring.
    def keda_ok() -> tuple[bool, str]:
        so = one(full, "ScaledObject")
        ta = one(full, "TriggerAuthentication")
        trig = so["spec"]["triggers"][0]
        meta = trig["metadata"]
        checks = {
            "type rabbitmq": trig["type"] == "rabbitmq",
            "mode QueueLength": meta.get("mode") == "QueueLength",
            "queueName = config.amqp.queue": meta.get("queueName") == full_values["config"]["amqp"]["queue"],
            "value = keda.queueLength": meta.get("value") == str(full_values["keda"]["queueLength"]),
            "authenticationRef": trig["authenticationRef"]["name"] == ta["metadata"]["name"],
            "host from secret amqp-url": ta["spec"]["secretTargetRef"] == [{"parameter": "host", "name": "crisp-bridge", "key": "amqp-url"}],
            "targets the Deployment": so["spec"]["scaleTargetRef"]["name"] == one(full, "Deployment")["metadata"]["name"],
        }
        bad = [k for k, v in checks.items() if not v]
        return not bad, ", ".join(bad)

    attempt("KEDA ScaledObject: rabbitmq QueueLength on the configured queue, host from the Secret", keda_ok)

    # Secret content.
    def secret_ok() -> bool:
        data = one(full, "Secret")["data"]
        decoded = {k: base64.b64decode(v).decode() for k, v in data.items()}
        return decoded == {"amqp-url": full_values["secret"]["amqpUrl"], "crisp-identifier": full_values["secret"]["crispIdentifier"],
                           "crisp-key": full_values["secret"]["crispKey"]}

    attempt("Secret holds amqp-url, crisp-identifier, crisp-key from values", secret_ok)

    # The TOML config.
    def toml_ok(docs: list[dict[str, Any]], values: dict[str, Any]) -> tuple[bool, str]:
        cfg = config_toml(docs)
        problems = []
        for section_name in ("amqp", "crisp", "delivery", "server", "log"):
            if section_name not in cfg:
                problems.append(f"[{section_name}] missing")
        want_rules = [r["name"] for r in values["rules"]]
        got_rules = [r.get("name") for r in cfg.get("rules", [])]
        if got_rules != want_rules:
            problems.append(f"rules {got_rules} != {want_rules}")
        if cfg.get("rules") and cfg["rules"] != values["rules"]:
            problems.append("rules differ from values")
        for sec, key in (("amqp", "prefetch"), ("delivery", "concurrency"), ("delivery", "max_requests_per_second")):
            v = cfg.get(sec, {}).get(key)
            if not isinstance(v, int) or isinstance(v, bool):
                problems.append(f"{sec}.{key} = {v!r} is not a TOML integer")
        if "url" in cfg.get("amqp", {}) or {"identifier", "key"} & set(cfg.get("crisp", {})):
            problems.append("a secret is in the ConfigMap")
        if cfg.get("server", {}).get("listen") != "0.0.0.0:9464":
            problems.append(f"server.listen {cfg.get('server', {}).get('listen')}")
        return not problems, "; ".join(problems)

    attempt("ConfigMap crisp-bridge.toml parses (tomllib), has every section, the rules in order, integers as integers, no secrets",
            lambda: toml_ok(base, defaults))
    attempt("same for the full values", lambda: toml_ok(full, full_values))

    def default_rules_ok() -> tuple[bool, str]:
        rules = {r["name"]: r for r in config_toml(base)["rules"]}
        trial = rules.get("trial-started", {})
        order = rules.get("order-created", {})
        good = (trial == {"name": "trial-started", "routing_key": "trial.#", "people_id": "/email", "text": "trial:started", "color": "green"}
                and order.get("when") == {"/status": "paid"} and order.get("people_id") == ["/customer/email", "/email"]
                and order.get("data") == {"order_id": "/id", "total": "/amount/total", "currency": "/amount/currency"})
        return good, json.dumps(list(rules.values()))

    attempt("default rules: the README's order-created example plus trial-started", default_rules_ok)

    # Checksums roll the pods.
    defaults = {**copy.deepcopy(defaults), **copy.deepcopy(CI_SECRETS)}

    def checksum_after(change: Callable[[dict[str, Any]], None], annotation: str) -> tuple[str, str]:
        values = copy.deepcopy(defaults)
        before = pod_annotations(documents(render(chart, values)))[annotation]
        change(values)
        after = pod_annotations(documents(render(chart, values)))[annotation]
        return before, after

    def rule_text(v: dict[str, Any]) -> None:
        v["rules"][1]["text"] = "trial:started:v2"

    def new_rule(v: dict[str, Any]) -> None:
        v["rules"].append({"name": "signup", "routing_key": "user.signed_up", "people_id": "/email", "text": "user:signup"})

    def new_key(v: dict[str, Any]) -> None:
        v["secret"]["crispKey"] = "rotated"

    attempt("checksum/config is stable across renders",
            lambda: pod_annotations(base)["checksum/config"] == pod_annotations(documents(render(chart, CI_SECRETS)))["checksum/config"])
    for label, change in (("a rule's text changes", rule_text), ("a rule is added", new_rule)):
        attempt(f"checksum/config changes when {label}", lambda change=change: (lambda b, a: (b != a, f"{b} == {a}"))(*checksum_after(change, "checksum/config")))
    attempt("checksum/config does not change when only the Secret changes",
            lambda: (lambda b, a: b == a)(*checksum_after(new_key, "checksum/config")))
    def env_mode(v: dict[str, Any]) -> None:
        v["secretsAs"] = "env"

    def env_key(v: dict[str, Any]) -> None:
        env_mode(v)
        new_key(v)

    defaults_env = copy.deepcopy(defaults)
    env_mode(defaults_env)
    attempt("secretsAs env: checksum/secret changes when a credential changes (variables need a restart)",
            lambda: pod_annotations(documents(render(chart, defaults_env)))["checksum/secret"]
            != pod_annotations(documents(render(chart, {**defaults_env, "secret": {**defaults["secret"], "crispKey": "rotated"}})))["checksum/secret"])
    attempt("secretsAs files: no checksum/secret (a rotation is read from the files without a restart)",
            lambda: "checksum/secret" not in pod_annotations(base) and "checksum/secret" not in pod_annotations(full))
    attempt("existingSecret: no checksum of its name",
            lambda: "checksum/secret" not in pod_annotations(existing))
    attempt("podAnnotations are added next to the checksums",
            lambda: pod_annotations(full).get("example.com/team") == "growth" and "checksum/config" in pod_annotations(full))


    # Options platform teams expect (ci/options-values.yaml).
    opt_values = load_yaml(CI_DIR / "options-values.yaml")

    def options_ok() -> tuple[bool, str]:
        dep = one(options, "Deployment")
        spec, c = dep["spec"]["template"]["spec"], container(options)
        checks = {
            "image by digest": c["image"] == f"{opt_values['image']['repository']}@{opt_values['image']['digest']}",
            "envFrom": c.get("envFrom") == opt_values["envFrom"],
            "extraEnv": {"name": "RUST_BACKTRACE", "value": "1"} in c["env"],
            "extraVolumes": opt_values["extraVolumes"][0] in spec["volumes"],
            "extraVolumeMounts": opt_values["extraVolumeMounts"][0] in c["volumeMounts"],
            "initContainers": [i["name"] for i in spec.get("initContainers", [])] == ["wait-for-rabbitmq"],
            "strategy": dep["spec"].get("strategy") == opt_values["strategy"],
            "priorityClassName": spec.get("priorityClassName") == "platform-high",
            "podLabels": dep["spec"]["template"]["metadata"]["labels"].get("team") == "growth",
            "topologySpreadConstraints get the selector labels": spec.get("topologySpreadConstraints", [{}])[0].get("labelSelector")
            == {"matchLabels": dep["spec"]["selector"]["matchLabels"]},
            "PDB policy IfHealthyBudget": one(options, "PodDisruptionBudget")["spec"].get("unhealthyPodEvictionPolicy") == "IfHealthyBudget",
            "tests.enabled false: no test Pod": not by_kind(options, "Pod"),
        }
        bad = [k for k, v in checks.items() if not v]
        return not bad, ", ".join(bad)

    attempt("new options render: image.digest, envFrom, extraVolumes/Mounts, initContainers, strategy, priorityClassName, "
            "podLabels, topologySpreadConstraints, PDB policy, tests toggle", options_ok)
    attempt("defaults: no strategy, priorityClassName, initContainers or topologySpreadConstraints",
            lambda: not ({"priorityClassName", "initContainers", "topologySpreadConstraints"} & set(pod_spec(base)))
            and "strategy" not in one(base, "Deployment")["spec"])
    attempt("PDB: unhealthyPodEvictionPolicy AlwaysAllow by default (a drain is not blocked by unready pods)",
            lambda: all(one(d, "PodDisruptionBudget")["spec"].get("unhealthyPodEvictionPolicy") == "AlwaysAllow" for d in (base, full, existing)))
    attempt("PDB: an empty unhealthyPodEvictionPolicy leaves the field out",
            lambda: "unhealthyPodEvictionPolicy" not in one(documents(render(chart, {**CI_SECRETS, "podDisruptionBudget": {"unhealthyPodEvictionPolicy": ""}})), "PodDisruptionBudget")["spec"])

    def keda_extras() -> tuple[bool, str]:
        so = one(full, "ScaledObject")["spec"]
        got = (so["triggers"][0]["metadata"].get("activationValue"), so.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior"))
        want = (str(full_values["keda"]["activationQueueLength"]), full_values["keda"]["behavior"])
        return got == want, f"{got} != {want}"

    attempt("KEDA: activationValue from keda.activationQueueLength, behavior under advanced.horizontalPodAutoscalerConfig", keda_extras)
    attempt("NOTES.txt warns that scaling up during a Crisp hold only adds idle pods",
            lambda: "only sit idle" in render(chart, load_yaml(CI_DIR / "full-values.yaml")).get("crisp-bridge/templates/NOTES.txt", ""))

    # helm test hook.
    def test_pod_ok(docs: list[dict[str, Any]]) -> tuple[bool, str]:
        pod = one(docs, "Pod")
        c = pod["spec"]["containers"][0]
        dep_spec, dep_c = pod_spec(docs), container(docs)
        problems = []
        if pod["metadata"]["annotations"].get("helm.sh/hook") != "test":
            problems.append("hook annotation")
        if c["args"] != ["check", "--config", "/etc/crisp-bridge/crisp-bridge.toml"] or c["image"] != dep_c["image"]:
            problems.append(f"args/image {c['args']} {c['image']}")
        if pod["spec"].get("restartPolicy") != "Never":
            problems.append("restartPolicy")
        same = lambda items: sorted(json.dumps(x, sort_keys=True) for x in items if x["name"] in ("config", "secrets"))
        if same(pod["spec"]["volumes"]) != same(dep_spec["volumes"]) or same(c["volumeMounts"]) != same(dep_c["volumeMounts"]):
            problems.append("config/secret volumes differ from the Deployment's")
        secret_env = lambda env: [e for e in env if e["name"].startswith(("CRISP_BRIDGE_AMQP", "CRISP_BRIDGE_CRISP"))]
        if secret_env(c.get("env", [])) != secret_env(dep_c["env"]):
            problems.append("secret env differs from the Deployment's")
        sel = one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
        if all(pod["metadata"]["labels"].get(k) == v for k, v in sel.items()):
            problems.append("the Service/PDB selector matches the test Pod")
        return not problems, "; ".join(problems)

    for label in ("default", "existing-values.yaml", "full-values.yaml"):
        attempt(f"helm test Pod runs crisp-bridge check with the Deployment's config and secrets ({label})",
                lambda label=label: test_pod_ok(renders[label]))

    # Ordered failover (ci/single-active-consumer-values.yaml): both modes render.
    sac = renders.get("single-active-consumer-values.yaml")

    def sac_ok() -> tuple[bool, str]:
        if sac is None:
            return False, "ci/single-active-consumer-values.yaml did not render"
        checks = {
            "amqp.single_active_consumer = true": config_toml(sac)["amqp"].get("single_active_consumer") is True,
            "replicas 3 (one active, two standing by)": one(sac, "Deployment")["spec"].get("replicas") == 3,
            "no HPA, no ScaledObject": not by_kind(sac, "HorizontalPodAutoscaler") and not by_kind(sac, "ScaledObject"),
            "default: competing consumers": not config_toml(base)["amqp"].get("single_active_consumer", False),
        }
        bad = [k for k, v in checks.items() if not v]
        return not bad, ", ".join(bad)

    attempt("singleActiveConsumer renders amqp.single_active_consumer = true (the default renders competing consumers)", sac_ok)

    def sac_refused(values: dict[str, Any], needle: str) -> tuple[bool, str]:
        try:
            render(chart, values)
        except helm.HelmError as e:
            return needle in str(e), str(e)
        return False, "rendered"

    attempt("singleActiveConsumer with autoscaling.enabled is refused",
            lambda: sac_refused({**CI_SECRETS, "singleActiveConsumer": True, "autoscaling": {"enabled": True}},
                                "singleActiveConsumer and autoscaling.enabled do not go together"))
    attempt("config.amqp.single_active_consumer = true with keda.enabled is refused too",
            lambda: sac_refused({**CI_SECRETS, "config": {"amqp": {"single_active_consumer": True}}, "keda": {"enabled": True}},
                                "singleActiveConsumer and keda.enabled do not go together"))

    def sac_existing() -> tuple[bool, str]:
        docs = documents(render(chart, {**load_yaml(CI_DIR / "existing-values.yaml"), "autoscaling": {"enabled": False}, "singleActiveConsumer": True}))
        env = container(docs)["env"]
        want = {"name": "CRISP_BRIDGE_AMQP__SINGLE_ACTIVE_CONSUMER", "value": "true"}
        return want in env, str(env)

    attempt("singleActiveConsumer with existingConfigMap: CRISP_BRIDGE_AMQP__SINGLE_ACTIVE_CONSUMER=true", sac_existing)


def metric_names() -> tuple[set[str], set[str]]:
    """(every metric name, histogram names) declared in src/telemetry/metrics.rs."""
    text = METRICS_RS.read_text()
    names = set(re.findall(r'"(crisp_bridge_[a-z0-9_]+)"', text))
    consts = dict(re.findall(r'pub const ([A-Z_]+): &str = "(crisp_bridge_[a-z0-9_]+)"', text))
    histograms = {consts[c] for c in re.findall(r"describe_histogram!\(\s*([A-Z_]+)", text) if c in consts}
    return names, histograms


# Series a query may use besides crisp-bridge's own: Prometheus' scrape health.
BUILTIN_SERIES = {"up"}


def unknown_metrics(expr: str, names: set[str], histograms: set[str]) -> list[str]:
    """Selectors (`name{`) and crisp_bridge_* names in a PromQL expression that no code defines."""
    used = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr)) | set(re.findall(r"\bcrisp_bridge_[a-z0-9_]+", expr))
    known = names | BUILTIN_SERIES | {h + suffix for h in histograms for suffix in ("_bucket", "_sum", "_count")}
    return sorted(used - known)


PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "minLength": 1}}},
        "spec": {"type": "object", "additionalProperties": False, "required": ["groups"], "properties": {"groups": {
            "type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["name", "rules"],
                "properties": {"name": {"type": "string", "minLength": 1}, "interval": {"type": "string"}, "rules": {
                    "type": "array", "minItems": 1, "items": {
                        "type": "object", "additionalProperties": False, "required": ["expr"],
                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                        "properties": {
                            "alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                            "record": {"type": "string"},
                            "expr": {"type": "string", "minLength": 1},
                            "for": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"},
                            "keep_firing_for": {"type": "string"},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                        }}}}}}}},
    },
}

EXPECTED_ALERTS = {"CrispBridgeNoConsumer", "CrispBridgeCrispRefused", "CrispBridgeRateLimitHold", "CrispBridgeOutageHold",
                   "CrispBridgeDeadLetterRatio", "CrispBridgeDeadLetters", "CrispBridgeRetriesClimbing",
                   "CrispBridgeQuotaNearlySpent"}


def step_monitoring(renders: dict[str, list[dict[str, Any]]]) -> None:
    section("PrometheusRule and Grafana dashboard (metrics from src/telemetry/metrics.rs)")
    full = renders.get("full-values.yaml")
    if not full:
        fail("monitoring checks skipped: the full render failed")
        return
    names, histograms = metric_names()
    check(len(names) >= 10 and "crisp_bridge_messages_total" in names, f"{len(names)} metric names read from {rel(METRICS_RS)}")
    rules = by_kind(full, "PrometheusRule")
    if not check(len(rules) == 1, "full values render one PrometheusRule"):
        return
    rule = strip(rules[0])
    errs = [f"/{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in jsonschema.Draft7Validator(PROMETHEUS_RULE_SCHEMA).iter_errors(rule)]
    check(not errs, "PrometheusRule matches the monitoring.coreos.com/v1 structure (groups, rules, alert/expr/for/labels/annotations)", "; ".join(errs))
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    got = {a.get("alert") for a in alerts}
    check(EXPECTED_ALERTS <= got, "alerts: no consumer, credentials refused, rate-limit/quota hold, outage hold, dead letters, retries, "
          "quota nearly spent",
          str(sorted(EXPECTED_ALERTS - got)))
    for a in alerts:
        bad = unknown_metrics(a["expr"], names, histograms)
        check(not bad, f"alert {a.get('alert') or a.get('record')}: expr names only existing metrics", ", ".join(bad))
    own = [a for a in alerts if a.get("alert") in EXPECTED_ALERTS]
    check(all('namespace="crisp",job="crisp-bridge"' in a["expr"] for a in own), "every chart alert selects the release's namespace and job")
    check(all(a["labels"].get("severity") and a["labels"].get("team") == "growth" and a["annotations"].get("summary") for a in own),
          "every chart alert has a severity, the alertLabels and a summary")
    check(any('outcome="dead_lettered"' in a["expr"] for a in own), 'the dead-letter ratio alert uses outcome="dead_lettered"')
    # Prometheus' own templating survives Helm's.
    check(any("{{ $labels.pod }}" in a["annotations"].get("description", "") for a in own), "alert descriptions keep Prometheus {{ $labels }} templates")

    boards = [d for d in by_kind(full, "ConfigMap") if "crisp-bridge.json" in d.get("data", {})]
    if not check(len(boards) == 1, "full values render one dashboard ConfigMap"):
        return
    board = boards[0]
    check(board["metadata"]["labels"].get("grafana_dashboard") == "1", "dashboard ConfigMap has the label grafana_dashboard: \"1\"")
    try:
        dash = json.loads(board["data"]["crisp-bridge.json"])
    except json.JSONDecodeError as e:
        fail(f"dashboard JSON does not parse: {e}")
        return
    targets = [t["expr"] for p in dash.get("panels", []) for t in p.get("targets", [])]
    titles = " | ".join(p.get("title", "") for p in dash.get("panels", []))
    check(dash.get("uid") and len(targets) >= 8, f"dashboard parses: {len(dash.get('panels', []))} panels ({titles})")
    bad = sorted({m for t in targets for m in unknown_metrics(t, names, histograms)})
    check(not bad, "dashboard queries name only existing metrics", ", ".join(bad))
    for needle, what in (("crisp_bridge_messages_total", "messages by outcome"), ("crisp_bridge_dead_letters_total", "dead letters by reason"),
                         ("crisp_bridge_crisp_requests_total", "requests by status"), ("histogram_quantile(0.95", "p95 duration"),
                         ("crisp_bridge_in_flight", "in-flight"), ("crisp_bridge_rate_limit_hold", "holds")):
        check(any(needle in t for t in targets), f"dashboard has a {what} panel")


QUOTA_ALERT = "CrispBridgeQuotaNearlySpent"
QUOTA_METRIC = "crisp_bridge_crisp_requests_today"


def quota_rule(docs: list[dict[str, Any]]) -> dict[str, Any]:
    rules = [r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"] if r.get("alert") == QUOTA_ALERT]
    assert len(rules) == 1, f"expected one {QUOTA_ALERT}, found {len(rules)}"
    return rules[0]


def quota_threshold(expr: str) -> float:
    """The number after the last `>`: the alert compares the day's sum with quota x ratio."""
    found = re.search(r">\s*([0-9][0-9.e+]*)\s*$", expr)
    assert found, f"no `> <number>` at the end of {expr!r}"
    return float(found.group(1))


def dashboard_quota_targets(docs: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The dashboard JSON as rendered, and the targets of the panel summing requests today."""
    boards = [d for d in by_kind(docs, "ConfigMap") if "crisp-bridge.json" in d.get("data", {})]
    assert len(boards) == 1, f"expected one dashboard ConfigMap, found {len(boards)}"
    text = boards[0]["data"]["crisp-bridge.json"]
    panels = [p for p in json.loads(text).get("panels", [])
              if any(QUOTA_METRIC in t.get("expr", "") and t["expr"].lstrip().startswith("sum(") for t in p.get("targets", []))]
    assert len(panels) == 1, f"expected one panel summing {QUOTA_METRIC}, found {len(panels)}"
    return text, panels[0]["targets"]


def step_quota(chart: helm.Chart, renders: dict[str, list[dict[str, Any]]]) -> None:
    section(f"daily quota: {QUOTA_ALERT} and the dashboard's quota line")
    full = renders.get("full-values.yaml")
    if not full:
        fail("quota checks skipped: the full render failed")
        return
    full_values = load_yaml(CI_DIR / "full-values.yaml")
    defaults = chart.values

    def attempt(msg: str, fn: Callable[[], bool | tuple[bool, str]]) -> None:
        try:
            result = fn()
        except Exception as e:
            fail(f"{msg}: {type(e).__name__}: {e}")
            return
        if isinstance(result, tuple):
            check(result[0], msg, result[1])
        else:
            check(bool(result), msg)

    def rendered(**values: Any) -> list[dict[str, Any]]:
        merged: dict[str, Any] = {**CI_SECRETS, "prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}}
        for key, value in values.items():
            merged[key] = {**merged.get(key, {}), **value}
        return documents(render(chart, merged))

    def sums_over_pods(expr: str) -> tuple[bool, str]:
        # One token's quota is spent by every pod together: a sum of them all, not a max
        # or a per-pod series.
        summed = re.search(rf"\bsum\s*\(\s*{QUOTA_METRIC}\s*\{{", expr)
        per_pod = re.search(r"\b(max|min|avg)\b|\bby\s*\([^)]*\bpod\b", expr)
        return bool(summed) and not per_pod, expr

    sel = 'namespace="crisp",job="crisp-bridge"'
    attempt(f"full values: {QUOTA_ALERT} is the chart's own (no hand-written copy in additionalRules)",
            lambda: (all(r.get("alert") != QUOTA_ALERT for r in full_values["prometheusRule"].get("additionalRules", [])), ""))
    attempt(f"{QUOTA_ALERT} sums {QUOTA_METRIC} over the release's pods (sum(...), no max or by pod)",
            lambda: sums_over_pods(quota_rule(full)["expr"]))
    attempt(f"{QUOTA_ALERT} selects the release's series ({sel})",
            lambda: (f"{QUOTA_METRIC}{{{sel}}}" in quota_rule(full)["expr"], quota_rule(full)["expr"]))
    want = full_values["crisp"].get("dailyQuota", defaults["crisp"]["dailyQuota"]) * full_values["prometheusRule"]["quotaWarningRatio"]
    attempt(f"full values: threshold is crisp.dailyQuota x prometheusRule.quotaWarningRatio (> {want:g})",
            lambda: (quota_threshold(quota_rule(full)["expr"]) == want, quota_rule(full)["expr"]))
    attempt(f"{QUOTA_ALERT} is a warning with the alertLabels and no `for` (the count only grows during a day)",
            lambda: (quota_rule(full)["labels"] == {"severity": "warning", "team": "growth"} and "for" not in quota_rule(full),
                     str(quota_rule(full))))

    # Defaults (5000 x 0.8), a bigger quota, a ratio that is not exact in floats, a fraction.
    for values, threshold in [({}, "4000"),
                              ({"crisp": {"dailyQuota": 10000}}, "8000"),
                              ({"crisp": {"dailyQuota": 10000}, "prometheusRule": {"quotaWarningRatio": 0.7}}, "7000"),
                              ({"crisp": {"dailyQuota": 5001}, "prometheusRule": {"quotaWarningRatio": 0.85}}, "4250.85")]:
        label = ", ".join(f"{k}.{kk}: {vv}" for k, v in values.items() for kk, vv in v.items()) or "default values"
        attempt(f"{label}: {QUOTA_ALERT} renders `> {threshold}`",
                lambda values=values, threshold=threshold: (quota_rule(rendered(**values))["expr"].endswith(f") > {threshold}"),
                                                            quota_rule(rendered(**values))["expr"]))
    custom = 'job=~"crisp-bridge|crisp-bridge-eu"'
    attempt(f"prometheusRule.selector ({custom}) replaces the default selector in {QUOTA_ALERT}",
            lambda: (f"{QUOTA_METRIC}{{{custom}}}" in quota_rule(rendered(prometheusRule={"selector": custom}))["expr"],
                     quota_rule(rendered(prometheusRule={"selector": custom}))["expr"]))

    def described() -> tuple[bool, str]:
        ann = quota_rule(rendered(crisp={"dailyQuota": 10000}))["annotations"]
        text = ann.get("summary", "") + " " + ann.get("description", "")
        needs = {"the quota": "10000", "Prometheus' value": "{{ $value }}", "restarts under-count": "restarted",
                 "other users of the token": "same token", "the selector to widen": "prometheusRule.selector",
                 "messages wait": "wait in the queue", "the ratio": "80 %"}
        missing = [k for k, v in needs.items() if v not in text]
        return not missing, "missing " + ", ".join(missing)

    attempt(f"{QUOTA_ALERT} says the quota, that messages wait, and where the sum is wrong (restarts, other users of the token)",
            described)

    def dashboard(docs: list[dict[str, Any]], quota: int) -> tuple[bool, str]:
        text, targets = dashboard_quota_targets(docs)
        line = [t for t in targets if t.get("legendFormat") == "daily quota"]
        if "__DAILY_QUOTA__" in text:
            return False, "placeholder __DAILY_QUOTA__ left in the JSON"
        if len(line) != 1 or line[0].get("expr") != f"vector({quota})":
            return False, f"quota targets {line}"
        if len({t.get("refId") for t in targets}) != len(targets):
            return False, "refIds repeat"
        return True, ""

    attempt("full values: the dashboard's requests-today panel has the target vector(5000) \"daily quota\", no placeholder left",
            lambda: dashboard(full, 5000))
    attempt("crisp.dailyQuota: 10000: the dashboard's quota target is vector(10000)",
            lambda: dashboard(rendered(crisp={"dailyQuota": 10000}), 10000))
    attempt("the dashboard's Grafana legends ({{outcome}}, {{pod}}) survive the substitution",
            lambda: all(s in dashboard_quota_targets(full)[0] for s in ('"{{outcome}}"', '"{{pod}}"')))


def step_generated() -> None:
    section("generated files are current")
    check(gen_values_schema.generate() == (CHART / "values.schema.json").read_text(),
          "values.schema.json config/rules match schemas/config.schema.json (run python3 .ci/gen_values_schema.py)")
    check(gen_chart_readme.readme() == (CHART / "README.md").read_text(),
          "README values table matches values.yaml (run .ci/gen_chart_readme.py)")

def main() -> int:
    started = time.monotonic()
    print(f"crisp-bridge chart check: {rel(CHART)}, helm_python {helm.__version__} "
          f"(Helm {helm.helm_sdk_version()}), Kubernetes schemas {KUBE_VERSION}")
    value_files = sorted(CI_DIR.glob("*-values.yaml"))
    invalid_schema = [CI_DIR / "invalid" / n for n in ("secret-in-config.yaml", "colour-in-rule.yaml", "config-typo.yaml")]
    if not value_files:
        fail(f"no values files in {rel(CI_DIR)}")
    try:
        chart = helm.Chart.load(str(CHART))
    except helm.HelmError as e:
        fail(f"chart does not load: {e}")
        chart = None
    if chart is not None:
        with chart:
            check(chart.metadata.get("apiVersion") == "v2" and chart.metadata.get("appVersion") == "0.1.0",
                  "Chart.yaml: apiVersion v2, appVersion 0.1.0")
            step_lint(value_files)
            step_schema(chart, value_files, invalid_schema)
            renders = step_render(chart, value_files)
            step_refusals(chart)
            if renders:
                step_kubernetes_validate(renders)
            step_behaviour(chart, renders)
            step_monitoring(renders)
            step_quota(chart, renders)
    step_generated()
    elapsed = time.monotonic() - started
    print()
    if failures:
        print("failures:")
        for f in failures:
            print(f"  - {f}")
    status = "FAILED" if failures else "OK"
    print(f"chart check {status} in {elapsed:.1f}s")
    # Last line in the plain "N passed, N failed" form CI summaries understand.
    print(f"chart-check: {passed} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
