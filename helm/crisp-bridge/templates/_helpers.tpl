{{/* Chart name, truncated to 63 characters (DNS label limit). */}}
{{- define "crisp-bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: release-chart, unless the release name already contains the chart name. */}}
{{- define "crisp-bridge.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "crisp-bridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "crisp-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "crisp-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "crisp-bridge.labels" -}}
helm.sh/chart: {{ include "crisp-bridge.chart" . }}
{{ include "crisp-bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: consumer
{{- end }}

{{- define "crisp-bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "crisp-bridge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "crisp-bridge.secretName" -}}
{{- default (include "crisp-bridge.fullname" .) .Values.existingSecret }}
{{- end }}

{{- define "crisp-bridge.configMapName" -}}
{{- default (include "crisp-bridge.fullname" .) .Values.existingConfigMap }}
{{- end }}

{{/* repository@digest when a digest is set (immutable), else repository:tag. */}}
{{- define "crisp-bridge.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}
{{- end }}

{{/*
The three credentials: config section, config key, Secret key. The Secret keys
are the chart's contract with existingSecret; keep them.
*/}}
{{- define "crisp-bridge.secretKeys" -}}
- {section: amqp, key: url, secretKey: amqp-url, value: amqpUrl}
- {section: crisp, key: identifier, secretKey: crisp-identifier, value: crispIdentifier}
- {section: crisp, key: key, secretKey: crisp-key, value: crispKey}
{{- end }}

{{/* True (non-empty) when the user set config.<section>.<key>_file themselves. */}}
{{- define "crisp-bridge.userFile" -}}
{{- dig .s.section (printf "%s_file" .s.key) "" .root.Values.config }}
{{- end }}

{{/*
Container env for the credentials. `env`: the secrets themselves as
CRISP_BRIDGE_* variables (skipped for a key whose *_file the user set).
`files` with existingConfigMap: the *_file paths as variables, since the chart
cannot write them into a config file it does not render.
*/}}
{{- define "crisp-bridge.secretEnv" -}}
{{- $root := . }}
{{- range $s := include "crisp-bridge.secretKeys" . | fromYamlArray }}
{{- $var := printf "CRISP_BRIDGE_%s__%s" (upper $s.section) (upper $s.key) }}
{{- if eq $root.Values.secretsAs "env" }}
{{- if not (include "crisp-bridge.userFile" (dict "s" $s "root" $root)) }}
- name: {{ $var }}
  valueFrom:
    secretKeyRef:
      name: {{ include "crisp-bridge.secretName" $root }}
      key: {{ $s.secretKey }}
{{- end }}
{{- else if $root.Values.existingConfigMap }}
- name: {{ $var }}_FILE
  value: {{ printf "%s/%s" $root.Values.secretsMountPath $s.secretKey | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Secret volume (files mode). Not subPath-mounted, so kubelet updates it in place. */}}
{{- define "crisp-bridge.secretVolume" -}}
{{- if eq .Values.secretsAs "files" }}
- name: secrets
  secret:
    secretName: {{ include "crisp-bridge.secretName" . }}
    defaultMode: 0440
    items:
      - key: amqp-url
        path: amqp-url
      - key: crisp-identifier
        path: crisp-identifier
      - key: crisp-key
        path: crisp-key
{{- end }}
{{- end }}

{{- define "crisp-bridge.secretVolumeMount" -}}
{{- if eq .Values.secretsAs "files" }}
- name: secrets
  mountPath: {{ .Values.secretsMountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The admin port, taken from config.server.listen ("0.0.0.0:9464" -> 9464). */}}
{{- define "crisp-bridge.adminPort" -}}
{{- $listen := dig "server" "listen" "0.0.0.0:9464" .Values.config | toString }}
{{- $port := regexFind "[0-9]+$" $listen }}
{{- if not $port }}
{{- fail (printf "config.server.listen %q has no port: use the form \"0.0.0.0:9464\"" $listen) }}
{{- end }}
{{- $port }}
{{- end }}

{{/*
Parse a duration string ("500ms", "25s", "1m", "1m30s", "2h") into whole
seconds, rounded up. Fails on anything else.
*/}}
{{- define "crisp-bridge.durationSeconds" -}}
{{- $d := toString . | trim }}
{{- if not (regexMatch "^([0-9]+(ms|s|m|h))+$" $d) }}
{{- fail (printf "cannot parse duration %q: use a form like \"500ms\", \"25s\", \"1m\" or \"1m30s\"" $d) }}
{{- end }}
{{- $ms := 0 }}
{{- range $part := regexFindAll "[0-9]+(ms|s|m|h)" $d -1 }}
{{- $digits := regexFind "^[0-9]+" $part }}
{{- $n := atoi $digits }}
{{- $unit := trimPrefix $digits $part }}
{{- if eq $unit "ms" }}{{ $ms = add $ms $n }}
{{- else if eq $unit "s" }}{{ $ms = add $ms (mul $n 1000) }}
{{- else if eq $unit "m" }}{{ $ms = add $ms (mul $n 60000) }}
{{- else if eq $unit "h" }}{{ $ms = add $ms (mul $n 3600000) }}
{{- end }}
{{- end }}
{{- div (add $ms 999) 1000 }}
{{- end }}

{{/*
Copy a value tree into .out[.key], turning whole-number floats into integers.
Helm reads every YAML/JSON number as a float64 and toToml would write
`prefetch = 64.0`, which an integer config field rejects.
Usage: include "crisp-bridge.normalize" (dict "v" $value "out" $dict "key" "k")
*/}}
{{- define "crisp-bridge.normalize" -}}
{{- $v := .v }}
{{- if kindIs "map" $v }}
{{- $m := dict }}
{{- range $k, $item := $v }}
{{- include "crisp-bridge.normalize" (dict "v" $item "out" $m "key" $k) }}
{{- end }}
{{- $_ := set .out .key $m }}
{{- else if kindIs "slice" $v }}
{{- $l := list }}
{{- range $item := $v }}
{{- $tmp := dict }}
{{- include "crisp-bridge.normalize" (dict "v" $item "out" $tmp "key" "x") }}
{{- $l = append $l (get $tmp "x") }}
{{- end }}
{{- $_ := set .out .key $l }}
{{- else if and (kindIs "float64" $v) (eq (float64 (int64 $v)) $v) }}
{{- $_ := set .out .key (int64 $v) }}
{{- else }}
{{- $_ := set .out .key $v }}
{{- end }}
{{- end }}

{{/* crisp-bridge.toml: config sections plus [[rules]]. */}}
{{- define "crisp-bridge.configToml" -}}
{{- $src := merge (dict "rules" .Values.rules) (deepCopy .Values.config) }}
{{- if eq .Values.secretsAs "files" }}
{{- /* Point the config at the mounted Secret; a *_file the user set wins. */}}
{{- range $s := include "crisp-bridge.secretKeys" . | fromYamlArray }}
{{- $section := get $src $s.section | default dict }}
{{- $_ := set $section (printf "%s_file" $s.key) (get $section (printf "%s_file" $s.key) | default (printf "%s/%s" $.Values.secretsMountPath $s.secretKey)) }}
{{- $_ := set $src $s.section $section }}
{{- end }}
{{- end }}
{{- /* The broker's TLS Secret and the way to Crisp; keys the user set in config win. */}}
{{- range $v := include "crisp-bridge.tlsKeys" . | fromYamlArray }}
{{- $section := get $src $v.section | default dict }}
{{- if eq $v.section "amqp" }}
{{- $tls := get $section "tls" | default dict }}
{{- $_ := set $tls $v.key (get $tls $v.key | default $v.value) }}
{{- $_ := set $section "tls" $tls }}
{{- else }}
{{- $_ := set $section $v.key (get $section $v.key | default $v.value) }}
{{- end }}
{{- $_ := set $src $v.section $section }}
{{- end }}
{{- if include "crisp-bridge.singleActiveConsumer" . }}
{{- $amqp := get $src "amqp" | default dict }}
{{- $_ := set $amqp "single_active_consumer" true }}
{{- $_ := set $src "amqp" $amqp }}
{{- end }}
{{- $holder := dict }}
{{- include "crisp-bridge.normalize" (dict "v" $src "out" $holder "key" "cfg") }}
{{- get $holder "cfg" | toToml }}
{{- end }}

{{/* Config keys the chart sets from amqpTls and crisp: [{section, key, value, env}]. */}}
{{- define "crisp-bridge.tlsKeys" -}}
{{- with .Values.amqpTls.secretName }}
- {section: amqp, key: ca_file, value: {{ printf "%s/ca.crt" $.Values.amqpTls.mountPath | quote }}, env: CRISP_BRIDGE_AMQP__TLS__CA_FILE}
{{- if $.Values.amqpTls.clientCertificate }}
- {section: amqp, key: cert_file, value: {{ printf "%s/tls.crt" $.Values.amqpTls.mountPath | quote }}, env: CRISP_BRIDGE_AMQP__TLS__CERT_FILE}
- {section: amqp, key: key_file, value: {{ printf "%s/tls.key" $.Values.amqpTls.mountPath | quote }}, env: CRISP_BRIDGE_AMQP__TLS__KEY_FILE}
{{- end }}
{{- end }}
{{- with .Values.crisp.proxy }}
- {section: crisp, key: proxy, value: {{ . | quote }}, env: CRISP_BRIDGE_CRISP__PROXY}
{{- end }}
{{- with .Values.crisp.caFile }}
- {section: crisp, key: ca_file, value: {{ . | quote }}, env: CRISP_BRIDGE_CRISP__CA_FILE}
{{- end }}
{{- end }}

{{/* The broker's TLS Secret as a volume; not subPath-mounted, so renewals reach the pod. */}}
{{- define "crisp-bridge.tlsVolume" -}}
{{- with .Values.amqpTls.secretName }}
- name: amqp-tls
  secret:
    secretName: {{ . }}
    defaultMode: 0440
    items:
      - key: ca.crt
        path: ca.crt
      {{- if $.Values.amqpTls.clientCertificate }}
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
      {{- end }}
{{- end }}
{{- end }}

{{- define "crisp-bridge.tlsVolumeMount" -}}
{{- if .Values.amqpTls.secretName }}
- name: amqp-tls
  mountPath: {{ .Values.amqpTls.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* With existingConfigMap the chart cannot edit the file: the same keys as variables. */}}
{{- define "crisp-bridge.tlsEnv" -}}
{{- if .Values.existingConfigMap }}
{{- range $v := include "crisp-bridge.tlsKeys" . | fromYamlArray }}
- name: {{ $v.env }}
  value: {{ $v.value | quote }}
{{- end }}
{{- if .Values.singleActiveConsumer }}
- name: CRISP_BRIDGE_AMQP__SINGLE_ACTIVE_CONSUMER
  value: "true"
{{- end }}
{{- end }}
{{- end }}

{{/* "true" when one pod consumes at a time (singleActiveConsumer, or the same key set in config), else empty. */}}
{{- define "crisp-bridge.singleActiveConsumer" -}}
{{- if or .Values.singleActiveConsumer (dig "amqp" "single_active_consumer" false .Values.config) }}true{{ end }}
{{- end }}

{{/* Checks that span several values; included by the Deployment. */}}
{{- define "crisp-bridge.validate" -}}
{{- if not .Values.existingSecret }}
{{- range $s := include "crisp-bridge.secretKeys" . | fromYamlArray }}
{{- $_ := required (printf "secret.%s is empty and no existingSecret is named: set secret.amqpUrl, secret.crispIdentifier and secret.crispKey (e.g. --set-string secret.%s=...), or existingSecret to a Secret with the keys amqp-url, crisp-identifier and crisp-key." $s.value $s.value) (get $.Values.secret $s.value) }}
{{- end }}
{{- end }}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled }}
{{- fail "autoscaling.enabled and keda.enabled are mutually exclusive: both would scale the same Deployment. Enable only one." }}
{{- end }}
{{- if include "crisp-bridge.singleActiveConsumer" . }}
{{- if .Values.keda.enabled }}
{{- fail "singleActiveConsumer and keda.enabled do not go together: with a single active consumer one pod consumes and every other pod only stands by, so scaling on the queue length adds idle standbys, never throughput. Disable keda and set replicaCount (2 or 3: one active, the others standing by for failover)." }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- fail "singleActiveConsumer and autoscaling.enabled do not go together: with a single active consumer one pod consumes and every other pod only stands by, so scaling on CPU adds idle standbys, never throughput. Disable autoscaling and set replicaCount (2 or 3: one active, the others standing by for failover)." }}
{{- end }}
{{- end }}
{{- if and .Values.podDisruptionBudget.enabled (not (kindIs "invalid" .Values.podDisruptionBudget.minAvailable)) (not (kindIs "invalid" .Values.podDisruptionBudget.maxUnavailable)) }}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable, not both." }}
{{- end }}
{{- $timeout := dig "delivery" "shutdown_timeout" "25s" .Values.config }}
{{- $shutdown := include "crisp-bridge.durationSeconds" $timeout | atoi }}
{{- $grace := int .Values.terminationGracePeriodSeconds }}
{{- if le $grace $shutdown }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be longer than config.delivery.shutdown_timeout (%s = %ds), or Kubernetes kills the pod before in-flight messages are settled." $grace (toString $timeout) $shutdown) }}
{{- end }}
{{- end }}

{{/* The smallest number of replicas the release is expected to run. */}}
{{- define "crisp-bridge.minReplicas" -}}
{{- if .Values.autoscaling.enabled }}
{{- .Values.autoscaling.minReplicas | int }}
{{- else if .Values.keda.enabled }}
{{- .Values.keda.minReplicaCount | int }}
{{- else }}
{{- .Values.replicaCount | int }}
{{- end }}
{{- end }}
