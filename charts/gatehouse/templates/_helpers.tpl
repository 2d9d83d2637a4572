{{/* Names and labels shared by the templates. */}}

{{- define "gatehouse.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: the release name, plus the chart name unless the release
name already contains it. Truncated so that "<fullname>-controller" fits in 63 characters.
*/}}
{{- define "gatehouse.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "gatehouse.controller.fullname" -}}
{{ include "gatehouse.fullname" . }}-controller
{{- end }}

{{- define "gatehouse.dataplane.fullname" -}}
{{ include "gatehouse.fullname" . }}-dataplane
{{- end }}

{{/* Cluster-scoped objects carry the namespace: the same release name may live in several. */}}
{{- define "gatehouse.controller.clusterName" -}}
{{ .Release.Namespace }}-{{ include "gatehouse.controller.fullname" . }}
{{- end }}

{{- define "gatehouse.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gatehouse.labels" -}}
helm.sh/chart: {{ include "gatehouse.chart" . }}
app.kubernetes.io/name: {{ include "gatehouse.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gatehouse
{{- end }}

{{- define "gatehouse.controller.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gatehouse.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{- define "gatehouse.dataplane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gatehouse.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: dataplane
{{- end }}

{{- define "gatehouse.controller.labels" -}}
{{ include "gatehouse.labels" . }}
app.kubernetes.io/component: controller
{{- end }}

{{- define "gatehouse.dataplane.labels" -}}
{{ include "gatehouse.labels" . }}
app.kubernetes.io/component: dataplane
{{- end }}

{{- define "gatehouse.controller.serviceAccountName" -}}
{{- if .Values.controller.serviceAccount.create }}
{{- default (include "gatehouse.controller.fullname" .) .Values.controller.serviceAccount.name }}
{{- else }}
{{- required "controller.serviceAccount.name is required when controller.serviceAccount.create is false" .Values.controller.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gatehouse.dataplane.serviceAccountName" -}}
{{- if .Values.dataplane.serviceAccount.create }}
{{- default (include "gatehouse.dataplane.fullname" .) .Values.dataplane.serviceAccount.name }}
{{- else }}
{{- required "dataplane.serviceAccount.name is required when dataplane.serviceAccount.create is false" .Values.dataplane.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gatehouse.leaseName" -}}
{{- default (include "gatehouse.controller.fullname" .) .Values.controller.leaseName }}
{{- end }}

{{/* repository:tag, or repository@sha256:... when the tag is a digest. */}}
{{- define "gatehouse.image" -}}
{{- $tag := default .chart.AppVersion .image.tag }}
{{- if hasPrefix "sha256:" $tag }}
{{- printf "%s@%s" .image.repository $tag }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/* The pod-level security context both Deployments share. */}}
{{- define "gatehouse.podSecurityContext" -}}
runAsNonRoot: true
{{- with .Values.runAsUser }}
runAsUser: {{ . }}
{{- end }}
{{- with .Values.runAsGroup }}
runAsGroup: {{ . }}
fsGroup: {{ . }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The container-level security context: not negotiable, hence not a value. */}}
{{- define "gatehouse.containerSecurityContext" -}}
runAsNonRoot: true
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The pod scheduling fields both Deployments share; `.` is the component's values. */}}
{{- define "gatehouse.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/* The Secret holding the config stream's certificate (tls.crt, tls.key, ca.crt). */}}
{{- define "gatehouse.controller.tlsSecretName" -}}
{{- .Values.controller.tls.existingSecret | default (printf "%s-tls" (include "gatehouse.controller.fullname" .)) }}
{{- end }}

{{/* The DNS name dataplanes reach the controller by; first in its certificate. */}}
{{- define "gatehouse.controller.host" -}}
{{- printf "%s.%s.svc" (include "gatehouse.controller.fullname" .) .Release.Namespace }}
{{- end }}
