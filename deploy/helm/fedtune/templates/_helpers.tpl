{{/* The chart's resource names: <release>-fedtune-<part>, at most 63 characters. */}}
{{- define "fedtune.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "fedtune.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "fedtune.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Runs as distroless's nonroot user, nothing writable but the volumes. */}}
{{- define "fedtune.podSecurity" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "fedtune.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{- define "fedtune.scrape" -}}
{{- if .Values.metrics.prometheusScrape }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.metrics.port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/* The probes of a coordinator or aggregator: plain HTTP on the metrics port (gRPC probes
     present no client certificate, which mutual TLS refuses). */}}
{{- define "fedtune.probes" -}}
readinessProbe:
  httpGet:
    path: /readyz
    port: metrics
  periodSeconds: 10
livenessProbe:
  httpGet:
    path: /healthz
    port: metrics
  initialDelaySeconds: 10
  periodSeconds: 20
  failureThreshold: 6
{{- end -}}

{{/* The pod's own name, for the certificate it presents ($(POD_NAME) in args). */}}
{{- define "fedtune.podNameEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end -}}

{{/* coordinator.settings as TOML: YAML reads every number as a float, and serve's integer
     keys (rounds, min_available_clients, ...) refuse "5.0", so whole numbers are written as
     integers (float keys accept them). */}}
{{- define "fedtune.coordinatorToml" -}}
{{- range $k, $v := .Values.coordinator.settings }}
{{- if kindIs "string" $v }}
{{ $k }} = {{ $v | quote }}
{{- else if and (kindIs "float64" $v) (eq $v (float64 (int64 $v))) }}
{{ $k }} = {{ int64 $v }}
{{- else if or (kindIs "slice" $v) (kindIs "map" $v) }}
{{ $k }} = {{ toJson $v }}
{{- else }}
{{ $k }} = {{ $v }}
{{- end }}
{{- end }}
{{- end -}}
