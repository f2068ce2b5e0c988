{{- define "maas-lib.service" -}}
{{- $c := .Values.component -}}
{{- $fullname := include "maas-lib.fullname" . -}}
{{- $secrets := .Values.secrets | default dict -}}
{{- /* Each pod's SQLite lives on its own volume: replicas would neither share state nor see one lock. */}}
{{- $sharedDatabase := ($secrets.databaseUrl | default dict).name -}}
{{- if and .Values.triton (eq (include "maas-lib.leaderElection" .) "true") (not $sharedDatabase) }}
{{- fail "inference: more than one replica (replicaCount > 1, autoscaling or leaderElection) needs a shared PostgreSQL database: set secrets.databaseUrl.name" }}
{{- end }}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "maas-lib.labels" . | nindent 4 }}
data:
  MAAS_HOME: /var/lib/maas
  MAAS_LOG_LEVEL: {{ .Values.logLevel | default "info" | quote }}
  # The chart's Triton serves plaintext inside its NetworkPolicy (its pods mount no secrets, so no
  # TLS key and no token): the services dial it without TLS even when their own ports use it.
  MAAS_TRITON_TLS: "false"
  {{ $c.addrEnv }}: "0.0.0.0:{{ $c.grpcPort }}"
  {{ $c.metricsAddrEnv }}: "0.0.0.0:{{ $c.metricsPort }}"
  {{- if $c.httpPort }}
  {{ $c.httpAddrEnv }}: "0.0.0.0:{{ $c.httpPort }}"
  {{- else if $c.httpAddrEnv }}
  {{ $c.httpAddrEnv }}: ""
  {{- end }}
  {{- if ne $c.name "registry" }}
  MAAS_REGISTRY_ADDR: {{ include "maas-lib.peer" (list . "registry" 50052) | quote }}
  {{- end }}
  {{- if ne $c.name "inference" }}
  MAAS_INFERENCE_ADDR: {{ include "maas-lib.peer" (list . "inference" 50053) | quote }}
  {{- end }}
  {{- if ne $c.name "trainer" }}
  MAAS_TRAINER_ADDR: {{ include "maas-lib.peer" (list . "trainer" 50054) | quote }}
  {{- end }}
  {{- if .Values.tls.enabled }}
  MAAS_TLS_CERT_FILE: /etc/maas/tls/tls.crt
  MAAS_TLS_KEY_FILE: /etc/maas/tls/tls.key
  MAAS_TLS_CA_FILE: /etc/maas/tls/ca.crt
  {{- if .Values.tls.requireClientCertificates }}
  MAAS_TLS_CLIENT_CA_FILE: /etc/maas/tls/ca.crt
  {{- end }}
  {{- end }}
  {{- if $secrets.kek }}
  # The key-encryption key that wraps the registry's blob data keys: the Secret mounted below.
  MAAS_REGISTRY_KEK_FILE: /etc/maas/kek/kek
  {{- end }}
  {{- with .Values.triton }}
  # The Triton nodes of the chart's StatefulSet (see _triton.tpl). Models reach a node in its
  # load request, so the nodes share no volume with this pod.
  MAAS_TRITON_URLS: {{ include "maas-lib.tritonUrls" $ | quote }}
  # Every node serves Prometheus metrics (pending requests, GPUs) on this port of its host.
  MAAS_TRITON_METRICS_PORT: {{ .metricsPort | quote }}
  MAAS_TRITON_NODE_MODEL_SLOTS: {{ .modelSlots | quote }}
  MAAS_TRITON_NODE_MEMORY_MB: {{ .memoryMb | quote }}
  MAAS_GPU_AVAILABLE: {{ gt (int .gpus) 0 | quote }}
  # Only one inference replica drives the nodes; with more, they elect it (services/common/leader.py).
  MAAS_INFERENCE_LEADER_ELECTION: {{ include "maas-lib.leaderElection" $ | quote }}
  {{- end }}
  {{- range $name, $value := .Values.env }}
  {{ $name }}: {{ $value | quote }}
  {{- end }}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "maas-lib.labels" . | nindent 4 }}
spec:
  {{- if not .Values.autoscaling.enabled }}
  replicas: {{ .Values.replicaCount }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "maas-lib.selectorLabels" . | nindent 6 }}
  {{- with .Values.strategy }}
  strategy:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  template:
    metadata:
      labels:
        {{- include "maas-lib.labels" . | nindent 8 }}
      annotations:
        # Roll the pods when their configuration changes.
        checksum/config: {{ toJson .Values | sha256sum }}
    spec:
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        runAsNonRoot: true
        runAsUser: 10001
        fsGroup: 10001
      terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds | default 30 }}
      containers:
        - name: {{ $c.name }}
          image: {{ include "maas-lib.image" . | quote }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          args: ["-m", "services.{{ $c.name }}"]
          ports:
            - name: grpc
              containerPort: {{ $c.grpcPort }}
            - name: metrics
              containerPort: {{ $c.metricsPort }}
            {{- if $c.httpPort }}
            - name: http
              containerPort: {{ $c.httpPort }}
            {{- end }}
          envFrom:
            - configMapRef:
                name: {{ $fullname }}
          env:
            - name: MAAS_INTERNAL_TOKEN
              valueFrom:
                secretKeyRef:
                  name: {{ required "secrets.internalToken.name: a Secret holding the shared internal token" $secrets.internalToken.name }}
                  key: {{ $secrets.internalToken.key | default "token" }}
            {{- if and $c.databaseEnv $secrets.databaseUrl $secrets.databaseUrl.name }}
            - name: {{ $c.databaseEnv }}
              valueFrom:
                secretKeyRef:
                  name: {{ $secrets.databaseUrl.name }}
                  key: {{ $secrets.databaseUrl.key | default "url" }}
            {{- end }}
            {{- range $secrets.extra }}
            - name: {{ .env }}
              valueFrom:
                secretKeyRef:
                  name: {{ .name }}
                  key: {{ .key }}
            {{- end }}
          {{- if .Values.tls.enabled }}
          # Kubelet's gRPC probes speak plaintext only: with TLS on, probe the port instead.
          readinessProbe:
            tcpSocket:
              port: grpc
            periodSeconds: 5
          livenessProbe:
            tcpSocket:
              port: grpc
            periodSeconds: 10
            failureThreshold: 6
          {{- else }}
          startupProbe:
            grpc:
              port: {{ $c.grpcPort }}
            periodSeconds: 5
            failureThreshold: {{ .Values.startupFailureThreshold | default 60 }}
          readinessProbe:
            grpc:
              port: {{ $c.grpcPort }}
            periodSeconds: 5
          livenessProbe:
            grpc:
              port: {{ $c.grpcPort }}
            periodSeconds: 10
            failureThreshold: 6
          {{- end }}
          resources:
            {{- toYaml .Values.resources | nindent 12 }}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities:
              drop: ["ALL"]
          volumeMounts:
            - name: data
              mountPath: /var/lib/maas
            - name: tmp
              mountPath: /tmp
            {{- if .Values.tls.enabled }}
            - name: tls
              mountPath: /etc/maas/tls
              readOnly: true
            {{- end }}
            {{- if $secrets.kek }}
            - name: kek
              mountPath: /etc/maas/kek
              readOnly: true
            {{- end }}
            {{- with .Values.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        - name: data
          {{- if .Values.persistence.existingClaim }}
          persistentVolumeClaim:
            claimName: {{ .Values.persistence.existingClaim }}
          {{- else }}
          emptyDir: {}
          {{- end }}
        - name: tmp
          emptyDir: {}
        {{- if .Values.tls.enabled }}
        - name: tls
          secret:
            secretName: {{ required "tls.secretName: a Secret with tls.crt, tls.key and ca.crt" .Values.tls.secretName }}
        {{- end }}
        {{- with $secrets.kek }}
        - name: kek
          secret:
            secretName: {{ required "secrets.kek.name: a Secret holding the key-encryption key" .name }}
            # Only this pod's user reads it (fsGroup may add group read; the registry refuses more).
            defaultMode: 0400
            items:
              - key: {{ .key | default "kek" }}
                path: kek
        {{- end }}
        {{- with .Values.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .Values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "maas-lib.labels" . | nindent 4 }}
spec:
  type: {{ .Values.service.type | default "ClusterIP" }}
  selector:
    {{- include "maas-lib.selectorLabels" . | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $c.grpcPort }}
      targetPort: grpc
      appProtocol: grpc
    - name: metrics
      port: {{ $c.metricsPort }}
      targetPort: metrics
    {{- if $c.httpPort }}
    - name: http
      port: {{ $c.httpPort }}
      targetPort: http
      appProtocol: http
    {{- end }}
{{- if .Values.autoscaling.enabled }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "maas-lib.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $fullname }}
  minReplicas: {{ .Values.autoscaling.minReplicas }}
  maxReplicas: {{ .Values.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ .Values.autoscaling.targetCPUUtilizationPercentage }}
{{- end }}
{{- if .Values.podDisruptionBudget.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "maas-lib.labels" . | nindent 4 }}
spec:
  {{- if .Values.podDisruptionBudget.minAvailable }}
  minAvailable: {{ .Values.podDisruptionBudget.minAvailable }}
  {{- else }}
  maxUnavailable: {{ .Values.podDisruptionBudget.maxUnavailable | default 1 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "maas-lib.selectorLabels" . | nindent 6 }}
{{- end }}
{{- if .Values.serviceMonitor.enabled }}
---
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "maas-lib.labels" . | nindent 4 }}
    {{- with .Values.serviceMonitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "maas-lib.selectorLabels" . | nindent 6 }}
  endpoints:
    - port: metrics
      interval: {{ .Values.serviceMonitor.interval | default "15s" }}
{{- end }}
{{- end -}}
