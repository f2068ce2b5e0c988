{{/*
Shared templates of the MaaS service charts. A service chart calls
  {{ include "maas-lib.service" . }}
and describes itself in .Values.component:
  name, grpcPort, metricsPort, addrEnv, metricsAddrEnv, databaseEnv (optional).
*/}}

{{- define "maas-lib.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Values.component.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "maas-lib.selectorLabels" -}}
app.kubernetes.io/name: maas-{{ .Values.component.name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "maas-lib.labels" -}}
{{ include "maas-lib.selectorLabels" . }}
app.kubernetes.io/part-of: maas
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* host:port where a peer service answers: an explicit value, else <release>-<peer>:<port>. */}}
{{- define "maas-lib.peer" -}}
{{- $ctx := index . 0 -}}{{- $peer := index . 1 -}}{{- $port := index . 2 -}}
{{- $explicit := index ($ctx.Values.peers | default dict) $peer | default "" -}}
{{- if $explicit -}}{{ $explicit }}{{- else -}}{{ printf "%s-%s:%v" $ctx.Release.Name $peer $port }}{{- end -}}
{{- end -}}

{{- define "maas-lib.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
