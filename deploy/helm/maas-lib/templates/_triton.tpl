{{/*
The Triton fleet of the inference chart (.Values.triton): the inference service's ConfigMap (in
maas-lib.service) and the chart's StatefulSet must agree on these names.
*/}}

{{/* The StatefulSet and its headless Service share this name. */}}
{{- define "maas-lib.tritonName" -}}
{{- printf "%s-triton" .Release.Name -}}
{{- end -}}

{{/*
MAAS_TRITON_URLS: every node's stable DNS name through the headless Service, node 0 first:
<sts>-<i>.<svc>.<namespace>.svc.<clusterDomain>:<grpcPort>. A pod keeps its name when it is
rescheduled, so the inference service's placement survives Triton restarts.
*/}}
{{- define "maas-lib.tritonUrls" -}}
{{- $t := .Values.triton -}}
{{- $name := include "maas-lib.tritonName" . -}}
{{- $urls := list -}}
{{- range $i := until (int $t.replicas) -}}
{{- $urls = append $urls (printf "%s-%d.%s.%s.svc.%s:%v" $name $i $name $.Release.Namespace $t.clusterDomain $t.grpcPort) -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}

{{/*
MAAS_INFERENCE_LEADER_ELECTION, "true" or "false": .Values.leaderElection when set, else on
whenever more than one inference replica may run.
*/}}
{{- define "maas-lib.leaderElection" -}}
{{- $explicit := toString .Values.leaderElection -}}
{{- if has $explicit (list "true" "false") -}}
{{- $explicit -}}
{{- else -}}
{{- or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled -}}
{{- end -}}
{{- end -}}
