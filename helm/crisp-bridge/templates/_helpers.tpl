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

{{- define "crisp-bridge.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
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
{{- $holder := dict }}
{{- include "crisp-bridge.normalize" (dict "v" $src "out" $holder "key" "cfg") }}
{{- get $holder "cfg" | toToml }}
{{- end }}

{{/* Checks that span several values; included by the Deployment. */}}
{{- define "crisp-bridge.validate" -}}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled }}
{{- fail "autoscaling.enabled and keda.enabled are mutually exclusive: both would scale the same Deployment. Enable only one." }}
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
